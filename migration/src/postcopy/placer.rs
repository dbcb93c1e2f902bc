//! Placing arriving pages on the postcopy destination, and the figures kept on the way. A
//! [`Placer`] is cheap to clone: the main stream's listener and the preempt channel's reader
//! place pages concurrently (userfaultfd places each page once; the loser sees EEXIST).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use uffd::{GuestRam, PageState, PageStates, Userfaultfd};

use crate::stream::{Section, StreamError};
use crate::FaultObserver;

#[derive(Default)]
pub(super) struct Tracker {
    /// gpa -> when it was requested.
    pub(super) requested_at: HashMap<u64, Instant>,
    /// gpa -> the threads that faulted on it and when.
    pub(super) waiters: HashMap<u64, Vec<(u32, Instant)>>,
    pub(super) latencies_us: Vec<f64>,
    pub(super) blocked: HashMap<u32, (u64, f64)>,
    /// Histogram of single vCPU-thread waits (log2 µs).
    pub(super) vcpu_waits_log2: Vec<u64>,
    pub(super) vcpu_tids: Vec<u32>,
    pub(super) async_faults: u64,
    pub(super) faults: u64,
}

/// log2 bucket of a duration in µs: [2^i, 2^(i+1)).
pub(super) fn log2_bucket(us: f64) -> usize {
    (us.max(1.0).log2() as usize).min(23)
}

pub(super) fn trim(mut hist: Vec<u64>) -> Vec<u64> {
    while hist.last() == Some(&0) {
        hist.pop();
    }
    hist
}

impl Tracker {
    /// The page is here: every thread that waited on it stops waiting now.
    pub(super) fn end_wait(&mut self, gpa: u64, now: Instant) {
        for (tid, at) in self.waiters.remove(&gpa).unwrap_or_default() {
            let us = now.duration_since(at).as_secs_f64() * 1e6;
            let e = self.blocked.entry(tid).or_default();
            e.0 += 1;
            e.1 += us;
            if self.vcpu_tids.contains(&tid) {
                if self.vcpu_waits_log2.is_empty() {
                    self.vcpu_waits_log2 = vec![0; 24];
                }
                self.vcpu_waits_log2[log2_bucket(us)] += 1;
            }
        }
    }
}

/// Places pages into guest RAM.
#[derive(Clone)]
pub struct Placer {
    pub(super) uffd: Arc<Userfaultfd>,
    pub(super) states: Arc<PageStates>,
    pub(super) ram: GuestRam,
    pub(super) tracker: Arc<Mutex<Tracker>>,
    pub(super) observer: Option<Arc<dyn FaultObserver>>,
    pub(super) pushed: Arc<AtomicU64>,
}

impl Placer {
    /// Places one page that arrived (None: a zero page). Pages already Received are ignored.
    pub fn place(&self, gpa: u64, data: Option<&[u8]>) -> Result<(), StreamError> {
        let refuse = |msg: String| StreamError::Decode {
            section: Section::Ram.name(),
            msg,
        };
        let Some(page) = self.ram.page_at_gpa(gpa) else {
            return Err(refuse(format!("page {gpa:#x} is outside guest RAM")));
        };
        if page.gpa != gpa {
            return Err(refuse(format!("page {gpa:#x} is not page-aligned")));
        }
        if self.states.get(page.index) == PageState::Received {
            return Ok(());
        }
        let placed = uffd::place(&self.uffd, &self.states, &page, data)
            .map_err(|e| refuse(format!("placing page {gpa:#x}: {e}")))?;
        if !placed {
            // The other channel placed it first and did the bookkeeping.
            return Ok(());
        }
        let now = Instant::now();
        let mut t = self.tracker.lock().unwrap_or_else(|e| e.into_inner());
        match t.requested_at.remove(&gpa) {
            Some(at) => {
                let us = now.duration_since(at).as_secs_f64() * 1e6;
                t.latencies_us.push(us);
            }
            None => {
                self.pushed.fetch_add(1, Ordering::Relaxed);
            }
        }
        t.end_wait(gpa, now);
        drop(t);
        if let Some(o) = &self.observer {
            o.placed(gpa);
        }
        Ok(())
    }
}

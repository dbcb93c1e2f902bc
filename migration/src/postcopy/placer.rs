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
    /// Time spent placing pushed runs (UFFDIO_COPY/ZEROPAGE and the bookkeeping), summed over
    /// the threads that place them.
    pub(super) place_ns: Arc<AtomicU64>,
    /// Held while a pushed run is copied in: one copy at a time (see `place_run`).
    pub(super) copying: Arc<Mutex<()>>,
}

impl Placer {
    /// Places a run of `pages` pages from `gpa` on (`data`: their bytes, contiguous; None: zero
    /// pages) with as few ioctls as it takes; pages placed already (a request's answer on
    /// another connection) are skipped. Returns how many pages this call placed.
    pub fn place_run(
        &self,
        gpa: u64,
        pages: usize,
        data: Option<&[u8]>,
    ) -> Result<usize, StreamError> {
        let t0 = Instant::now();
        let refuse = |msg: String| StreamError::Decode {
            section: Section::RamRun.name(),
            msg,
        };
        let bytes = pages
            .checked_mul(uffd::PAGE as usize)
            .filter(|b| *b > 0 && data.is_none_or(|d| d.len() == *b))
            .ok_or_else(|| refuse(format!("{pages} pages at {gpa:#x} do not match their data")))?;
        let first = self.ram.page_at_gpa(gpa).filter(|p| p.gpa == gpa);
        // The whole run must lie in one span: its last page where the first one's span puts it.
        let last = gpa
            .checked_add((bytes - uffd::PAGE as usize) as u64)
            .and_then(|l| self.ram.page_at_gpa(l));
        let page = match (first, last) {
            (Some(f), Some(l))
                if l.index == f.index + pages - 1
                    && l.hva == f.hva + (bytes - uffd::PAGE as usize) as u64 =>
            {
                f
            }
            _ => {
                return Err(refuse(format!(
                "run of {pages} pages at {gpa:#x} is not page-aligned inside one guest RAM region"
            )))
            }
        };
        let mut skipped = Vec::new();
        let copying = self.copying.lock().unwrap_or_else(|e| e.into_inner());
        let copied = match data {
            Some(d) => self.uffd.copy_range(page.hva, d, &mut skipped),
            None => self
                .uffd
                .zeropage_range(page.hva, bytes as u64, &mut skipped),
        };
        drop(copying);
        copied.map_err(|e| refuse(format!("placing {pages} pages at {gpa:#x}: {e}")))?;
        let mut placed = Vec::with_capacity(pages);
        let mut skip = skipped.iter().peekable();
        for i in 0..pages {
            if skip.next_if_eq(&&i).is_some() {
                continue;
            }
            // False: another thread placed it meanwhile and did the bookkeeping.
            if self.states.receive(page.index + i) {
                placed.push(gpa + (i as u64) * uffd::PAGE);
            }
        }
        self.placed(&placed);
        self.place_ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(placed.len())
    }

    /// The bookkeeping after pages were placed: request latencies, the waits they end, the
    /// observer.
    fn placed(&self, gpas: &[u64]) {
        if gpas.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut t = self.tracker.lock().unwrap_or_else(|e| e.into_inner());
        let mut pushed = 0;
        if t.requested_at.is_empty() && t.waiters.is_empty() {
            pushed = gpas.len() as u64;
        } else {
            for &gpa in gpas {
                match t.requested_at.remove(&gpa) {
                    Some(at) => {
                        let us = now.duration_since(at).as_secs_f64() * 1e6;
                        t.latencies_us.push(us);
                    }
                    None => pushed += 1,
                }
                t.end_wait(gpa, now);
            }
        }
        drop(t);
        self.pushed.fetch_add(pushed, Ordering::Relaxed);
        if let Some(o) = &self.observer {
            for &gpa in gpas {
                o.placed(gpa);
            }
        }
    }

    /// Pages placed so far that nobody requested, and the time spent placing runs (ns).
    pub fn push_figures(&self) -> (u64, u64) {
        (
            self.pushed.load(Ordering::Relaxed),
            self.place_ns.load(Ordering::Relaxed),
        )
    }

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
        self.placed(&[gpa]);
        Ok(())
    }
}

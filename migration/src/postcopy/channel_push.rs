//! Postcopy over the RAM channels, source side: the background push is split over the channels'
//! sender threads (chunk i of guest RAM on channel i mod N, as in precopy passes; zero pages are
//! detected there, never-populated ones not even read), while this thread answers page requests
//! on the preempt channel or the main stream, so a requested page never queues behind a
//! channel's bulk. Requests and senders take pages off one shared list, so a page is pushed
//! once (a requested page a sender already took is answered anyway: it may still be in flight).
//! `--postcopy-bandwidth` holds over the sum of the channels.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::source::{
    broken, pace, paced_batch, refused, region_page, Answers, Incoming, Pushed, PACE_SLICE,
};
use crate::channels::ChannelSender;
use crate::error::MigrationError;
use crate::outgoing::PageSender;
use crate::pass::{CHUNK_PAGES, RUN_PAGES};
use crate::peer::{PeerReader, HEARTBEAT_INTERVAL};
use crate::progress::StatusCell;
use crate::stream::{RamBatch, Section};
use crate::{DirtyBitmap, MigratableVm, RamRegion, PAGE_SIZE};

/// The pages still to push, one atomic bit a page: whoever clears a bit sends that page.
struct Pending {
    maps: Vec<Vec<AtomicU64>>,
}

impl Pending {
    fn new(missing: &[DirtyBitmap]) -> Pending {
        Pending {
            maps: missing
                .iter()
                .map(|m| {
                    m.words_of(0, m.pages())
                        .iter()
                        .map(|w| AtomicU64::new(*w))
                        .collect()
                })
                .collect(),
        }
    }

    /// Takes page `p` of region `ri` off the list; true when it was on it.
    fn claim(&self, ri: usize, p: usize) -> bool {
        let Some(word) = self.maps.get(ri).and_then(|m| m.get(p / 64)) else {
            return false;
        };
        let bit = 1u64 << (p % 64);
        word.fetch_and(!bit, Ordering::AcqRel) & bit != 0
    }

    /// Whether any of pages `first..first + count` of region `ri` is still on the list.
    fn any_in(&self, ri: usize, first: usize, count: usize) -> bool {
        let Some(m) = self.maps.get(ri) else {
            return false;
        };
        let words = m
            .get(first / 64..(first + count).div_ceil(64))
            .unwrap_or(&[]);
        words.iter().any(|w| w.load(Ordering::Acquire) != 0)
    }
}

/// What the senders share with the thread that answers requests.
struct Shared {
    stop: AtomicBool,
    /// Bytes the senders pushed so far (pacing counts their sum).
    bytes: AtomicU64,
    /// Pages the senders took off the list.
    pages: AtomicU64,
    /// Channels whose share is done (End sent), and their byte and page counts since they
    /// opened (precopy passes included).
    finished: Mutex<Vec<(u64, u64, u64)>>,
    /// The first sender failure.
    error: Mutex<Option<(usize, MigrationError)>>,
    start: Instant,
    bandwidth: Option<u64>,
}

/// Pushes `missing` over `channels` and answers requests here until every channel sent its
/// share; returns what was pushed. The caller sends END.
#[allow(clippy::too_many_arguments)]
pub(super) fn push<W: Write>(
    vm: &dyn MigratableVm,
    tx: &mut PageSender<W>,
    regions: &[RamRegion],
    missing: &[DirtyBitmap],
    rx: &PeerReader,
    answers: &mut Answers,
    status: &StatusCell,
    start: Instant,
    requests: Vec<u64>,
    bandwidth: Option<u64>,
    channels: Vec<ChannelSender>,
) -> Result<Pushed, MigrationError> {
    let pending = Pending::new(missing);
    let total: usize = missing.iter().map(|m| m.count()).sum();
    let n = channels.len();
    let sh = Shared {
        stop: AtomicBool::new(false),
        bytes: AtomicU64::new(0),
        pages: AtomicU64::new(0),
        finished: Mutex::new(Vec::new()),
        error: Mutex::new(None),
        start: Instant::now(),
        bandwidth,
    };
    let fail = |i: usize, e: MigrationError| {
        sh.error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert((i, e));
        sh.stop.store(true, Ordering::Relaxed);
    };
    std::thread::scope(|s| {
        for (i, mut ch) in channels.into_iter().enumerate() {
            let (sh, pending, fail) = (&sh, &pending, &fail);
            let spawned = std::thread::Builder::new()
                .name(format!("migration-sender-{i}"))
                .spawn_scoped(s, move || {
                    crate::thread_started("migration-sender");
                    match send_share(vm, &mut ch, regions, pending, (i, n), sh) {
                        Ok(()) => sh.finished.lock().unwrap_or_else(|e| e.into_inner()).push((
                            ch.w.bytes,
                            ch.batch.full,
                            ch.batch.zero,
                        )),
                        Err(e) => fail(i, e),
                    }
                });
            if let Err(e) = spawned {
                fail(
                    i,
                    MigrationError::NoAnswer(format!("starting a channel sender: {e}")),
                );
            }
        }
        let served = serve_requests(
            vm, tx, regions, missing, &pending, rx, answers, status, start, requests, &sh, n, total,
        );
        if served.is_err() {
            sh.stop.store(true, Ordering::Relaxed);
        }
        served
    })
}

/// This thread's part while the senders push: requests, heartbeats, the live figures.
#[allow(clippy::too_many_arguments)]
fn serve_requests<W: Write>(
    vm: &dyn MigratableVm,
    tx: &mut PageSender<W>,
    regions: &[RamRegion],
    missing: &[DirtyBitmap],
    pending: &Pending,
    rx: &PeerReader,
    answers: &mut Answers,
    status: &StatusCell,
    start: Instant,
    requests: Vec<u64>,
    sh: &Shared,
    channels: usize,
    total: usize,
) -> Result<Pushed, MigrationError> {
    let broken_by = |e: MigrationError| broken(rx, e.to_string());
    let mut answered: Vec<DirtyBitmap> = missing
        .iter()
        .map(|m| DirtyBitmap::new(m.pages()))
        .collect();
    let mut queued: std::collections::VecDeque<u64> = requests.into();
    let mut complete = None;
    let (mut last_sent, mut last_status) = (Instant::now(), Instant::now());
    loop {
        if let Some((i, e)) = sh.error.lock().unwrap_or_else(|e| e.into_inner()).take() {
            return Err(broken(rx, format!("RAM channel {i}: {e}")));
        }
        let finished = sh
            .finished
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if finished.len() == channels {
            let sum = finished
                .iter()
                .fold((0, 0, 0), |(b, f, z), c| (b + c.0, f + c.1, z + c.2));
            return Ok(Pushed {
                pages: sh.pages.load(Ordering::Relaxed),
                channel_bytes: sum.0,
                channel_pages: (sum.1, sum.2),
                complete,
            });
        }
        let ev = match queued.pop_front() {
            Some(gpa) => Some(Incoming::Request(gpa)),
            None => rx.wait_next(Duration::from_millis(5)).map(Incoming::from),
        };
        match ev {
            Some(Incoming::Request(gpa)) => match region_page(regions, gpa) {
                Some((ri, p)) if missing[ri].get(p) && !answered[ri].get(p) => {
                    // Taken off the list if no sender took it yet; answered either way.
                    let _ = pending.claim(ri, p);
                    answers.send(vm, tx, gpa).map_err(broken_by)?;
                    answered[ri].set(p);
                    last_sent = Instant::now();
                }
                Some(_) => {}
                None => Answers::refuse(tx, gpa).map_err(broken_by)?,
            },
            Some(Incoming::Complete(v)) => complete = Some(v),
            Some(Incoming::Refused(why)) => return Err(refused(why)),
            Some(Incoming::Broken(e)) => return Err(broken(rx, e)),
            None => {}
        }
        if last_sent.elapsed() >= HEARTBEAT_INTERVAL {
            // The main stream carries no pages now: tell the destination this side lives.
            tx.w.section(Section::Heartbeat, &[])
                .and_then(|_| tx.w.flush())
                .map_err(|e| broken_by(e.into()))?;
            last_sent = Instant::now();
        }
        if last_status.elapsed() >= Duration::from_millis(50) {
            last_status = Instant::now();
            let sent = sh.pages.load(Ordering::Relaxed) + answers.requested;
            let bytes = tx.w.bytes + sh.bytes.load(Ordering::Relaxed);
            status.update(|s| {
                s.bytes = bytes;
                s.remaining_bytes = (total as u64).saturating_sub(sent) * PAGE_SIZE as u64;
                s.total_ms = start.elapsed().as_secs_f64() * 1e3;
            });
        }
    }
}

/// One channel's share of the push: the chunks `i` modulo `n`, in runs, paced over the sum of
/// the channels; then an End section.
fn send_share(
    vm: &dyn MigratableVm,
    ch: &mut ChannelSender,
    regions: &[RamRegion],
    pending: &Pending,
    (i, n): (usize, usize),
    sh: &Shared,
) -> Result<(), MigrationError> {
    // Full pages go in runs: one UFFDIO_COPY each on the destination.
    ch.run.get_or_insert_with(Default::default);
    // Slices of a run each, smaller under a low bandwidth limit (each sender's slice is its
    // share of one pacing slice).
    let slice_pages = paced_batch(sh.bandwidth.map(|b| b / n as u64), RUN_PAGES);
    let mut last_sent = Instant::now();
    let mut chunk = 0usize;
    for (ri, r) in regions.iter().enumerate() {
        let total = r.pages();
        let mut at = 0usize;
        while at < total {
            let count = CHUNK_PAGES.min(total - at);
            let mine = chunk % n == i;
            chunk += 1;
            let first = at;
            at += count;
            if !mine || !pending.any_in(ri, first, count) {
                continue;
            }
            // The source's guest is paused for good: a page never populated is zero.
            let populated = vm.populated_pages_in(r, first, count)?;
            for slice in (0..count).step_by(slice_pages) {
                if sh.stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                if let Some(limit) = sh.bandwidth {
                    loop {
                        let wait = pace(limit, sh.bytes.load(Ordering::Relaxed), sh.start);
                        if wait.is_zero() || sh.stop.load(Ordering::Relaxed) {
                            break;
                        }
                        std::thread::sleep(wait.min(PACE_SLICE));
                        if last_sent.elapsed() >= HEARTBEAT_INTERVAL {
                            ch.w.section(Section::Heartbeat, &[])?;
                            ch.w.flush()?;
                            last_sent = Instant::now();
                        }
                    }
                }
                let before = ch.w.bytes;
                let mut taken = 0u64;
                for k in slice..(slice + slice_pages).min(count) {
                    let p = first + k;
                    if !pending.claim(ri, p) {
                        continue;
                    }
                    taken += 1;
                    let gpa = r.gpa + (p * PAGE_SIZE) as u64;
                    if populated.get(k) {
                        ch.page_at(vm, gpa, false)?;
                    } else {
                        ch.batch.push_zero(gpa);
                        if ch.batch.len() >= RamBatch::PAGES {
                            ch.flush_batch()?;
                        }
                    }
                }
                if taken == 0 {
                    continue;
                }
                ch.flush_batch()?;
                ch.w.flush()?;
                last_sent = Instant::now();
                sh.bytes
                    .fetch_add(ch.w.bytes.saturating_sub(before), Ordering::Relaxed);
                sh.pages.fetch_add(taken, Ordering::Relaxed);
            }
        }
    }
    ch.flush_batch()?;
    ch.w.section(Section::End, &[])?;
    ch.w.flush()?;
    Ok(())
}

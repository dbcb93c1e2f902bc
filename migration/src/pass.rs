//! One precopy pass of RAM, source side: guest RAM in chunks of [`CHUNK_PAGES`], each chunk's
//! dirty tracking re-armed just before its pages are read (small `KVM_CLEAR_DIRTY_LOG` calls
//! instead of one re-protection of the whole slot), sent on the main stream or split over the RAM
//! channels (`channels.rs`).

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::channels::ChannelSender;
use crate::error::MigrationError;
use crate::outgoing::{is_zero, PageSender};
use crate::progress::StatusCell;
use crate::stream::{RamBatch, Section};
use crate::{DirtyBitmap, MigratableVm, RamRegion, PAGE_SIZE};

/// Pages re-armed and handed to one channel at a time (4 MiB): small enough that KVM holds its
/// mmu_lock only briefly, large enough that the ioctl's cost vanishes.
pub const CHUNK_PAGES: usize = 1024;

/// Which pages a pass sends.
pub(crate) enum PassPages<'a> {
    /// The first pass: every populated page (untouched ones are zero there already).
    First,
    /// The pages set in these bitmaps, one per region.
    Dirty(&'a [DirtyBitmap]),
}

/// Whether a pass re-arms dirty tracking of what it sends (not once the guest is paused).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rearm {
    Yes,
    No,
}

const ONES: [u64; CHUNK_PAGES / 64] = [u64::MAX; CHUNK_PAGES / 64];

/// A sender's share of a pass: chunks `index` modulo `of`; it stops early (without error) once
/// `stop` is set (another channel failed), and fails with `Cancelled` on `migrate-cancel`.
#[derive(Clone, Copy)]
pub(crate) struct Share<'a> {
    index: usize,
    of: usize,
    stop: &'a AtomicBool,
    cancel: Option<&'a StatusCell>,
}

/// Pages in one RAM run section (1 MiB of data).
pub const RUN_PAGES: usize = 256;
/// A RAM run's header: gpa u64 LE, count u32 LE.
pub const RUN_HEAD: usize = 12;

/// Consecutive full pages collected for one RAM run section.
#[derive(Default)]
pub(crate) struct RunBuilder {
    buf: Vec<u8>,
    start: u64,
    pages: usize,
}

impl<W: Write> PageSender<W> {
    /// Sends the RAM run collected so far, if any.
    pub(crate) fn flush_run(&mut self) -> Result<(), MigrationError> {
        let Some(run) = self.run.as_mut() else {
            return Ok(());
        };
        if run.pages == 0 {
            return Ok(());
        }
        run.buf[..8].copy_from_slice(&run.start.to_le_bytes());
        run.buf[8..RUN_HEAD].copy_from_slice(&(run.pages as u32).to_le_bytes());
        self.w.section(Section::RamRun, &run.buf)?;
        run.buf.clear();
        run.pages = 0;
        Ok(())
    }

    /// Adds a full page to the current run (a new run when it does not follow on).
    fn push_run(&mut self, gpa: u64) -> Result<(), MigrationError> {
        let follows = self.run.as_ref().is_some_and(|r| {
            r.pages > 0 && r.pages < RUN_PAGES && r.start + (r.pages * PAGE_SIZE) as u64 == gpa
        });
        if !follows {
            self.flush_run()?;
        }
        let Some(run) = self.run.as_mut() else {
            return Ok(());
        };
        if run.pages == 0 {
            run.buf.resize(RUN_HEAD, 0);
            run.start = gpa;
        }
        run.buf.extend_from_slice(&self.page);
        run.pages += 1;
        self.batch.full += 1;
        Ok(())
    }

    /// Sends one page; zero pages of the first pass are only counted.
    pub(crate) fn page_at(
        &mut self,
        vm: &dyn MigratableVm,
        gpa: u64,
        first_pass: bool,
    ) -> Result<(), MigrationError> {
        vm.read_ram(gpa, &mut self.page)?;
        if is_zero(&self.page) {
            if first_pass {
                self.batch.zero += 1;
            } else {
                self.batch.push_zero(gpa);
            }
        } else if self.run.is_some() {
            self.push_run(gpa)?;
        } else {
            self.batch.push_full(gpa, &self.page);
        }
        if self.batch.len() >= RamBatch::PAGES {
            self.flush_batch()?;
        }
        Ok(())
    }

    /// Sends the chunks whose global index (counted over all regions) is `share.index` modulo
    /// `share.of`. Returns
    /// early, without error, once `stop` is set (another channel failed).
    pub(crate) fn send_chunks(
        &mut self,
        vm: &dyn MigratableVm,
        regions: &[RamRegion],
        pages: &PassPages,
        rearm: Rearm,
        share: Share<'_>,
    ) -> Result<(), MigrationError> {
        let mut index = 0usize;
        // Bytes of this sender already counted in the live status.
        let mut reported = self.w.bytes;
        for (ri, r) in regions.iter().enumerate() {
            let total = r.pages();
            let mut first = 0usize;
            while first < total {
                let count = CHUNK_PAGES.min(total - first);
                let (chunk, at) = (index, first);
                index += 1;
                first += count;
                let Share {
                    index: mine,
                    of,
                    stop,
                    cancel,
                } = share;
                if chunk % of != mine {
                    continue;
                }
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                if let Some(c) = cancel {
                    // Progress within a pass (the main stream's figures come at its end).
                    let sent = self.w.bytes - reported;
                    reported = self.w.bytes;
                    let mut cancelled = false;
                    c.update(|s| {
                        s.bytes += sent;
                        cancelled = s.cancel_requested;
                    });
                    if cancelled {
                        return Err(MigrationError::Cancelled);
                    }
                }
                match pages {
                    PassPages::First => {
                        // Re-armed before the populated check looks: a page the guest populates after the
                        // look is logged and goes in the next pass.
                        if rearm == Rearm::Yes {
                            vm.rearm_dirty(ri, at, count, &ONES[..count.div_ceil(64)])?;
                        }
                        let populated = vm.populated_pages_in(r, at, count)?;
                        self.batch.zero += (count - populated.count()) as u64;
                        for p in populated.iter() {
                            self.page_at(vm, r.gpa + ((at + p) * PAGE_SIZE) as u64, true)?;
                        }
                    }
                    PassPages::Dirty(maps) => {
                        let Some(map) = maps.get(ri) else {
                            continue;
                        };
                        let words = map.words_of(at, count);
                        if words.iter().all(|w| *w == 0) {
                            continue;
                        }
                        if rearm == Rearm::Yes {
                            vm.rearm_dirty(ri, at, count, words)?;
                        }
                        for (wi, &w) in words.iter().enumerate() {
                            let mut bits = w;
                            while bits != 0 {
                                let page = at + wi * 64 + bits.trailing_zeros() as usize;
                                bits &= bits - 1;
                                if page < at + count {
                                    self.page_at(vm, r.gpa + (page * PAGE_SIZE) as u64, false)?;
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// Sends one pass (number `pass`): on the main stream, or split over `channels` by chunk index
/// (a page always travels on the same channel, so its passes arrive in order). With channels,
/// each one ends its share with a pass marker and the main stream then carries the same marker:
/// the destination applies nothing that follows it before every channel delivered the pass.
#[allow(clippy::too_many_arguments)]
pub(crate) fn send_pass<W: Write>(
    tx: &mut PageSender<W>,
    channels: &mut [ChannelSender],
    vm: &dyn MigratableVm,
    regions: &[RamRegion],
    pages: PassPages,
    rearm: Rearm,
    pass: u32,
) -> Result<(), MigrationError> {
    let stop = AtomicBool::new(false);
    let cancel = tx.cancel.clone();
    if channels.is_empty() {
        let all = Share {
            index: 0,
            of: 1,
            stop: &stop,
            cancel: None,
        };
        tx.send_chunks(vm, regions, &pages, rearm, all)?;
        return tx.flush_batch();
    }
    let n = channels.len();
    let busy = Busy {
        left: std::sync::Mutex::new(n),
        changed: std::sync::Condvar::new(),
    };
    let results: Vec<Result<(), MigrationError>> = std::thread::scope(|s| {
        let mut handles = Vec::new();
        let mut results = Vec::new();
        for (i, ch) in channels.iter_mut().enumerate() {
            let (stop, pages, cancel, busy) = (&stop, &pages, cancel.as_ref(), &busy);
            let spawned = std::thread::Builder::new()
                .name(format!("migration-sender-{i}"))
                .spawn_scoped(s, move || {
                    crate::thread_started("migration-sender");
                    let sent = ch
                        .send_chunks(
                            vm,
                            regions,
                            pages,
                            rearm,
                            Share {
                                index: i,
                                of: n,
                                stop,
                                cancel,
                            },
                        )
                        .and_then(|_| ch.flush_batch())
                        .and_then(|_| {
                            ch.w.record(Section::PassDone, &pass)?;
                            ch.w.flush()?;
                            Ok(())
                        });
                    if sent.is_err() {
                        stop.store(true, Ordering::Relaxed);
                    }
                    busy.done();
                    let sent = sent.and_then(|_| busy.heartbeat_until_all_done(ch, stop));
                    match sent {
                        Err(MigrationError::Cancelled) | Ok(()) => sent,
                        Err(e) => {
                            stop.store(true, Ordering::Relaxed);
                            Err(MigrationError::Channel {
                                index: i,
                                source: Box::new(e),
                            })
                        }
                    }
                });
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    busy.done();
                    results.push(Err(MigrationError::Vm(crate::VmSideError(format!(
                        "starting a channel sender: {e}"
                    )))));
                }
            }
        }
        for h in handles {
            results.push(h.join().unwrap_or_else(|_| {
                Err(MigrationError::Vm(crate::VmSideError(
                    "a channel sender panicked".into(),
                )))
            }));
        }
        results
    });
    let mut cancelled = false;
    for r in results {
        match r {
            Err(MigrationError::Cancelled) => cancelled = true,
            Err(e) => return Err(e),
            Ok(()) => {}
        }
    }
    if cancelled {
        tx.check_cancel()?;
        return Err(MigrationError::Cancelled);
    }
    if stop.load(Ordering::Relaxed) {
        return Err(MigrationError::NoAnswer(
            "a RAM channel stopped the pass".into(),
        ));
    }
    tx.w.record(Section::PassDone, &pass)?;
    Ok(())
}

/// The channel senders still sending their share of a pass. One that is done keeps its
/// connection alive with heartbeats until the others are (a share can be much smaller than the
/// rest, and the destination takes a silent connection for a dead one).
struct Busy {
    left: std::sync::Mutex<usize>,
    changed: std::sync::Condvar,
}

impl Busy {
    fn done(&self) {
        let mut left = self.left.lock().unwrap_or_else(|e| e.into_inner());
        *left = left.saturating_sub(1);
        self.changed.notify_all();
    }

    fn heartbeat_until_all_done(
        &self,
        ch: &mut ChannelSender,
        stop: &AtomicBool,
    ) -> Result<(), MigrationError> {
        let mut left = self.left.lock().unwrap_or_else(|e| e.into_inner());
        while *left > 0 && !stop.load(Ordering::Relaxed) {
            let (guard, waited) = self
                .changed
                .wait_timeout(left, crate::peer::HEARTBEAT_INTERVAL)
                .unwrap_or_else(|e| e.into_inner());
            left = guard;
            if waited.timed_out() && *left > 0 {
                // Not under the lock: a slow write must not hold up the others' `done`.
                drop(left);
                ch.w.section(Section::Heartbeat, &[])?;
                ch.w.flush()?;
                left = self.left.lock().unwrap_or_else(|e| e.into_inner());
            }
        }
        Ok(())
    }
}

/// Bytes, full pages and zero pages sent so far on the main stream and every channel.
pub(crate) fn totals<W: Write>(tx: &PageSender<W>, channels: &[ChannelSender]) -> (u64, u64, u64) {
    channels.iter().fold(
        (tx.w.bytes, tx.batch.full, tx.batch.zero),
        |(b, f, z), c| (b + c.w.bytes, f + c.batch.full, z + c.batch.zero),
    )
}

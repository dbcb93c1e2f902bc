//! Postcopy, source side: the switch (sent map masked with the dirty bitmap gives the discard
//! list), the device state as one package, then background push with page requests served first.

use std::io::Write;
use std::time::{Duration, Instant};

use crate::channels::ChannelSender;
use crate::error::MigrationError;
use crate::outgoing::{send_state, PageSender};
use crate::peer::{PeerEvent, PeerReader, HEARTBEAT_INTERVAL};
use crate::progress::Phase;
use crate::progress::StatusCell;
use crate::stream::{Frame, Section};
use crate::transport::ACK_TIMEOUT;
use crate::{DirtyBitmap, MigratableVm, RamRegion, PAGE_SIZE};

use super::{ranges, DiscardRecord, PageRefusal, PageRequest};

/// The preempt channel's sender, if the destination agreed to one.
pub(super) type Preempt = PageSender<Box<dyn Write + Send>>;

/// A background push batch ends after this many pages or this long, or as soon as a page
/// request arrives.
const PUSH_BATCH_PAGES: usize = 16;
const PUSH_BATCH_TIME: Duration = Duration::from_millis(1);
/// A rate-limited push waits for requests in slices of at most this long.
pub(super) const PACE_SLICE: Duration = Duration::from_millis(5);

/// How long the background push must wait to stay within `bytes_per_s` after writing `bytes`
/// since `since` (zero when it may send now). Zero pages cost their marker only.
pub(super) fn pace(bytes_per_s: u64, bytes: u64, since: Instant) -> Duration {
    let due = Duration::from_secs_f64(bytes as f64 / bytes_per_s.max(1) as f64);
    due.saturating_sub(since.elapsed())
}

/// Pages a push batch (or a channel's slice) may hold: `most`, or under a `bandwidth` limit what
/// the limit allows in one pacing slice (at least one page), so the pacing stays fine-grained.
pub(super) fn paced_batch(bandwidth: Option<u64>, most: usize) -> usize {
    bandwidth.map_or(most, |rate| {
        let per_slice = rate as f64 * PACE_SLICE.as_secs_f64() / PAGE_SIZE as f64;
        (per_slice as usize).clamp(1, most)
    })
}

/// What the return path brings during postcopy.
pub(super) enum Incoming {
    Request(u64),
    Complete(super::CompleteRecord),
    /// The destination gave up before it ran the guest: this side still owns it.
    Refused(String),
    Broken(String),
}

impl From<PeerEvent> for Incoming {
    fn from(ev: PeerEvent) -> Self {
        match ev {
            PeerEvent::Frame(f) => Incoming::from_frame(f),
            PeerEvent::Broken(e) => Incoming::Broken(e),
        }
    }
}

impl Incoming {
    pub(super) fn from_frame(f: Frame) -> Self {
        match f.kind {
            Section::PageRequest => match f.decode::<PageRequest>() {
                Ok(r) => Incoming::Request(r.gpa),
                Err(e) => Incoming::Broken(e.to_string()),
            },
            Section::Complete => match f.decode::<super::CompleteRecord>() {
                Ok(c) => Incoming::Complete(c),
                Err(e) => Incoming::Broken(format!("bad completion record: {e}")),
            },
            Section::Abort => Incoming::Refused(f.decode().unwrap_or_else(|e| e.to_string())),
            other => Incoming::Broken(format!("unexpected {} section", other.name())),
        }
    }
}

pub(super) fn region_page(regions: &[RamRegion], gpa: u64) -> Option<(usize, usize)> {
    regions
        .iter()
        .position(|r| gpa >= r.gpa && gpa < r.gpa + r.len)
        .map(|i| (i, ((gpa - regions[i].gpa) / PAGE_SIZE as u64) as usize))
}

/// Switches to postcopy. `sent` says which pages the destination has (full after a precopy
/// pass, empty for pure postcopy); `pending` holds the pages dirtied since they were sent.
#[allow(clippy::too_many_arguments)]
pub(crate) fn switch<W: Write>(
    vm: &dyn MigratableVm,
    mut tx: PageSender<W>,
    regions: &[RamRegion],
    sent: Vec<DirtyBitmap>,
    mut pending: Vec<DirtyBitmap>,
    rx: PeerReader,
    preempt: Option<Preempt>,
    status: &StatusCell,
    start: Instant,
    paused: &mut bool,
    bandwidth: Option<u64>,
    mut channels: Vec<ChannelSender>,
) -> Result<(), MigrationError> {
    let paused_at_unix_ns = crate::progress::unix_ns();
    vm.pause()?;
    *paused = true;
    // From here the destination owns the guest; this copy must stay whole for the push.
    vm.inhibit_discards(true);
    for (p, d) in pending.iter_mut().zip(vm.fetch_dirty()?) {
        p.merge(&d);
    }
    vm.stop_dirty_log()?;
    // Sent, then dirtied again: those are the destination's stale pages; never-sent pages are
    // missing there too.
    let mut missing = Vec::new();
    for (s, d) in sent.iter().zip(&pending) {
        let mut discard = s.clone();
        discard.intersect(d);
        let mut never_sent = s.clone();
        never_sent.invert();
        discard.merge(&never_sent);
        missing.push(discard);
    }
    // Each RAM channel ends its precopy part here: the destination hands its connection to a
    // postcopy placer (the guest's pages are registered with userfaultfd from now on).
    for (i, ch) in channels.iter_mut().enumerate() {
        ch.w.section(Section::Run, &[])
            .and_then(|_| ch.w.flush())
            .map_err(|e| MigrationError::Channel {
                index: i,
                source: Box::new(e.into()),
            })?;
    }
    tx.w.record(
        Section::Discard,
        &DiscardRecord {
            ranges: ranges(regions, &missing),
        },
    )?;
    send_state(&mut tx.w, &vm.save_state()?)?;
    tx.w.record(Section::Run, &crate::state::EndRecord { paused_at_unix_ns })?;
    // Until this flush completes no whole RUN went out (its checksum comes last): a failure
    // before here leaves the guest with this side. From here on the destination may run it.
    tx.w.flush()?;
    push(
        vm,
        tx,
        regions,
        missing,
        rx,
        preempt,
        status,
        start,
        Vec::new(),
        bandwidth,
        channels,
    )
}

/// Answers page requests: on the preempt channel if there is one (a broken one is given up;
/// the pages go on the main stream then), else on the main stream.
pub(super) struct Answers {
    pub(super) preempt: Option<Preempt>,
    pub(super) requested: u64,
    /// Requested pages that went on the preempt channel.
    pub(super) preempted: u64,
}

impl Answers {
    pub(super) fn send<W: Write>(
        &mut self,
        vm: &dyn MigratableVm,
        tx: &mut PageSender<W>,
        gpa: u64,
    ) -> Result<(), MigrationError> {
        let fast = self.preempt.as_mut().map(|c| {
            c.send_one(vm, gpa)
                .and_then(|_| c.flush_batch())
                .and_then(|_| c.w.flush().map_err(MigrationError::from))
        });
        if let Some(Err(e)) = &fast {
            log::warn!("postcopy: preempt channel failed ({e}); using the main stream");
            self.preempt = None;
        }
        if matches!(fast, Some(Ok(()))) {
            self.preempted += 1;
        } else {
            // The main stream's push may have a run under way: it goes first.
            tx.send_one(vm, gpa)?;
            tx.flush_batch()?;
            tx.w.flush()?;
        }
        self.requested += 1;
        Ok(())
    }

    /// Tells the destination a request is outside guest RAM (an error reply, not a crash: it
    /// decides what to do).
    pub(super) fn refuse<W: Write>(tx: &mut PageSender<W>, gpa: u64) -> Result<(), MigrationError> {
        log::error!("postcopy: page request for {gpa:#x} is outside guest RAM");
        let refusal = PageRefusal {
            gpa,
            reason: "outside guest RAM".into(),
        };
        tx.w.record(Section::PageRefused, &refusal)?;
        tx.w.flush()?;
        Ok(())
    }
}

/// What a write failure after RUN means: the destination's refusal if it gave up before it ran
/// the guest (the guest is still only here), else a broken postcopy (this side pauses).
pub(super) fn broken(rx: &PeerReader, e: String) -> MigrationError {
    match rx.abort_within(Duration::from_millis(500)) {
        Some(why) => refused(why),
        None => MigrationError::PostcopyBroken(e),
    }
}

pub(super) fn refused(why: String) -> MigrationError {
    MigrationError::Rejected(format!("{why} (it did not run the guest)"))
}

/// RUN -> END: pushes every page in `missing` in the background, serving the destination's
/// requests first (`requests`: ones already received), then waits for its completion. Used
/// after the switch and again by a recovery. `bandwidth` (bytes/s) limits the background push
/// only (QEMU's max-postcopy-bandwidth): requests always go at once. With RAM `channels` the
/// push is split over them (`channel_push`); requests keep the preempt channel or this stream.
#[allow(clippy::too_many_arguments)]
pub(crate) fn push<W: Write>(
    vm: &dyn MigratableVm,
    mut tx: PageSender<W>,
    regions: &[RamRegion],
    mut missing: Vec<DirtyBitmap>,
    rx: PeerReader,
    preempt: Option<Preempt>,
    status: &StatusCell,
    start: Instant,
    requests: Vec<u64>,
    bandwidth: Option<u64>,
    channels: Vec<ChannelSender>,
) -> Result<(), MigrationError> {
    let missing_total: usize = missing.iter().map(|m| m.count()).sum();
    status.update(|s| {
        s.phase = Phase::Postcopy;
        s.remaining_bytes = (missing_total * PAGE_SIZE) as u64;
    });
    let mut answers = Answers {
        preempt,
        requested: 0,
        preempted: 0,
    };
    if !channels.is_empty() {
        let done = super::channel_push::push(
            vm,
            &mut tx,
            regions,
            &missing,
            &rx,
            &mut answers,
            status,
            start,
            requests,
            bandwidth,
            channels,
        )?;
        return finish(tx, &rx, regions, status, start, &answers, done);
    }
    let (push_start, push_base) = (Instant::now(), tx.w.bytes);
    let broken = |e: MigrationError| broken(&rx, e.to_string());
    let next_event = || rx.try_next().map(Incoming::from);
    let mut last_sent = Instant::now();
    // Full pages go in runs (one UFFDIO_COPY each on the destination). Without the preempt
    // channel requested pages queue behind the push batch, so it stays small then.
    tx.run = Some(Default::default());
    let batch_pages = paced_batch(
        bandwidth,
        if answers.preempt.is_some() {
            crate::pass::RUN_PAGES
        } else {
            PUSH_BATCH_PAGES
        },
    );

    let (mut pushed, mut left) = (0u64, missing_total);
    let mut cursor = (0usize, 0usize);
    let mut complete = None;
    // An event that arrived during a push batch (it ends the batch early).
    let mut early: Option<Incoming> = None;
    let mut queued: std::collections::VecDeque<Incoming> =
        requests.into_iter().map(Incoming::Request).collect();
    while left > 0 {
        // Requests first: the guest is waiting for those.
        while let Some(ev) = early
            .take()
            .or_else(|| queued.pop_front())
            .or_else(next_event)
        {
            match ev {
                Incoming::Request(gpa) => match region_page(regions, gpa) {
                    Some((ri, p)) if missing[ri].get(p) => {
                        answers.send(vm, &mut tx, gpa).map_err(broken)?;
                        missing[ri].unset(p);
                        left -= 1;
                        // Continue the background scan near what the guest needs.
                        cursor = (ri, p + 1);
                    }
                    Some(_) => {}
                    None => Answers::refuse(&mut tx, gpa).map_err(broken)?,
                },
                Incoming::Complete(v) => complete = Some(v),
                Incoming::Refused(why) => return Err(refused(why)),
                Incoming::Broken(e) => return Err(broken(MigrationError::PostcopyBroken(e))),
            }
        }
        // Then a batch of the background push, from the cursor on; bounded in time too, so a
        // source whose own pages are slow to read (lazy, swapped) still answers requests soon.
        let mut n = 0;
        let batch_start = Instant::now();
        let wait = bandwidth.map_or(Duration::ZERO, |r| {
            pace(r, tx.w.bytes.saturating_sub(push_base), push_start)
        });
        if !wait.is_zero() {
            // Over the limit: wait for a request instead (served at the top of the loop).
            early = rx.wait_next(wait.min(PACE_SLICE)).map(Incoming::from);
        }
        while wait.is_zero()
            && n < batch_pages
            && left > 0
            && batch_start.elapsed() < PUSH_BATCH_TIME
        {
            if let Some(ev) = next_event() {
                early = Some(ev);
                break;
            }
            let (ri, from) = cursor;
            let Some(p) = missing[ri].next_set_from(from) else {
                cursor = ((ri + 1) % regions.len(), 0);
                continue;
            };
            let gpa = regions[ri].gpa + (p * PAGE_SIZE) as u64;
            tx.page_at(vm, gpa, false).map_err(broken)?;
            missing[ri].unset(p);
            cursor = (ri, p + 1);
            left -= 1;
            pushed += 1;
            n += 1;
        }
        if n > 0 {
            last_sent = Instant::now();
        } else if last_sent.elapsed() >= HEARTBEAT_INTERVAL {
            // Nothing to send for a while (slow pages): tell the destination this side lives.
            tx.w.section(Section::Heartbeat, &[])
                .map_err(|e| broken(e.into()))?;
            last_sent = Instant::now();
        }
        tx.flush_batch().map_err(broken)?;
        tx.w.flush().map_err(|e| broken(e.into()))?;
        status.update(|s| {
            s.bytes = tx.w.bytes;
            s.remaining_bytes = (left * PAGE_SIZE) as u64;
            s.total_ms = start.elapsed().as_secs_f64() * 1e3;
        });
    }
    finish(
        tx,
        &rx,
        regions,
        status,
        start,
        &answers,
        Pushed {
            pages: pushed,
            channel_bytes: 0,
            channel_pages: (0, 0),
            complete,
        },
    )
}

/// What the background push did, for the end figures.
pub(super) struct Pushed {
    pub(super) pages: u64,
    /// Bytes the RAM channels carried since they opened (the main stream counts its own).
    pub(super) channel_bytes: u64,
    /// Full and zero pages the RAM channels carried since they opened.
    pub(super) channel_pages: (u64, u64),
    /// The destination's completion, if it came during the push.
    pub(super) complete: Option<super::CompleteRecord>,
}

/// END, then the destination's completion; the end figures.
fn finish<W: Write>(
    mut tx: PageSender<W>,
    rx: &PeerReader,
    regions: &[RamRegion],
    status: &StatusCell,
    start: Instant,
    answers: &Answers,
    pushed: Pushed,
) -> Result<(), MigrationError> {
    let mut complete = pushed.complete;
    tx.w.record(Section::End, &crate::state::EndRecord::default())
        .and_then(|_| tx.w.flush())
        .map_err(|e| broken(rx, e.to_string()))?;
    let deadline = Instant::now() + ACK_TIMEOUT;
    while complete.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx
            .next(left.max(Duration::from_millis(1)))
            .map(Incoming::from_frame)
        {
            Ok(Incoming::Complete(v)) => complete = Some(v),
            // Every page went out: a request that crossed END needs no answer, unless it is
            // outside RAM (the destination waits for the refusal).
            Ok(Incoming::Request(gpa)) => {
                if region_page(regions, gpa).is_none() {
                    Answers::refuse(&mut tx, gpa).map_err(|e| broken(rx, e.to_string()))?;
                }
            }
            Ok(Incoming::Refused(e) | Incoming::Broken(e)) => return Err(broken(rx, e)),
            Err(e) => return Err(broken(rx, e.to_string())),
        }
    }
    let total = start.elapsed().as_secs_f64();
    status.update(|s| {
        tx.record_completion(s, total);
        s.bytes += pushed.channel_bytes;
        s.pages_full += pushed.channel_pages.0;
        s.pages_zero += pushed.channel_pages.1;
        s.throughput_mbps = s.bytes as f64 / total / 1e6;
        s.phase = Phase::End;
        let complete = complete.unwrap_or_default();
        // Pause here to resume there: only the destination knows when it resumed.
        s.downtime_ms = complete.downtime_ms.unwrap_or(f64::NAN);
        s.postcopy = Some(super::PostcopyStatus {
            complete,
            source: Some(super::SourcePushFigures {
                source_pages_requested: answers.requested,
                source_pages_preempt: answers.preempted,
                source_pages_pushed: pushed.pages,
            }),
        });
    });
    Ok(())
}

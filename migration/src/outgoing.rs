//! The source side of a migration: precopy with dirty logging, then stop-and-copy.

use std::io::Write;
use std::time::{Duration, Instant};

// Kept here too: users named it `outgoing::MigrationError` before it moved.
use crate::channels::ChannelSender;
pub use crate::error::MigrationError;
use crate::pass::{send_pass, totals, PassPages, Rearm};
use crate::peer::PeerReader;
use crate::postcopy::preempt::AdviseRecord;
use crate::progress::Phase;
use crate::progress::{mb, MigrationState, ProgressLine, StatusCell};
use crate::state::{EndRecord, VmState};
use crate::stream::{RamBatch, Section, StreamError, StreamReader, StreamWriter};
use crate::transport::{self, Endpoint, ACK_TIMEOUT};
use crate::{DirtyBitmap, MigratableVm, RamRegion, PAGE_SIZE};

#[derive(Debug, Clone)]
pub struct Params {
    /// Stop the guest when the rest can be sent within this budget at the measured bandwidth.
    pub downtime: Duration,
    /// Stop the guest after this many dirty-page iterations at the latest.
    pub max_iterations: u32,
    /// Stop the guest when precopy has run this long (or switch to postcopy, if enabled).
    pub timeout: Duration,
    /// Postcopy is allowed: switch on `migrate-start-postcopy`, after this many iterations, or
    /// when the timeout expires, instead of a long stop-and-copy.
    pub postcopy: bool,
    pub postcopy_after_iterations: Option<u32>,
    /// Requested postcopy pages on a second connection (if the destination agrees).
    pub postcopy_preempt: bool,
    /// Limit on the postcopy background push, bytes/s (`None`: as fast as it goes). Requested
    /// pages are never held back.
    pub postcopy_bandwidth: Option<u64>,
    /// RAM channels (`URI,channels=N`): each precopy pass, and the postcopy push, is split over
    /// N extra connections (placed straight into guest memory there, or with userfaultfd after
    /// the switch); 0 sends RAM on the main connection.
    /// None: [`crate::channels::default_channels`].
    pub channels: Option<usize>,
    /// How dirty passes are spaced so that a writing guest keeps running.
    pub pacing: crate::pacing::PassPacing,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            downtime: Duration::from_millis(300),
            max_iterations: 30,
            timeout: Duration::from_secs(120),
            postcopy: false,
            postcopy_after_iterations: None,
            postcopy_preempt: true,
            postcopy_bandwidth: None,
            channels: None,
            pacing: crate::pacing::PassPacing::default(),
        }
    }
}

/// Writes pages into RAM sections, batching and counting.
pub(crate) struct PageSender<W: Write> {
    pub(crate) w: StreamWriter<W>,
    pub(crate) batch: RamBatch,
    pub(crate) page: Vec<u8>,
    /// Checked between batches until the switch: `migrate-cancel` ends precopy there.
    pub(crate) cancel: Option<StatusCell>,
    /// RAM channels: full pages go in runs the destination places directly.
    pub(crate) run: Option<crate::pass::RunBuilder>,
}

impl<W: Write> PageSender<W> {
    /// A sender with no cancellation check (postcopy's preempt channel, recovery).
    pub(crate) fn new(w: StreamWriter<W>, batch: RamBatch, page: Vec<u8>) -> Self {
        PageSender {
            w,
            batch,
            page,
            cancel: None,
            run: None,
        }
    }

    /// Sends one page now (a postcopy request or push).
    pub(crate) fn send_one(
        &mut self,
        vm: &dyn MigratableVm,
        gpa: u64,
    ) -> Result<(), MigrationError> {
        vm.read_ram(gpa, &mut self.page)?;
        if is_zero(&self.page) {
            self.batch.push_zero(gpa);
        } else {
            self.batch.push_full(gpa, &self.page);
        }
        Ok(())
    }

    /// The end figures both ways of finishing share: bytes, pages, total time, throughput.
    pub(crate) fn record_completion(&self, s: &mut crate::progress::MigrationStatus, total_s: f64) {
        s.state = MigrationState::Completed;
        s.bytes = self.w.bytes;
        s.pages_full = self.batch.full;
        s.pages_zero = self.batch.zero;
        s.remaining_bytes = 0;
        s.total_ms = total_s * 1e3;
        s.throughput_mbps = self.w.bytes as f64 / total_s / 1e6;
    }

    pub(crate) fn flush_batch(&mut self) -> Result<(), MigrationError> {
        self.flush_run()?;
        // Counters stay in the batch; only the payload is taken.
        if !self.batch.is_empty() {
            self.w.section(Section::Ram, self.batch.payload())?;
            self.batch.clear();
        }
        self.check_cancel()
    }

    /// Ends the migration if `migrate-cancel` came: the destination hears it and drops the guest.
    pub(crate) fn check_cancel(&mut self) -> Result<(), MigrationError> {
        let mut cancelled = false;
        if let Some(c) = &self.cancel {
            // Progress within a pass too (a first pass of a large guest takes seconds).
            let bytes = self.w.bytes;
            c.update(|s| {
                s.bytes = bytes;
                cancelled = s.cancel_requested;
            });
        }
        if cancelled {
            let told = self
                .w
                .section(Section::Cancel, &[])
                .and_then(|_| self.w.flush());
            if let Err(e) = told {
                log::warn!("cannot tell the destination the migration was cancelled: {e}");
            }
            return Err(MigrationError::Cancelled);
        }
        Ok(())
    }
}

/// The device state package: vCPUs, clock, interrupt controllers, PIT, devices.
pub(crate) fn send_state<W: Write>(
    w: &mut StreamWriter<W>,
    state: &VmState,
) -> Result<(), StreamError> {
    w.record(Section::Vcpus, &state.vcpus)?;
    w.record(Section::Clock, &state.clock)?;
    w.record(
        Section::Irqchip,
        &(&state.pic_master, &state.pic_slave, &state.ioapic),
    )?;
    w.record(Section::Pit, &state.pit)?;
    w.record(Section::Devices, &state.devices)
}

/// ADVISE: asks the destination whether it can do postcopy; fails the migration cleanly when not.
fn advise<W: Write>(
    w: &mut StreamWriter<W>,
    reader: Option<&PeerReader>,
    preempt: bool,
) -> Result<bool, MigrationError> {
    let Some(rx) = reader else {
        return Err(MigrationError::Rejected(
            "postcopy needs a connection with a return path (unix: or tcp:)".into(),
        ));
    };
    w.record(Section::Advise, &AdviseRecord { preempt })?;
    w.flush()?;
    let answer = rx
        .next(ACK_TIMEOUT)
        .map_err(|e| MigrationError::NoAnswer(e.to_string()))?;
    match answer.kind {
        Section::Advise => Ok(preempt && AdviseRecord::decode(&answer.payload).preempt),
        Section::Abort => Err(MigrationError::Rejected(
            answer.decode::<String>().unwrap_or_else(|e| e.to_string()),
        )),
        other => Err(MigrationError::NoAnswer(format!(
            "unexpected {} section",
            other.name()
        ))),
    }
}

/// Whether a page is all zeros (word-wise: a byte loop costs microseconds per page).
pub fn is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: any initialised bytes are valid u64s; align_to only splits the slice.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|b| *b == 0) && words.iter().all(|w| *w == 0) && tail.iter().all(|b| *b == 0)
}

/// Runs a whole outgoing migration. On error the guest is left running (resumed if it was paused)
/// and the error says what happened; on success the guest is paused for good (it lives on at the
/// destination).
pub fn migrate(
    vm: &dyn MigratableVm,
    endpoint: &Endpoint,
    params: &Params,
    status: &StatusCell,
) -> Result<(), MigrationError> {
    let start = Instant::now();
    let id = crate::MigrationId::random().map_err(MigrationError::Identity)?;
    status.update(|s| {
        *s = Default::default();
        s.state = MigrationState::Active;
        s.role = crate::progress::Role::Source;
        s.endpoint = endpoint.to_string();
        s.migration_id = Some(id);
    });
    let mut paused = false;
    let result = run(vm, endpoint, params, status, start, &mut paused, id);
    if let Err(e) = &result {
        let _ = vm.stop_dirty_log();
        let end = e.end_state();
        // Once the switch was sent the destination may run the guest: resuming here could run
        // it twice. Only a failure before it (or the destination's explicit refusal) gives the
        // guest back to this side.
        if paused && !end.guest_may_run_elsewhere() {
            vm.inhibit_discards(false);
            if let Err(re) = vm.resume() {
                log::error!("cannot resume the guest after a failed migration: {re}");
            }
        }
        status.update(|s| {
            s.state = end;
            s.error = Some(e.to_string());
            s.total_ms = start.elapsed().as_secs_f64() * 1e3;
        });
    }
    result
}

/// A snapshot cannot be cancelled once it starts (it is short and pauses the guest anyway).
fn begin_switch_snapshot(status: &StatusCell) -> Result<(), MigrationError> {
    if cancel_came_first(status) {
        return Err(MigrationError::Cancelled);
    }
    Ok(())
}

/// Marks the switch as started unless a cancel came first (one lock: `migrate-cancel` sees
/// either a cancelled precopy or a switch it must refuse). True when the cancel won.
fn cancel_came_first(status: &StatusCell) -> bool {
    let mut cancelled = false;
    status.update(|s| {
        cancelled = s.cancel_requested;
        s.switching = !cancelled;
    });
    cancelled
}

/// Starts the switch of a live migration; a cancel that came first ends it (and tells the
/// destination).
fn begin_switch<W: Write>(
    tx: &mut PageSender<W>,
    status: &StatusCell,
) -> Result<(), MigrationError> {
    if cancel_came_first(status) {
        tx.check_cancel()?;
    }
    tx.cancel = None;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run(
    vm: &dyn MigratableVm,
    endpoint: &Endpoint,
    params: &Params,
    status: &StatusCell,
    start: Instant,
    paused: &mut bool,
    id: crate::MigrationId,
) -> Result<(), MigrationError> {
    if let Endpoint::Unix { path, local: true } = endpoint {
        return crate::local::run(vm, path, params, status, start, paused, id);
    }
    // A snapshot: the guest pauses once and is written whole, in the snapshot layout.
    if let Endpoint::File(path) = endpoint {
        begin_switch_snapshot(status)?;
        vm.pause()?;
        *paused = true;
        return crate::snapshot::write(vm, path, status);
    }
    // Postcopy makes discarded pages missing with MADV_DONTNEED, which does not drop the pages
    // of a shared mapping: the guest would read stale memory.
    if params.postcopy && !vm.shared_memory_fds().is_empty() {
        return Err(MigrationError::Rejected(
            "postcopy is not supported with shared=on guest RAM (start the source without \
--postcopy)"
                .into(),
        ));
    }
    let mut channel = transport::connect(endpoint).map_err(|source| MigrationError::Connect {
        endpoint: endpoint.to_string(),
        source,
    })?;
    let writer = channel
        .writer
        .take()
        .ok_or_else(|| MigrationError::NoAnswer("endpoint cannot be written".into()))?;
    let mut tx = PageSender {
        w: StreamWriter::new(writer),
        batch: RamBatch::default(),
        page: vec![0u8; PAGE_SIZE],
        cancel: Some(status.clone()),
        run: None,
    };
    tx.w.header(id)?;
    tx.w.record(Section::Config, &vm.config())?;
    let mut reader = match channel.reader.take() {
        Some(r) => Some(
            PeerReader::start(StreamReader::new(r))
                .map_err(|e| MigrationError::NoAnswer(format!("starting the return path: {e}")))?,
        ),
        None => None,
    };
    let pure_postcopy = params.postcopy && params.postcopy_after_iterations == Some(0);
    let channel_count = params
        .channels
        .unwrap_or_else(crate::channels::default_channels);
    // Before ADVISE: the destination accepts exactly these connections at the Channels section,
    // and the preempt channel only after it answered ADVISE.
    let mut channels = if channel_count > 0 {
        crate::channels::open(&mut tx.w, endpoint, channel_count, id)?
    } else {
        Vec::new()
    };
    status.update(|s| s.channels = channels.len() as u32);
    let mut preempt = None;
    if params.postcopy {
        if advise(&mut tx.w, reader.as_ref(), params.postcopy_preempt)? {
            preempt = crate::postcopy::preempt::open(endpoint, id);
        }
        status.update(|s| s.phase = Phase::Precopy);
    }
    let regions = vm.ram_regions();
    vm.start_dirty_log()?;
    let log_start = Instant::now();
    // Every page the dirty log reported: over the time it ran, the guest's write rate (in pages
    // written at least once per pass; a lower bound).
    let mut dirtied = 0u64;

    let mut progress = ProgressLine::default();
    let publish = |tx: &PageSender<_>,
                   channels: &[ChannelSender],
                   iteration: u32,
                   bw: f64,
                   dirty_rate: f64,
                   remaining: u64| {
        let (bytes, full, zero) = totals(tx, channels);
        status.update(|s| {
            s.iteration = iteration;
            s.bytes = bytes;
            s.pages_full = full;
            s.pages_zero = zero;
            s.throughput_mbps = bw / 1e6;
            s.dirty_rate_mbps = dirty_rate / 1e6;
            s.remaining_bytes = remaining;
            s.total_ms = start.elapsed().as_secs_f64() * 1e3;
        });
    };

    // Pure postcopy: switch before sending anything; every page is fetched or pushed after RUN.
    if pure_postcopy {
        begin_switch(&mut tx, status)?;
        let reader = reader
            .take()
            .ok_or_else(|| MigrationError::NoAnswer("postcopy needs a return path".into()))?;
        let none: Vec<DirtyBitmap> = regions
            .iter()
            .map(|r| DirtyBitmap::new(r.pages()))
            .collect();
        return crate::postcopy::source::switch(
            vm,
            tx,
            &regions,
            none.clone(),
            none,
            reader,
            preempt,
            status,
            start,
            paused,
            params.postcopy_bandwidth,
            channels,
        );
    }
    // Pass 0: everything that was ever populated.
    let pass_start = Instant::now();
    let mut pass = 0u32;
    send_pass(
        &mut tx,
        &mut channels,
        vm,
        &regions,
        PassPages::First,
        Rearm::Yes,
        pass,
    )?;
    tx.w.flush()?;
    let mut bandwidth =
        totals(&tx, &channels).0 as f64 / pass_start.elapsed().as_secs_f64().max(1e-6);
    let mut iteration = 0u32;
    let mut dirty_rate;
    // When the last pass began re-arming pages, and how many the guest had dirtied before it.
    let mut rearmed_at = pass_start;
    let mut faulted: Option<u64> = None;
    loop {
        if let Some(pages) = faulted {
            let until = params.pacing.next_rearm(rearmed_at, pages);
            let waited = crate::pacing::wait(
                until,
                start + params.timeout,
                &mut tx,
                &mut channels,
                status,
            )?;
            status.update(|s| s.paced_ms += waited.as_secs_f64() * 1e3);
        }
        let iter_start = Instant::now();
        let dirty = vm.fetch_dirty()?;
        let remaining: usize = dirty.iter().map(|d| d.count()).sum();
        faulted = Some(remaining as u64);
        let remaining_bytes = (remaining * PAGE_SIZE) as u64;
        dirtied += remaining_bytes;
        dirty_rate = dirtied as f64 / log_start.elapsed().as_secs_f64().max(1e-6);
        publish(
            &tx,
            &channels,
            iteration,
            bandwidth,
            dirty_rate,
            remaining_bytes,
        );
        progress.show(&status.get(), true);
        let expected = Duration::from_secs_f64(remaining_bytes as f64 / bandwidth.max(1.0));
        let converged = expected <= params.downtime;
        let switch = params.postcopy
            && !converged
            && (status.get().postcopy_requested
                || params
                    .postcopy_after_iterations
                    .is_some_and(|n| iteration >= n)
                || start.elapsed() >= params.timeout);
        if switch {
            begin_switch(&mut tx, status)?;
            // Every pass was delivered (the destination waited at its marker): the channels
            // carry the postcopy push now.
            let Some(reader) = reader.take() else {
                return Err(MigrationError::NoAnswer(
                    "postcopy needs a return path".into(),
                ));
            };
            // Precopy sent every page once (untouched ones are zero there already).
            let sent = regions
                .iter()
                .map(|r| DirtyBitmap::full(r.pages()))
                .collect();
            return crate::postcopy::source::switch(
                vm,
                tx,
                &regions,
                sent,
                dirty,
                reader,
                preempt,
                status,
                start,
                paused,
                params.postcopy_bandwidth,
                std::mem::take(&mut channels),
            );
        }
        if converged || iteration >= params.max_iterations || start.elapsed() >= params.timeout {
            if !converged {
                log::info!(
                    "precopy did not converge ({:.1} MB left after {iteration} iterations); stopping the guest",
                    mb(remaining_bytes)
                );
            }
            // The pages found dirty here are sent during the downtime, with the final set.
            begin_switch(&mut tx, status)?;
            return stop_and_copy(
                vm,
                Senders {
                    tx,
                    channels,
                    pass: pass + 1,
                },
                &regions,
                dirty,
                reader,
                status,
                start,
                paused,
                &mut progress,
            );
        }
        iteration += 1;
        pass += 1;
        let before = totals(&tx, &channels).0;
        rearmed_at = Instant::now();
        send_pass(
            &mut tx,
            &mut channels,
            vm,
            &regions,
            PassPages::Dirty(&dirty),
            Rearm::Yes,
            pass,
        )?;
        tx.w.record(Section::IterationDone, &iteration)?;
        tx.w.flush()?;
        bandwidth = (totals(&tx, &channels).0 - before) as f64
            / iter_start.elapsed().as_secs_f64().max(1e-6);
        publish(&tx, &channels, iteration, bandwidth, dirty_rate, 0);
        progress.show(&status.get(), false);
    }
}

/// After the end section: the destination's word that it runs the guest, or that it did not.
pub(crate) fn await_resumed(rx: &PeerReader) -> Result<(), MigrationError> {
    let answer = rx
        .next(ACK_TIMEOUT)
        .map_err(|e| MigrationError::Unconfirmed(e.to_string()))?;
    match answer.kind {
        Section::Resumed => Ok(()),
        // The destination says it did not run the guest: it is safe to run it here again.
        Section::Abort => {
            let why: String = answer.decode().unwrap_or_else(|e| e.to_string());
            Err(MigrationError::Rejected(why))
        }
        other => Err(MigrationError::Unconfirmed(format!(
            "unexpected {} section",
            other.name()
        ))),
    }
}

/// The main stream, the RAM channels, and the number the next pass gets.
struct Senders<W: Write> {
    tx: PageSender<W>,
    channels: Vec<ChannelSender>,
    pass: u32,
}

#[allow(clippy::too_many_arguments)]
fn stop_and_copy<W: Write>(
    vm: &dyn MigratableVm,
    senders: Senders<W>,
    regions: &[RamRegion],
    mut pending: Vec<DirtyBitmap>,
    reader: Option<PeerReader>,
    status: &StatusCell,
    start: Instant,
    paused: &mut bool,
    progress: &mut ProgressLine,
) -> Result<(), MigrationError> {
    let paused_at = Instant::now();
    let paused_at_unix_ns = crate::progress::unix_ns();
    vm.pause()?;
    *paused = true;
    for (p, d) in pending.iter_mut().zip(vm.fetch_dirty()?) {
        p.merge(&d);
    }
    let Senders {
        mut tx,
        mut channels,
        pass,
    } = senders;
    send_pass(
        &mut tx,
        &mut channels,
        vm,
        regions,
        PassPages::Dirty(&pending),
        Rearm::No,
        pass,
    )?;
    let (bytes, full, zero) = totals(&tx, &channels);
    // Delivered (the destination waits at the marker): the channels close before the end.
    channels.clear();
    vm.stop_dirty_log()?;
    send_state(&mut tx.w, &vm.save_state()?)?;
    tx.w.record(Section::End, &EndRecord { paused_at_unix_ns })?;
    // A failed write delivers no whole end section (its checksum comes last): the guest is
    // still only here. From a completed flush on, the destination may run it.
    tx.w.flush()?;
    if let Some(rx) = reader {
        await_resumed(&rx)?;
    }
    let total = start.elapsed().as_secs_f64();
    let downtime = paused_at.elapsed().as_secs_f64();
    let channel_bytes = bytes - tx.w.bytes;
    status.update(|s| {
        tx.record_completion(s, total);
        s.bytes += channel_bytes;
        s.pages_full = full;
        s.pages_zero = zero;
        s.throughput_mbps = s.bytes as f64 / total / 1e6;
        s.downtime_ms = downtime * 1e3;
    });
    progress.show(&status.get(), true);
    progress.finish();
    Ok(())
}

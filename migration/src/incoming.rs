//! The destination side: read the configuration, then RAM and state until the end section.

use std::io::{Read, Write};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use crate::error::MigrationError;
use crate::postcopy::channel_place::{self, ChannelPlacers};
use crate::postcopy::preempt::AdviseRecord;
use crate::postcopy::{probe_userfaultfd, DiscardRecord, Listener};
use crate::progress::Phase;
use crate::progress::StatusCell;
use crate::state::{
    ClockState, DeviceStates, EndRecord, IoapicState, LocalRamRecord, PicState, PitState, VcpuState,
};
use crate::stream::{
    parse_ram, Frame, PageRecord, Section, StreamError, StreamReader, StreamWriter,
};
use crate::{MigratableVm, MigrationId, VmConfigRecord, VmState, PAGE_SIZE};

/// Writes a RAM section's pages into guest RAM (populating dense batches first); returns how
/// many full and zero pages it held. `zero` is a page of zeros.
pub(crate) fn apply_ram(
    vm: &dyn MigratableVm,
    payload: &[u8],
    zero: &[u8],
) -> Result<(u64, u64), MigrationError> {
    prepare_dense_range(vm, payload);
    let (mut full, mut zeros) = (0u64, 0u64);
    for rec in parse_ram(payload) {
        match rec? {
            PageRecord::Full(gpa, data) => {
                vm.write_ram(gpa, data)?;
                full += 1;
            }
            PageRecord::Zero(gpa) => {
                vm.write_ram(gpa, zero)?;
                zeros += 1;
            }
        }
    }
    Ok((full, zeros))
}

/// Populates the span a RAM batch covers when the batch fills most of it.
pub(crate) fn prepare_dense_range(vm: &dyn MigratableVm, payload: &[u8]) {
    let (mut lo, mut hi, mut n) = (u64::MAX, 0u64, 0u64);
    for rec in parse_ram(payload).flatten() {
        if let PageRecord::Full(gpa, _) = rec {
            // A page at the very top of the address space is not RAM: write_ram refuses it.
            let Some(end) = gpa.checked_add(PAGE_SIZE as u64) else {
                return;
            };
            lo = lo.min(gpa);
            hi = hi.max(end);
            n += 1;
        }
    }
    // n is at most the pages of one section, so n * 4096 * 2 cannot overflow.
    if n > 0 && n * PAGE_SIZE as u64 * 2 >= hi - lo {
        vm.prepare_ram(lo, hi - lo);
    }
}

/// How a migration stream starts: its id, the configuration, and the local-memory section
/// before it when the source hands RAM over (a local migration).
pub struct Start {
    pub id: MigrationId,
    pub config: VmConfigRecord,
    pub local: Option<LocalRamRecord>,
}

/// Reads the header and the configuration section (and a local-memory section before it).
pub fn read_start<R: Read>(r: &mut StreamReader<R>) -> Result<Start, StreamError> {
    let id = r.header()?;
    let first = r.read_section()?;
    if first.kind == Section::LocalRam {
        let local = first.decode()?;
        let config = r.read_section()?.expect(Section::Config)?.decode()?;
        return Ok(Start {
            id,
            config,
            local: Some(local),
        });
    }
    Ok(Start {
        id,
        config: first.expect(Section::Config)?.decode()?,
        local: None,
    })
}

fn refused(section: Section, why: &'static str) -> MigrationError {
    StreamError::Refused {
        section: section.name(),
        why,
    }
    .into()
}

fn missing(what: &'static str) -> MigrationError {
    MigrationError::Stream(StreamError::Truncated(format!(
        "stream: the end section came without the {what} section"
    )))
}

/// The return path (destination -> source), shared by the fault thread and the listener.
pub type ReturnPath = Arc<Mutex<StreamWriter<Box<dyn Write + Send>>>>;

/// How the stream left the guest: complete (precopy), or running with pages still to come.
pub enum Received {
    Precopy {
        state: VmState,
        paused_at: Option<u64>,
    },
    Postcopy {
        state: VmState,
        paused_at: Option<u64>,
        tail: Box<PostcopyTail>,
    },
}

/// How often the listener looks at the fault thread's health while no pages arrive.
const FAULT_CHECK: std::time::Duration = std::time::Duration::from_millis(100);

/// What is left of a postcopy stream after RUN: pages until the end section.
pub struct PostcopyTail {
    frames: mpsc::Receiver<Result<Frame, StreamError>>,
    spare: mpsc::Sender<Vec<u8>>,
    pub listener: Listener,
    /// The RAM channels' share of the push (None: it all comes on the main stream).
    channels: Option<ChannelPlacers>,
}

impl PostcopyTail {
    /// The postcopy machinery, for a recovery after this connection broke.
    pub fn into_listener(self) -> Listener {
        self.listener
    }

    /// Places arriving pages until the end section; returns when every page is Received. A
    /// RAM channel that breaks before its share is done breaks postcopy as the main stream would.
    pub fn run(&self, status: &StatusCell) -> Result<(), MigrationError> {
        let broken = || {
            self.listener
                .fault_error()
                .or_else(|| self.channels.as_ref().and_then(|c| c.broken()))
                .map(MigrationError::PostcopyCut)
        };
        let placer = self.listener.placer();
        loop {
            let frame = match self.frames.recv_timeout(FAULT_CHECK) {
                Ok(frame) => frame?,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(e) = broken() {
                        return Err(e);
                    }
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(StreamError::Truncated("stream: the reader stopped".into()).into())
                }
            };
            if let Some(e) = broken() {
                return Err(e);
            }
            match frame.kind {
                Section::Ram | Section::RamRun => {
                    if frame.kind == Section::Ram {
                        channel_place::place_batch(&placer, &frame.payload)?;
                    } else {
                        channel_place::place_run(&placer, &frame.payload)?;
                    }
                    let _ = self.spare.send(frame.payload);
                    let left = self.listener.pages_left();
                    status.update(|s| s.remaining_bytes = (left * PAGE_SIZE) as u64);
                }
                Section::End => {
                    // Pages on the channels and requested pages on the preempt channel may still
                    // be on their way.
                    let deadline = std::time::Instant::now() + crate::peer::peer_timeout();
                    while !self.listener.complete() && std::time::Instant::now() < deadline {
                        if let Some(e) = broken() {
                            return Err(e);
                        }
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    break;
                }
                Section::Heartbeat => {}
                Section::PageRefused => {
                    let r: crate::postcopy::PageRefusal = frame.decode()?;
                    return Err(MigrationError::PostcopyCut(format!(
                        "the source refused the page request for {:#x}: {}",
                        r.gpa, r.reason
                    )));
                }
                other => {
                    return Err(StreamError::Unexpected {
                        got: other.name(),
                        expected: "postcopy RAM",
                    }
                    .into())
                }
            }
        }
        if !self.listener.complete() {
            return Err(StreamError::Truncated(
                "postcopy: the end section came before every page".into(),
            )
            .into());
        }
        let (pushed, place_ns) = self.listener.placer().push_figures();
        let receive_ns = self.channels.as_ref().map_or(0, |c| c.receive_ns());
        log::info!(
            "postcopy push placed {pushed} pages on {} connection(s): receive {:.1} ms, place {:.1} ms \
(runs, summed over the threads that placed them)",
            self.channels.as_ref().map_or(1, |c| c.count()),
            receive_ns as f64 / 1e6,
            place_ns as f64 / 1e6
        );
        Ok(())
    }
}

/// What the destination may do.
pub struct Options {
    pub postcopy: bool,
    pub vcpu_tids: Vec<u32>,
    /// RAM was handed over: a RAM or postcopy section would write into memory the guest owns.
    pub local: bool,
    /// Guest RAM is a shared memfd: postcopy's MADV_DONTNEED discards would not make its pages
    /// missing (the guest would read stale memory), so ADVISE is refused.
    pub shared_ram: bool,
    /// The endpoint, still listening: the postcopy preempt channel is accepted on it.
    pub preempt: std::sync::Mutex<Option<crate::transport::Listening>>,
    /// The migration's id (the main stream's header): RAM channels and the preempt channel of
    /// another one are refused.
    pub id: MigrationId,
}

/// Receives RAM and device state into `vm` until the end section (precopy) or RUN (postcopy).
pub fn receive(
    r: StreamReader<Box<dyn Read + Send>>,
    vm: &dyn MigratableVm,
    status: &StatusCell,
    start: Instant,
    return_path: Option<ReturnPath>,
    options: &Options,
) -> Result<Received, MigrationError> {
    // Two stages: a reader thread receives and checks sections while this thread places pages
    // (populating fresh memory is the slow part here), with payload buffers handed back.
    let (frames_rx, spare_tx) = spawn_reader(r)?;
    // RAM channels' receivers borrow the VM: they end with this scope (the source closes their
    // connections before its end section or the postcopy switch).
    std::thread::scope(|scope| {
        let mut channels = None;
        let received = apply(
            frames_rx,
            spare_tx,
            vm,
            status,
            start,
            return_path,
            options,
            Channels {
                scope,
                channels: &mut channels,
            },
        );
        if let Some(c) = &channels {
            c.stop();
            let p = c.placing();
            let ms = |ns: u64| ns as f64 / 1e6;
            log::info!(
                "RAM channels placed {} pages in guest memory: populate {:.1} ms, receive {:.1} ms, \
checksum {:.1} ms (summed over the channels)",
                p.pages,
                ms(p.populate_ns),
                ms(p.receive_ns),
                ms(p.checksum_ns)
            );
        }
        received
    })
}

/// The RAM channels of a migration, once the source announced them.
struct Channels<'a, 'scope, 'env> {
    scope: &'scope std::thread::Scope<'scope, 'env>,
    channels: &'a mut Option<crate::channels::Receivers>,
}

type Frames = mpsc::Receiver<Result<Frame, StreamError>>;

/// The reader thread: sections in order (bounded queue), payload buffers back for reuse.
fn spawn_reader(
    mut r: StreamReader<Box<dyn Read + Send>>,
) -> Result<(Frames, mpsc::Sender<Vec<u8>>), MigrationError> {
    let (frames_tx, frames_rx) = mpsc::sync_channel::<Result<Frame, StreamError>>(2);
    let (spare_tx, spare_rx) = mpsc::channel::<Vec<u8>>();
    std::thread::Builder::new()
        .name("migration-reader".into())
        .spawn(move || {
            crate::thread_started("migration-reader");
            loop {
                while let Ok(buf) = spare_rx.try_recv() {
                    r.recycle(buf);
                }
                let frame = r.read_section().map_err(crate::peer::from_source);
                let last = !matches!(&frame, Ok(f) if f.kind != Section::End);
                if frames_tx.send(frame).is_err() || last {
                    return;
                }
            }
        })
        .map_err(|source| MigrationError::Spawn {
            what: "stream reader",
            source,
        })?;
    Ok((frames_rx, spare_tx))
}

/// Why a recovery connection was not taken.
pub enum RecoverRefusal {
    /// The peer is not this migration's source (another id, or another VM): it was told why,
    /// and the listener is untouched; another connection may be awaited.
    Foreign(MigrationError, Listener),
    /// The recovery itself failed.
    Failed(MigrationError, Listener),
}

/// Postcopy recovery, destination side: `r`/`w` are a new connection from the source. Checks it
/// recovers this VM (migration `id`), sends the runs of pages still missing here, re-sends the
/// outstanding requests, and returns the tail that places what comes (the VM may run again).
pub fn recover(
    mut r: StreamReader<Box<dyn Read + Send>>,
    mut w: Box<dyn Write + Send>,
    listener: Listener,
    this_vm: &VmConfigRecord,
    id: MigrationId,
) -> Result<(PostcopyTail, usize), Box<RecoverRefusal>> {
    let hello = (|| {
        let got = r.header()?;
        if got != id {
            return Err(MigrationError::Stream(StreamError::ForeignMigration {
                expected: id,
                got,
            }));
        }
        let rec: VmConfigRecord = r.read_section()?.expect(Section::Recover)?.decode()?;
        if rec.ram != this_vm.ram || rec.vcpus != this_vm.vcpus {
            return Err(MigrationError::Rejected(
                "the recovering source holds a different VM (RAM layout or vCPUs differ)".into(),
            ));
        }
        Ok(())
    })();
    if let Err(e) = hello {
        // That peer hears why; this side's postcopy is not touched.
        crate::identity::refuse_peer(Some(&mut w), "postcopy recovery connection", &e);
        return Err(Box::new(RecoverRefusal::Foreign(e, listener)));
    }
    let resent = match listener.reconnect(w) {
        Ok(n) => n,
        Err(e) => return Err(Box::new(RecoverRefusal::Failed(e.into(), listener))),
    };
    let missing = listener.not_received();
    let told = (|| {
        let rp = listener.return_path();
        let mut g = rp.lock().unwrap_or_else(|e| e.into_inner());
        // Chunks well under the section limit (a run is at most ~45 bytes of JSON).
        for chunk in missing.chunks(50_000) {
            g.record(
                Section::Missing,
                &DiscardRecord {
                    ranges: chunk.to_vec(),
                },
            )?;
        }
        g.section(Section::Recover, &[])?;
        g.flush()
    })();
    if let Err(e) = told {
        return Err(Box::new(RecoverRefusal::Failed(e.into(), listener)));
    }
    let (frames, spare) = match spawn_reader(r) {
        Ok(v) => v,
        Err(e) => return Err(Box::new(RecoverRefusal::Failed(e, listener))),
    };
    Ok((
        PostcopyTail {
            frames,
            spare,
            listener,
            channels: None,
        },
        resent,
    ))
}

#[allow(clippy::too_many_arguments)]
fn apply<'scope>(
    frames: mpsc::Receiver<Result<Frame, StreamError>>,
    spare: mpsc::Sender<Vec<u8>>,
    vm: &'scope dyn MigratableVm,
    status: &StatusCell,
    start: Instant,
    return_path: Option<ReturnPath>,
    options: &Options,
    ch: Channels<'_, 'scope, '_>,
) -> Result<Received, MigrationError> {
    let mut listener: Option<Listener> = None;
    // Postcopy goes ADVISE (accepted here) -> DISCARD -> state -> RUN, in that order only.
    let mut advised = false;
    let mut preempt = false;
    let zero = vec![0u8; PAGE_SIZE];
    let (mut vcpus, mut clock, mut irqchip, mut pit, mut devices) = (None, None, None, None, None);
    let (mut full, mut zeros, mut iteration, mut bytes) = (0u64, 0u64, 0u32, 0u64);
    // What the channels placed, as of the last pass marker.
    let mut channel_figures = (0u64, 0u64, 0u64);
    let paused_at = loop {
        let frame = frames
            .recv()
            .map_err(|_| StreamError::Truncated("stream: the reader stopped".into()))??;
        bytes += frame.payload.len() as u64 + 9;
        if options.local
            && matches!(
                frame.kind,
                Section::Ram
                    | Section::Advise
                    | Section::Discard
                    | Section::Run
                    | Section::Channels
                    | Section::PassDone
            )
        {
            return Err(StreamError::Unexpected {
                got: frame.kind.name(),
                expected: "device state (local migration: RAM was handed over)",
            }
            .into());
        }
        match frame.kind {
            // The pages are already registered with userfaultfd: writing one here would wait
            // for a fault nobody serves (and the source sends none between DISCARD and RUN).
            Section::Ram if listener.is_some() => {
                return Err(refused(
                    Section::Ram,
                    "no pages may come between the postcopy discard and RUN",
                ))
            }
            Section::Ram => {
                let (f, z) = apply_ram(vm, &frame.payload, &zero)?;
                full += f;
                zeros += z;
                let _ = spare.send(frame.payload);
            }
            // After ADVISE the next connection may be the preempt channel.
            Section::Channels if ch.channels.is_some() || advised => {
                return Err(refused(
                    Section::Channels,
                    "channels come once, before the postcopy advise",
                ))
            }
            Section::Channels => {
                let rec: crate::channels::ChannelsRecord = frame.decode()?;
                let mut listening = options.preempt.lock().unwrap_or_else(|e| e.into_inner());
                let Some(l) = listening.as_ref() else {
                    return Err(refused(
                        Section::Channels,
                        "this endpoint takes no further connections",
                    ));
                };
                *ch.channels = Some(crate::channels::accept(
                    ch.scope,
                    l,
                    rec.count as usize,
                    vm,
                    options.id,
                )?);
                status.update(|s| s.channels = rec.count);
                // Without postcopy nothing else connects: a Unix path goes now.
                if !options.postcopy {
                    *listening = None;
                }
            }
            Section::PassDone => {
                let pass: u32 = frame.decode()?;
                let Some(c) = ch.channels.as_ref() else {
                    return Err(refused(Section::PassDone, "no channels were announced"));
                };
                c.wait_pass(pass)?;
                let (f, z, b) = c.figures();
                channel_figures = (f, z, b);
            }
            Section::IterationDone => iteration = frame.decode()?,
            Section::Heartbeat => {}
            Section::Cancel => return Err(MigrationError::Cancelled),
            Section::Vcpus => vcpus = Some(frame.decode::<Vec<VcpuState>>()?),
            Section::Clock => clock = Some(frame.decode::<ClockState>()?),
            Section::Irqchip => {
                irqchip = Some(frame.decode::<(PicState, PicState, IoapicState)>()?)
            }
            Section::Pit => pit = Some(frame.decode::<PitState>()?),
            Section::Devices => devices = Some(frame.decode::<DeviceStates>()?),
            Section::End => {
                let paused_at = frame
                    .decode::<EndRecord>()
                    .ok()
                    .map(|e| e.paused_at_unix_ns);
                break paused_at;
            }
            Section::Advise if advised => {
                return Err(refused(Section::Advise, "postcopy was already advised"))
            }
            Section::Advise => {
                status.update(|s| s.phase = Phase::Advise);
                let verdict = if options.shared_ram {
                    Err("postcopy is not supported with shared=on guest RAM".into())
                } else if options.postcopy {
                    probe_userfaultfd().map_err(|e| e.to_string())
                } else {
                    Err(
                        "postcopy is not enabled on the destination (start it with --postcopy)"
                            .into(),
                    )
                }
                .map_err(|why| format!("postcopy advise: {why}"));
                let Some(rp) = &return_path else {
                    return Err(MigrationError::Rejected(
                        "postcopy needs a return path".into(),
                    ));
                };
                // A preempt channel when the source asks for one and the endpoint can take it.
                let asked = AdviseRecord::decode(&frame.payload).preempt;
                let can = options
                    .preempt
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .is_some();
                preempt = asked && can;
                let mut w = rp.lock().unwrap_or_else(|e| e.into_inner());
                match &verdict {
                    Ok(()) => w.record(Section::Advise, &AdviseRecord { preempt })?,
                    Err(why) => w.record(Section::Abort, why)?,
                }
                w.flush()?;
                drop(w);
                verdict.map_err(MigrationError::Rejected)?;
                advised = true;
            }
            Section::Discard if !advised || listener.is_some() => return Err(refused(
                Section::Discard,
                "it must follow one accepted postcopy advise (the destination needs --postcopy)",
            )),
            Section::Discard => {
                status.update(|s| s.phase = Phase::Discard);
                let discard: DiscardRecord = frame.decode()?;
                let rp = return_path.clone().ok_or_else(|| {
                    MigrationError::Rejected("postcopy needs a return path".into())
                })?;
                let l =
                    Listener::start(vm, &discard, rp, options.vcpu_tids.clone()).map_err(|e| {
                        MigrationError::Vm(crate::VmSideError(format!("postcopy listen: {e}")))
                    })?;
                status.update(|s| s.phase = Phase::Listen);
                if preempt {
                    let taken = options
                        .preempt
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .take();
                    if let Some(listening) = taken {
                        crate::postcopy::preempt::serve(listening, l.placer(), options.id);
                    }
                }
                listener = Some(l);
            }
            Section::Run if listener.is_some() => {
                let paused_at = frame
                    .decode::<EndRecord>()
                    .ok()
                    .map(|e| e.paused_at_unix_ns);
                let state = assemble(vcpus, clock, irqchip, pit, devices)?;
                let listener = listener.take().ok_or_else(|| missing("postcopy discard"))?;
                // The channels' share of the push is placed by threads of their own from now on.
                let channels = match ch.channels.as_ref() {
                    Some(c) => Some(ChannelPlacers::start(
                        c.take_for_postcopy()?,
                        &listener.placer(),
                    )?),
                    None => None,
                };
                return Ok(Received::Postcopy {
                    state,
                    paused_at,
                    tail: Box::new(PostcopyTail {
                        frames,
                        spare,
                        listener,
                        channels,
                    }),
                });
            }
            other => {
                return Err(StreamError::Unexpected {
                    got: other.name(),
                    expected: "RAM or state",
                }
                .into())
            }
        }
        status.update(|s| {
            s.bytes = bytes + channel_figures.2;
            s.pages_full = full + channel_figures.0;
            s.pages_zero = zeros + channel_figures.1;
            s.iteration = iteration;
            s.total_ms = start.elapsed().as_secs_f64() * 1e3;
        });
    };
    let state = assemble(vcpus, clock, irqchip, pit, devices)?;
    Ok(Received::Precopy { state, paused_at })
}

fn assemble(
    vcpus: Option<Vec<VcpuState>>,
    clock: Option<ClockState>,
    irqchip: Option<(PicState, PicState, IoapicState)>,
    pit: Option<PitState>,
    devices: Option<DeviceStates>,
) -> Result<VmState, MigrationError> {
    let (pic_master, pic_slave, ioapic) = irqchip.ok_or_else(|| missing("irqchip"))?;
    Ok(VmState {
        vcpus: vcpus.ok_or_else(|| missing("vCPU state"))?,
        clock: clock.ok_or_else(|| missing("kvmclock"))?,
        pic_master,
        pic_slave,
        ioapic,
        pit: pit.ok_or_else(|| missing("PIT"))?,
        devices: devices.ok_or_else(|| missing("device state"))?,
    })
}

/// How a migration ended on the destination, as the source hears it.
pub enum Answer<'a> {
    /// The guest runs here.
    Resumed,
    /// Refused: the guest never ran here, for this reason.
    Abort(&'a str),
}

/// Tells the source how it ended: resumed, or why not.
pub fn answer(rp: &ReturnPath, outcome: Answer<'_>) -> Result<(), StreamError> {
    let mut w = rp.lock().unwrap_or_else(|e| e.into_inner());
    match outcome {
        Answer::Resumed => w.section(Section::Resumed, &[])?,
        Answer::Abort(why) => w.record(Section::Abort, &why)?,
    }
    w.flush()
}

/// Postcopy's END answered: the destination's figures in the Complete section (the source's
/// last read before it exits).
pub fn complete(
    rp: &ReturnPath,
    record: &crate::postcopy::CompleteRecord,
) -> Result<(), StreamError> {
    let mut w = rp.lock().unwrap_or_else(|e| e.into_inner());
    w.record(Section::Complete, record)?;
    w.flush()
}

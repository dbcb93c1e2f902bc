//! The destination side: read the configuration, then RAM and state until the end section.

use std::io::{Read, Write};
use std::sync::mpsc;
use std::time::Instant;

use crate::outgoing::MigrationError;
use crate::progress::StatusCell;
use crate::state::{
    ClockState, DeviceStates, EndRecord, IoapicState, PicState, PitState, VcpuState,
};
use crate::stream::{
    parse_ram, Frame, PageRecord, Section, StreamError, StreamReader, StreamWriter,
};
use crate::{MigratableVm, VmConfigRecord, VmState, PAGE_SIZE};

/// Populates the span a RAM batch covers when the batch fills most of it.
fn prepare_dense_range(vm: &dyn MigratableVm, payload: &[u8]) {
    let (mut lo, mut hi, mut n) = (u64::MAX, 0u64, 0u64);
    for rec in parse_ram(payload).flatten() {
        if let PageRecord::Full(gpa, _) = rec {
            lo = lo.min(gpa);
            hi = hi.max(gpa + PAGE_SIZE as u64);
            n += 1;
        }
    }
    if n > 0 && n * PAGE_SIZE as u64 * 2 >= hi - lo {
        vm.prepare_ram(lo, hi - lo);
    }
}

/// Reads the header and the configuration section.
pub fn read_config<R: Read>(r: &mut StreamReader<R>) -> Result<VmConfigRecord, StreamError> {
    r.header()?;
    r.next()?.expect(Section::Config)?.decode()
}

fn missing(what: &'static str) -> MigrationError {
    MigrationError::Stream(StreamError::Truncated(format!(
        "stream: the end section came without the {what} section"
    )))
}

/// Receives RAM and device state into `vm` until the end section; returns the state to restore
/// and when the source paused the guest (Unix ns), if it said.
pub fn receive<R: Read + Send>(
    r: &mut StreamReader<R>,
    vm: &dyn MigratableVm,
    status: &StatusCell,
    start: Instant,
) -> Result<(VmState, Option<u64>), MigrationError> {
    // Two stages: a reader thread receives and checks sections while this thread places pages
    // (populating fresh memory is the slow part here), with payload buffers handed back.
    let (frames_tx, frames_rx) = mpsc::sync_channel::<Result<Frame, StreamError>>(4);
    let (spare_tx, spare_rx) = mpsc::channel::<Vec<u8>>();
    std::thread::scope(|scope| {
        scope.spawn(move || loop {
            while let Ok(buf) = spare_rx.try_recv() {
                r.recycle(buf);
            }
            let frame = r.next();
            let last = !matches!(&frame, Ok(f) if f.kind != Section::End);
            if frames_tx.send(frame).is_err() || last {
                return;
            }
        });
        apply(frames_rx, spare_tx, vm, status, start)
    })
}

fn apply(
    frames: mpsc::Receiver<Result<Frame, StreamError>>,
    spare: mpsc::Sender<Vec<u8>>,
    vm: &dyn MigratableVm,
    status: &StatusCell,
    start: Instant,
) -> Result<(VmState, Option<u64>), MigrationError> {
    let zero = vec![0u8; PAGE_SIZE];
    let (mut vcpus, mut clock, mut irqchip, mut pit, mut devices) = (None, None, None, None, None);
    let (mut full, mut zeros, mut iteration, mut bytes) = (0u64, 0u64, 0u32, 0u64);
    let paused_at = loop {
        let frame = frames
            .recv()
            .map_err(|_| StreamError::Truncated("stream: the reader stopped".into()))??;
        bytes += frame.payload.len() as u64 + 9;
        match frame.kind {
            Section::Ram => {
                prepare_dense_range(vm, &frame.payload);
                for rec in parse_ram(&frame.payload) {
                    match rec? {
                        PageRecord::Full(gpa, data) => {
                            vm.write_ram(gpa, data)?;
                            full += 1;
                        }
                        PageRecord::Zero(gpa) => {
                            vm.write_ram(gpa, &zero)?;
                            zeros += 1;
                        }
                    }
                }
                let _ = spare.send(frame.payload);
            }
            Section::IterationDone => iteration = frame.decode()?,
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
            other => {
                return Err(StreamError::Unexpected {
                    got: other.name(),
                    expected: "RAM or state",
                }
                .into())
            }
        }
        status.update(|s| {
            s.bytes = bytes;
            s.pages_full = full;
            s.pages_zero = zeros;
            s.iteration = iteration;
            s.total_ms = start.elapsed().as_secs_f64() * 1e3;
        });
    };
    let (pic_master, pic_slave, ioapic) = irqchip.ok_or_else(|| missing("irqchip"))?;
    let state = VmState {
        vcpus: vcpus.ok_or_else(|| missing("vCPU state"))?,
        clock: clock.ok_or_else(|| missing("kvmclock"))?,
        pic_master,
        pic_slave,
        ioapic,
        pit: pit.ok_or_else(|| missing("PIT"))?,
        devices: devices.ok_or_else(|| missing("device state"))?,
    };
    Ok((state, paused_at))
}

/// Tells the source how it ended: resumed, or why not.
pub fn answer<W: Write>(w: W, outcome: Result<(), String>) -> Result<(), StreamError> {
    let mut w = StreamWriter::new(w);
    match outcome {
        Ok(()) => w.section(Section::Resumed, &[])?,
        Err(why) => w.record(Section::Abort, &why)?,
    }
    w.flush()
}

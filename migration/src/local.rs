//! Local migration (`unix:PATH,local=on`): guest RAM is a memfd per region, handed to the
//! destination with SCM_RIGHTS together with the stream header. Only vCPU and device state is
//! copied; the guest pauses once, after the destination has built its VM on the same memory.

use std::path::Path;
use std::time::Instant;

use crate::outgoing::{await_resumed, send_state, MigrationError, Params};
use crate::peer::PeerReader;
use crate::progress::Phase;
use crate::progress::{unix_ns, MigrationState, StatusCell};
use crate::state::{EndRecord, LocalRamRecord};
use crate::stream::{header_bytes, Section, StreamReader, StreamWriter, HEADER_LEN};
use crate::transport::{self, ACK_TIMEOUT};
use crate::MigratableVm;

fn refused(why: impl Into<String>) -> MigrationError {
    MigrationError::LocalRefused(why.into())
}

/// Runs a local migration to the destination listening on `path`. The guest keeps running here
/// until the destination says it is ready; from the end section on it is the destination's.
pub(crate) fn run(
    vm: &dyn MigratableVm,
    path: &Path,
    params: &Params,
    status: &StatusCell,
    start: Instant,
    paused: &mut bool,
    id: crate::MigrationId,
) -> Result<(), MigrationError> {
    if params.postcopy {
        return Err(refused(
            "postcopy cannot be combined with local=on (nothing is left to fetch after the \
switch: the memory itself is handed over); start the source without --postcopy",
        ));
    }
    let regions = vm.ram_regions();
    let fds = vm.shared_memory_fds();
    if fds.is_empty() {
        return Err(refused(
            "guest RAM is private memory; local=on needs it shared (start the VM with \
--memory size=...,shared=on)",
        ));
    }
    if fds.len() != regions.len() {
        return Err(refused(format!(
            "{} memory fds for {} RAM regions",
            fds.len(),
            regions.len()
        )));
    }
    let connect_err = |source| MigrationError::Connect {
        endpoint: format!("unix:{},local=on", path.display()),
        source,
    };
    let socket = transport::connect_unix(path).map_err(connect_err)?;
    crate::fdpass::send_with_fds(&socket, &header_bytes(id), &fds)
        .map_err(|e| MigrationError::Stream(crate::stream::StreamError::Write(e)))?;
    drop(fds);
    let mut channel = transport::unix_channel(socket).map_err(connect_err)?;
    let (Some(writer), Some(reader)) = (channel.writer.take(), channel.reader.take()) else {
        return Err(MigrationError::NoAnswer("no return path".into()));
    };
    let mut w = StreamWriter::new(writer);
    w.count_sent(HEADER_LEN);
    let ram = LocalRamRecord {
        regions: regions.iter().map(|r| (r.gpa, r.len)).collect(),
    };
    w.record(Section::LocalRam, &ram)?;
    w.record(Section::Config, &vm.config())?;
    w.flush()?;
    let rx = PeerReader::start(StreamReader::new(reader))
        .map_err(|e| MigrationError::NoAnswer(format!("starting the return path: {e}")))?;
    // The destination maps the memory and creates its VM while the guest still runs here.
    let answer = rx
        .next(ACK_TIMEOUT)
        .map_err(|e| MigrationError::NoAnswer(e.to_string()))?;
    match answer.kind {
        Section::Ready => {}
        Section::Abort => {
            return Err(MigrationError::Rejected(
                answer.decode::<String>().unwrap_or_else(|e| e.to_string()),
            ))
        }
        other => {
            return Err(MigrationError::NoAnswer(format!(
                "unexpected {} section",
                other.name()
            )))
        }
    }
    let mut cancelled = false;
    status.update(|s| {
        cancelled = s.cancel_requested;
        s.switching = !cancelled;
    });
    if cancelled {
        let _ = w.section(Section::Cancel, &[]).and_then(|_| w.flush());
        return Err(MigrationError::Cancelled);
    }
    let paused_at = Instant::now();
    let paused_at_unix_ns = unix_ns();
    vm.pause()?;
    *paused = true;
    send_state(&mut w, &vm.save_state()?)?;
    w.record(Section::End, &EndRecord { paused_at_unix_ns })?;
    // From a completed flush on, the destination may run the guest (on the same memory).
    w.flush()?;
    await_resumed(&rx)?;
    let total = start.elapsed().as_secs_f64();
    let downtime = paused_at.elapsed().as_secs_f64();
    let bytes = w.bytes;
    status.update(|s| {
        s.state = MigrationState::Completed;
        s.bytes = bytes;
        s.remaining_bytes = 0;
        s.total_ms = total * 1e3;
        s.downtime_ms = downtime * 1e3;
        s.throughput_mbps = bytes as f64 / total / 1e6;
        s.phase = Phase::Local;
    });
    Ok(())
}

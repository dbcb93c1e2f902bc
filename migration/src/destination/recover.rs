//! Postcopy recovery, destination side (after QEMU's postcopy-paused / postcopy-recover): a
//! destination whose postcopy broke keeps its listener parked; `migrate-recover URI` makes it
//! listen anew for the source, send what it still misses, and place the rest on a new
//! `postcopy-listen` thread while the guest runs again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{spawn_postcopy_tail, DestinationVm};
use crate::incoming::{self, RecoverRefusal};
use crate::lifecycle::Command;
use crate::peer::Heartbeat;
use crate::postcopy::Listener;
use crate::progress::{MigrationState, Phase, StatusCell};
use crate::stream::StreamReader;
use crate::transport::{self, Endpoint};

/// How long a destination listens for the source's reconnection before it gives up (it stays
/// `postcopy-paused`; `migrate-recover` may be asked again).
pub const RECOVER_WAIT: Duration = Duration::from_secs(600);

/// Why a postcopy recovery could not start.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    /// This side is not a paused postcopy of the right role (`lifecycle::admit`).
    #[error(transparent)]
    NotPaused(#[from] crate::lifecycle::Refused),
    #[error("the postcopy state is gone; nothing to recover")]
    Gone,
    #[error("cannot start the recovery thread: {0}")]
    Thread(std::io::Error),
}

/// Moves this side from `postcopy-paused` to `postcopy-recover` (one lock, so two recoveries
/// never start at once) for `command` (`migrate-recover` here, `migrate --resume` on the
/// source), or says why it cannot, as the lifecycle table does.
pub fn claim_paused(status: &StatusCell, command: Command) -> Result<(), RecoveryError> {
    crate::lifecycle::admit_then(status, command, |s| {
        s.state = MigrationState::PostcopyRecover
    })?;
    Ok(())
}

/// Listens on `endpoint` for the source's reconnection, in the background (the thread runs
/// under its creator's seccomp filter). Refused unless `vm` is a destination in
/// `postcopy-paused` with its listener parked.
pub fn listen(vm: Arc<dyn DestinationVm>, endpoint: Endpoint) -> Result<(), RecoveryError> {
    let status = vm.status();
    claim_paused(&status, Command::MigrateRecover)?;
    status.update(|s| s.endpoint = endpoint.to_string());
    let Some(listener) = vm.take_parked() else {
        status.update(|s| s.state = MigrationState::PostcopyPaused);
        return Err(RecoveryError::Gone);
    };
    std::thread::Builder::new()
        .name("postcopy-recover".into())
        .spawn(move || serve(vm, status, endpoint, listener))
        .map(|_| ())
        .map_err(RecoveryError::Thread)
}

/// The recovery thread: one reconnection, then the tail again; a failure parks the listener
/// again (another recovery may be tried).
fn serve(vm: Arc<dyn DestinationVm>, status: StatusCell, endpoint: Endpoint, listener: Listener) {
    eprintln!("tern: waiting for the source to recover postcopy on {endpoint}");
    let t0 = Instant::now();
    let failed = |why: String, listener: Listener| {
        eprintln!("tern: error: postcopy recovery failed: {why}");
        // Keep what we have: another recovery may be tried.
        vm.park_postcopy(listener);
        status.update(|s| {
            s.state = MigrationState::PostcopyPaused;
            s.error = Some(format!("postcopy recovery failed: {why}"));
        });
    };
    let Some(id) = status.get().migration_id else {
        return failed("this side never learnt its migration's id".into(), listener);
    };
    // Bounded: a source that never comes leaves this side recoverable again. Peers of other
    // migrations are refused on the way (told why) and the wait goes on.
    let deadline = Instant::now() + RECOVER_WAIT;
    let listening = match transport::listen(&endpoint) {
        Ok(l) => l,
        Err(e) => return failed(format!("listening on {endpoint}: {e}"), listener),
    };
    let mut listener = listener;
    let (tail, resent, reconnected) = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut channel = match listening.accept_within(left) {
            Ok(c) => c,
            Err(e) => return failed(format!("waiting on {endpoint}: {e}"), listener),
        };
        let (Some(r), Some(w)) = (channel.reader.take(), channel.writer.take()) else {
            return failed(
                "recovery needs a connection with a return path".into(),
                listener,
            );
        };
        let reconnected = Instant::now();
        match incoming::recover(StreamReader::new(r), w, listener, &vm.config(), id) {
            Ok((tail, resent)) => break (tail, resent, reconnected),
            Err(b) => match *b {
                RecoverRefusal::Foreign(e, l) => {
                    eprintln!("tern: postcopy recovery: a connection was refused: {e}");
                    listener = l;
                }
                RecoverRefusal::Failed(e, l) => return failed(e.to_string(), l),
            },
        }
    };
    drop(listening);
    let left = tail.listener.pages_left();
    let rp = tail.listener.return_path();
    let heartbeat = match Heartbeat::start(rp.clone()) {
        Ok(h) => Some(h),
        Err(e) => {
            log::warn!("no heartbeat during the recovered postcopy: {e}");
            None
        }
    };
    status.update(|s| {
        s.state = MigrationState::Active;
        s.phase = Phase::Running;
        s.error = None;
        s.recovered_pages = left as u64;
    });
    spawn_postcopy_tail(vm.clone(), tail, rp, t0, heartbeat);
    eprintln!("tern: postcopy recovered: {left} pages still to come, {resent} requests sent again");
    if let Err(e) = vm.resume() {
        eprintln!("tern: error: cannot resume the guest after recovery: {e}");
    }
    let ms = reconnected.elapsed().as_secs_f64() * 1e3;
    status.update(|s| {
        s.recovery_ms = ms;
        s.recovery_requests_resent = resent as u64;
    });
}

//! Postcopy recovery (after QEMU's postcopy-paused / postcopy-recover): when the connection breaks
//! after the switch both sides pause; `migrate-recover URI` makes the destination listen anew and
//! `migrate URI --resume` reconnects the source, which then sends the pages still missing.

use std::sync::Arc;
use std::time::Instant;

use devices::VmExitReason;
use migration::error::MigrationError;
use migration::incoming;
use migration::peer::Heartbeat;
use migration::progress::Phase;
use migration::progress::{summary, MigrationState};
use migration::stream::StreamReader;
use migration::transport::{self, Endpoint};
use migration::MigratableVm;

use super::flows::OnDone;
use crate::vm::VmInner;
use migration::destination::spawn_postcopy_tail;
use migration::progress::Role;

/// How long a destination listens for the source's reconnection before it gives up (it stays
/// `postcopy-paused`; `migrate-recover` may be asked again).
const RECOVER_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

/// Why a postcopy recovery could not start.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    /// This side is not a paused postcopy of the right role.
    #[error("{refusal} (this side: {} {state})", if *role == Role::None { "no migration" } else { role.as_str() })]
    NotPaused {
        refusal: &'static str,
        role: Role,
        state: MigrationState,
    },
    #[error("the postcopy state is gone; nothing to recover")]
    Gone,
    #[error("cannot start the recovery thread: {0}")]
    Thread(std::io::Error),
}

/// Moves this side from `postcopy-paused` to `postcopy-recover` (one lock, so two recoveries
/// never start at once), or says why it cannot.
fn claim_paused(vm: &VmInner, role: Role, refusal: &'static str) -> Result<(), RecoveryError> {
    let mut refused = None;
    vm.migration.update(|s| {
        if s.role != role || s.state != MigrationState::PostcopyPaused {
            refused = Some(RecoveryError::NotPaused {
                refusal,
                role: s.role,
                state: s.state,
            });
        } else {
            s.state = MigrationState::PostcopyRecover;
        }
    });
    refused.map_or(Ok(()), Err)
}

/// Destination: listens on `endpoint` for the source's reconnection, in the background.
pub fn listen(vm: &Arc<VmInner>, endpoint: Endpoint) -> Result<(), RecoveryError> {
    claim_paused(
        vm,
        Role::Destination,
        "nothing to recover here: migrate-recover needs a destination in postcopy-paused",
    )?;
    vm.migration.update(|s| s.endpoint = endpoint.to_string());
    let Some(listener) = devices::bus::lock(&vm.postcopy_paused).take() else {
        vm.migration
            .update(|s| s.state = MigrationState::PostcopyPaused);
        return Err(RecoveryError::Gone);
    };
    let vm = vm.clone();
    std::thread::Builder::new()
        .name("postcopy-recover".into())
        .spawn(move || {
            eprintln!("tern: waiting for the source to recover postcopy on {endpoint}");
            let t0 = Instant::now();
            let failed = |why: String, listener: migration::postcopy::Listener| {
                eprintln!("tern: error: postcopy recovery failed: {why}");
                // Keep what we have: another recovery may be tried.
                *devices::bus::lock(&vm.postcopy_paused) = Some(listener);
                vm.migration.update(|s| {
                    s.state = MigrationState::PostcopyPaused;
                    s.error = Some(format!("postcopy recovery failed: {why}"));
                });
            };
            // Bounded: a source that never comes leaves this side recoverable again.
            let channel = transport::listen(&endpoint)
                .and_then(|l| l.accept_within(RECOVER_WAIT));
            let mut channel = match channel {
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
            let outcome = incoming::recover(StreamReader::new(r), w, listener, &vm.record);
            match outcome {
                Ok((tail, resent)) => {
                    let left = tail.listener.pages_left();
                    let rp = tail.listener.return_path();
                    let heartbeat = match Heartbeat::start(rp.clone()) {
                        Ok(h) => Some(h),
                        Err(e) => {
                            log::warn!("no heartbeat during the recovered postcopy: {e}");
                            None
                        }
                    };
                    vm.migration.update(|s| {
                        s.state = MigrationState::Active;
                        s.phase = Phase::Running;
                        s.error = None;
                        s.recovered_pages = left as u64;
                    });
                    spawn_postcopy_tail(vm.clone(), tail, rp, t0, heartbeat);
                    eprintln!(
                        "tern: postcopy recovered: {left} pages still to come, {resent} requests sent again"
                    );
                    if let Err(e) = vm.resume() {
                        eprintln!("tern: error: cannot resume the guest after recovery: {e}");
                    }
                    let ms = reconnected.elapsed().as_secs_f64() * 1e3;
                    vm.migration.update(|s| {
                        s.recovery_ms = ms;
                        s.recovery_requests_resent = resent as u64;
                    });
                }
                Err(b) => {
                    let (e, listener) = *b;
                    failed(e.to_string(), listener);
                }
            }
        })
        .map(|_| ())
        .map_err(RecoveryError::Thread)
}

/// Source: reconnects a paused postcopy to `endpoint` and finishes it, in the background.
pub fn reconnect(
    vm: &Arc<VmInner>,
    endpoint: Endpoint,
    on_done: OnDone,
) -> Result<(), RecoveryError> {
    claim_paused(
        vm,
        Role::Source,
        "nothing to resume: `migrate --resume` needs a source in postcopy-paused",
    )?;
    let vm = vm.clone();
    std::thread::Builder::new()
        .name("migration".into())
        .spawn(move || {
            crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::Migration);
            let result = migration::postcopy::recover::recover(&*vm, &endpoint, &vm.migration);
            let status = vm.migration.get();
            match result {
                Ok(()) => {
                    eprintln!("tern: {}", summary(&status));
                    on_done(&status);
                    vm.exit.request(VmExitReason::HostRequest(format!(
                        "guest migrated to {endpoint} (postcopy recovered)"
                    )));
                }
                Err(e) => {
                    let e: MigrationError = e;
                    eprintln!(
                        "tern: error: postcopy recovery to {endpoint} failed, the guest stays paused here (postcopy-paused, retry with migrate --resume): {e}"
                    );
                    on_done(&status);
                }
            }
        })
        .map(|_| ())
        .map_err(RecoveryError::Thread)
}

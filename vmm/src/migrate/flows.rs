//! Starting migrations: the outgoing thread behind the `migrate` command, and `--incoming`.

use std::sync::Arc;
use std::time::Instant;

use devices::VmExitReason;
use migration::destination::{self, DestinationError, DestinationVm};
use migration::outgoing::{self, Params};
use migration::progress::{summary, MigrationState, MigrationStatus, Role};
use migration::transport::Endpoint;
use migration::MigratableVm;

use crate::builder::build_for_incoming;
use crate::machine::HostOptions;
use crate::vm::{Vm, VmInner};

/// Why the control API's migration commands (migrate, migrate-cancel, pause/resume) refused.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("a migration is already in progress")]
    AlreadyMigrating,
    #[error("a migration is in progress")]
    Migrating,
    #[error("cannot start the migration thread: {0}")]
    Thread(std::io::Error),
    #[error("no outgoing migration is running")]
    NoOutgoing,
    #[error(
        "refused: the switch has begun, the guest is moving to (or already runs on) the \
destination; cancelling now could lose it"
    )]
    SwitchBegun,
    /// `resume` where the other side may run the guest; `on_source`: this side is the source.
    #[error(
        "refused: the migration ended in state {state} and the guest may be running on the {} \
side; resuming here could run it twice{}",
        if *on_source { "destination" } else { "source" },
        if *on_source { " (use --force only if you know the destination never ran it)" } else { "" }
    )]
    MayRunElsewhere {
        state: MigrationState,
        on_source: bool,
    },
    #[error(transparent)]
    Vm(#[from] migration::VmSideError),
}

/// Called once the migration ended, before a completed source quits.
pub type OnDone = Box<dyn FnOnce(&MigrationStatus) + Send>;

/// Starts an outgoing migration in its own thread. Refused while another one runs.
pub fn start_outgoing(
    vm: &Arc<VmInner>,
    endpoint: Endpoint,
    params: Params,
    on_done: OnDone,
) -> Result<(), ControlError> {
    if vm.migration.is_active() {
        return Err(ControlError::AlreadyMigrating);
    }
    // Marked active here, not in the thread, so a second request right after is refused too.
    vm.migration.update(|s| {
        *s = Default::default();
        s.state = MigrationState::Active;
    });
    let vm = vm.clone();
    std::thread::Builder::new()
        .name("migration".into())
        .spawn(move || {
            crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::Migration);
            let result = outgoing::migrate(&*vm, &endpoint, &params, &vm.migration);
            let status = vm.migration.get();
            match result {
                Ok(()) => {
                    eprintln!("tern: {}", summary(&status));
                    on_done(&status);
                    vm.exit.request(VmExitReason::HostRequest(format!(
                        "guest migrated to {endpoint}"
                    )));
                }
                Err(e) => {
                    let here = if status.state.guest_may_run_elsewhere() {
                        "the guest stays paused here"
                    } else {
                        "guest keeps running here"
                    };
                    eprintln!(
                        "tern: error: migration to {endpoint} failed ({}), {here}: {e}",
                        status.state
                    );
                    on_done(&status);
                }
            }
        })
        .map(|_| ())
        .map_err(ControlError::Thread)
}

#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    #[error(transparent)]
    Destination(#[from] DestinationError),
    #[error("incoming migration: {0}")]
    Stream(#[from] migration::stream::StreamError),
    #[error("incoming migration: {0}")]
    Migration(#[from] migration::error::MigrationError),
    #[error("incoming migration: {0}")]
    Vm(#[from] crate::vm::VmError),
    #[error("incoming migration: {0}")]
    Restore(#[from] migration::VmSideError),
}

/// Receives a VM from `endpoint` and resumes it: a snapshot file here, a connection through
/// [`destination::receive`] with the builder. The returned VM runs like a booted one; after a
/// postcopy switch its remaining pages keep arriving in the background.
pub fn receive(
    endpoint: &Endpoint,
    opts: &HostOptions,
    start: Instant,
) -> Result<Vm, IncomingError> {
    if let Endpoint::File(path) = endpoint {
        return super::restore::restore(path, opts, start);
    }
    let options = destination::Options {
        postcopy: opts.postcopy,
    };
    let vm = destination::receive(endpoint, &options, |record, handed_over| {
        let vm = build_for_incoming(record, opts, handed_over, start)?;
        let driven: Arc<dyn DestinationVm> = vm.inner.clone();
        Ok::<_, crate::vm::VmError>((vm, driven))
    })?;
    Ok(vm)
}

/// `migrate-cancel`: stops a running outgoing migration before its switch.
pub fn cancel_outgoing(vm: &VmInner) -> Result<(), ControlError> {
    let mut verdict = Ok(());
    vm.migration.update(|s| {
        verdict = if s.state != MigrationState::Active || s.role != Role::Source {
            Err(ControlError::NoOutgoing)
        } else if s.switching {
            Err(ControlError::SwitchBegun)
        } else {
            s.cancel_requested = true;
            Ok(())
        };
    });
    verdict
}

/// Parameters for outgoing migrations, from the command line.
pub fn params(
    downtime_ms: u64,
    max_iterations: u32,
    timeout_s: u64,
    postcopy: bool,
    postcopy_after_iterations: Option<u32>,
    postcopy_preempt: bool,
    postcopy_bandwidth: Option<u64>,
) -> Params {
    Params {
        downtime: std::time::Duration::from_millis(downtime_ms),
        max_iterations,
        timeout: std::time::Duration::from_secs(timeout_s),
        postcopy,
        postcopy_after_iterations,
        postcopy_preempt,
        postcopy_bandwidth,
        channels: None,
        pacing: Default::default(),
    }
}

/// Pauses or resumes the guest from the control API: refused while migrating, and `resume` is
/// refused where the guest may run elsewhere (only `force` overrides that, on a parked source).
pub fn set_paused(vm: &VmInner, pause: bool, force: bool) -> Result<(), ControlError> {
    let status = vm.migration.get();
    if status.state == MigrationState::Active {
        return Err(ControlError::Migrating);
    }
    if !pause && status.state.guest_may_run_elsewhere() {
        let source = status.role == Role::Source;
        // A parked source holds the whole guest: forcing is the way back when the destination
        // never ran it (it died before RUN or END arrived).
        if !(force && source) {
            return Err(ControlError::MayRunElsewhere {
                state: status.state,
                on_source: source,
            });
        }
    }
    Ok(if pause { vm.pause() } else { vm.resume() }?)
}

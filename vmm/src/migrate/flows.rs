//! Starting migrations: the outgoing thread behind the `migrate` command, and `--incoming`.

use std::sync::Arc;
use std::time::Instant;

use devices::VmExitReason;
use migration::destination::{self, DestinationError, DestinationVm};
use migration::lifecycle::{self, Command, Refused};
use migration::outgoing::{self, Params};
use migration::progress::{summary, MigrationState, MigrationStatus};
use migration::transport::Endpoint;
use migration::MigratableVm;

use crate::builder::build_for_incoming;
use crate::machine::HostOptions;
use crate::vm::{Vm, VmInner};

/// Why the control API's migration commands (migrate, migrate-cancel, pause/resume) refused.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The command is not accepted in this side's stage (`migration::lifecycle`).
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error("cannot start the migration thread: {0}")]
    Thread(std::io::Error),
    #[error(transparent)]
    Vm(#[from] migration::VmSideError),
}

/// Admits `command` against the current status, or says why not.
pub fn admit(vm: &VmInner, command: Command) -> Result<(), ControlError> {
    Ok(lifecycle::admit(&vm.migration.get(), command)?)
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
    // Admitted and marked active under one lock, not in the thread, so a second request right
    // after is refused too, and a parked side never has its status overwritten.
    lifecycle::admit_then(&vm.migration, Command::Migrate, |s| {
        *s = Default::default();
        s.state = MigrationState::Active;
    })?;
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
    let request = |s: &mut MigrationStatus| s.cancel_requested = true;
    Ok(lifecycle::admit_then(
        &vm.migration,
        Command::MigrateCancel,
        request,
    )?)
}

/// `migrate-start-postcopy`: asks a running precopy to switch to postcopy.
pub fn request_postcopy(vm: &VmInner) -> Result<(), ControlError> {
    let request = |s: &mut MigrationStatus| s.postcopy_requested = true;
    Ok(lifecycle::admit_then(
        &vm.migration,
        Command::MigrateStartPostcopy,
        request,
    )?)
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

/// Pauses or resumes the guest from the control API, as the stage allows (`resume` is refused
/// where the guest may run elsewhere; `force` overrides that on a parked source only).
pub fn set_paused(vm: &VmInner, pause: bool, force: bool) -> Result<(), ControlError> {
    let command = match (pause, force) {
        (true, _) => Command::Pause,
        (false, false) => Command::Resume,
        (false, true) => Command::ResumeForce,
    };
    admit(vm, command)?;
    Ok(if pause { vm.pause() } else { vm.resume() }?)
}

//! Starting migrations: the outgoing thread behind the `migrate` command, and `--incoming`.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::VmExitReason;
use migration::error::MigrationError;
use migration::incoming::{self, Received, ReturnPath};
use migration::outgoing::{self, Params};
use migration::peer::Heartbeat;
use migration::progress::Phase;
use migration::progress::{summary, unix_ns, MigrationState, MigrationStatus};
use migration::stream::StreamReader;
use migration::stream::{Section, StreamWriter};
use migration::transport::{self, Endpoint};
use migration::MigratableVm;

use crate::builder::build_for_incoming;
use crate::machine::HostOptions;
use crate::vm::{Vm, VmInner};

/// Called once the migration ended, before a completed source quits.
pub type OnDone = Box<dyn FnOnce(&MigrationStatus) + Send>;

/// Starts an outgoing migration in its own thread. Refused while another one runs.
pub fn start_outgoing(
    vm: &Arc<VmInner>,
    endpoint: Endpoint,
    params: Params,
    on_done: OnDone,
) -> Result<(), String> {
    if vm.migration.is_active() {
        return Err("a migration is already in progress".into());
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
        .map_err(|e| format!("cannot start the migration thread: {e}"))
}

#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    #[error("waiting for the migration on {endpoint}: {source}")]
    Accept {
        endpoint: Endpoint,
        source: std::io::Error,
    },
    #[error("incoming migration: {0}")]
    Stream(#[from] migration::stream::StreamError),
    #[error("incoming migration: {0}")]
    Migration(#[from] MigrationError),
    #[error("incoming migration: {0}")]
    Vm(#[from] crate::vm::VmError),
    #[error("incoming migration: {0}")]
    Restore(#[from] migration::VmSideError),
}

/// Receives a VM from `endpoint` and resumes it. The returned VM runs like a booted one; after a
/// postcopy switch its remaining pages keep arriving in the background.
pub fn receive(
    endpoint: &Endpoint,
    opts: &HostOptions,
    start: Instant,
) -> Result<Vm, IncomingError> {
    if let Endpoint::File(path) = endpoint {
        return super::restore::restore(path, opts, start);
    }
    eprintln!("tern: waiting for an incoming migration on {endpoint}");
    let (mut channel, listening) =
        transport::accept_keep(endpoint).map_err(|source| IncomingError::Accept {
            endpoint: endpoint.clone(),
            source,
        })?;
    // Kept listening for RAM channels and a postcopy preempt channel (a Unix path goes with it).
    let t0 = Instant::now();
    let reader = channel
        .reader
        .take()
        .ok_or_else(|| migration::stream::StreamError::Truncated("nothing to read".into()))?;
    let return_path: Option<ReturnPath> = channel
        .writer
        .take()
        .map(|w| Arc::new(Mutex::new(StreamWriter::new(w))));
    let mut rx = StreamReader::new(reader);
    // The source hears from this side at least every second until the migration ends here.
    let mut heartbeat = match &return_path {
        Some(rp) => Some(Heartbeat::start(rp.clone()).map_err(|e| {
            IncomingError::Migration(MigrationError::NoAnswer(format!(
                "starting the heartbeat: {e}"
            )))
        })?),
        None => None,
    };
    let fds = std::mem::take(&mut channel.fds);
    let result = (|| {
        let (record, local) = incoming::read_start(&mut rx)?;
        let incompatible = |e: String| crate::vm::VmError::Incompatible(e);
        let local_ram = local.is_some();
        let vm = match local {
            Some(l) => {
                if !record.shared || l.regions != record.ram {
                    return Err(incompatible(format!(
                        "the local memory section names regions {:x?} for a configuration of \
{:x?} (shared={})",
                        l.regions, record.ram, record.shared
                    ))
                    .into());
                }
                let vm = build_for_incoming(&record, opts, Some(fds), start)?;
                // Built on the same memory: the source may pause the guest now.
                if let Some(rp) = &return_path {
                    let mut w = rp.lock().unwrap_or_else(|e| e.into_inner());
                    w.section(Section::Ready, &[])?;
                    w.flush()?;
                }
                vm
            }
            None if !fds.is_empty() => {
                return Err(incompatible(format!(
                    "the source sent {} file descriptors but no local memory section",
                    fds.len()
                ))
                .into())
            }
            None => build_for_incoming(&record, opts, None, start)?,
        };
        if opts.postcopy {
            // Until END (or a precopy-only completion) a discarded page would look missing.
            vm.inner.inhibit_discards(true);
        }
        let status = vm.inner.migration.clone();
        status.update(|s| {
            s.state = MigrationState::Active;
            s.role = "destination".into();
            s.endpoint = endpoint.to_string();
        });
        let options = incoming::Options {
            postcopy: opts.postcopy,
            vcpu_tids: vm.inner.vcpu_thread_ids(),
            local: local_ram,
            shared_ram: record.shared,
            preempt: Mutex::new(listening),
        };
        let received =
            incoming::receive(rx, &*vm.inner, &status, t0, return_path.clone(), &options)?;
        let (state, paused_at, postcopy) = match received {
            Received::Precopy { state, paused_at } => {
                vm.inner.inhibit_discards(false);
                (state, paused_at, false)
            }
            Received::Postcopy {
                state,
                paused_at,
                tail,
            } => {
                // Pages must land while the state loads: restoring the vCPUs' MSRs makes KVM
                // touch guest pages (kvmclock, steal time, PV EOI, async-PF areas of a Linux
                // guest) that may still be missing, and only the tail places them.
                let rp = return_path.clone().ok_or_else(|| {
                    MigrationError::Rejected("postcopy needs a return path".into())
                })?;
                spawn_postcopy_tail(&vm.inner, *tail, rp, t0, heartbeat.take());
                (state, paused_at, true)
            }
        };
        vm.inner.restore_state(state)?;
        vm.inner.resume()?;
        let downtime_ms = paused_at
            .map(|p| unix_ns().saturating_sub(p) as f64 / 1e6)
            .unwrap_or(0.0);
        status.update(|s| {
            s.downtime_ms = downtime_ms;
            if postcopy {
                // The tail may have finished already (a small guest).
                if s.state == MigrationState::Active {
                    s.phase = Phase::Running;
                }
            } else {
                s.total_ms = t0.elapsed().as_secs_f64() * 1e3;
                s.throughput_mbps = s.bytes as f64 / t0.elapsed().as_secs_f64() / 1e6;
                s.state = MigrationState::Completed;
            }
        });
        Ok::<_, IncomingError>((vm, postcopy))
    })();
    let (vm, postcopy) = match result {
        Ok(v) => v,
        Err(e) => {
            if let Some(rp) = &return_path {
                if let Err(ae) = incoming::answer(rp, Err(e.to_string())) {
                    log::warn!("cannot answer the source: {ae}");
                }
            }
            return Err(e);
        }
    };
    if !postcopy {
        drop(heartbeat.take());
        if let Some(rp) = &return_path {
            if let Err(e) = incoming::answer(rp, Ok(())) {
                log::warn!("cannot answer the source: {e}");
            }
        }
        eprintln!("tern: {}", summary(&vm.inner.migration.get()));
    }
    Ok(vm)
}

/// RUNNING -> END: places the pages still arriving while the guest runs. If the connection drops,
/// the guest pauses here and the state says why.
pub(crate) fn spawn_postcopy_tail(
    vm: &Arc<VmInner>,
    tail: incoming::PostcopyTail,
    rp: ReturnPath,
    t0: Instant,
    heartbeat: Option<Heartbeat>,
) {
    let inner = vm.clone();
    let spawned = std::thread::Builder::new()
        .name("postcopy-listen".into())
        .spawn(move || {
            crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::PostcopyListen);
            let status = inner.migration.clone();
            let outcome = tail.run(&status);
            drop(heartbeat);
            match outcome {
                Ok(()) => {
                    // END: RAM is unregistered, so balloon discards are safe again.
                    let figures = tail.listener.finish();
                    let discarded = inner.inhibit_discards(false);
                    let complete = migration::postcopy::CompleteRecord {
                        figures,
                        downtime_ms: Some(status.get().downtime_ms).filter(|d| d.is_finite()),
                        balloon_pages_discarded_at_end: discarded,
                    };
                    status.update(|s| {
                        s.state = MigrationState::Completed;
                        s.phase = Phase::End;
                        s.remaining_bytes = 0;
                        s.total_ms = t0.elapsed().as_secs_f64() * 1e3;
                        s.postcopy = Some(complete.to_json());
                    });
                    if let Err(e) = incoming::complete(&rp, &complete) {
                        log::warn!("cannot tell the source postcopy completed: {e}");
                    }
                    eprintln!("tern: {}", summary(&status.get()));
                }
                Err(e) => {
                    let left = tail.listener.pages_left();
                    let paused = inner.pause().is_ok();
                    let msg = format!(
                        "postcopy broke: {e}; {left} pages never arrived; guest {} (state postcopy-paused: the source holds the missing pages)",
                        if paused {
                            "paused"
                        } else {
                            "could not be paused"
                        }
                    );
                    eprintln!("tern: error: {msg}");
                    *devices::bus::lock(&inner.postcopy_paused) = Some(tail.into_listener());
                    status.update(|s| {
                        s.state = MigrationState::PostcopyPaused;
                        s.error = Some(msg);
                    });
                }
            }
        });
    if let Err(e) = spawned {
        eprintln!("tern: error: cannot start the postcopy listener: {e}");
    }
}

/// `migrate-cancel`: stops a running outgoing migration before its switch.
pub fn cancel_outgoing(vm: &VmInner) -> Result<(), String> {
    let mut verdict = Ok(());
    vm.migration.update(|s| {
        verdict = if s.state != MigrationState::Active || s.role != "source" {
            Err("no outgoing migration is running".into())
        } else if s.switching {
            Err(
                "refused: the switch has begun, the guest is moving to (or already runs on) the \
destination; cancelling now could lose it"
                    .into(),
            )
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
pub fn set_paused(vm: &VmInner, pause: bool, force: bool) -> Result<(), String> {
    let status = vm.migration.get();
    if status.state == MigrationState::Active {
        return Err("a migration is in progress".into());
    }
    if !pause && status.state.guest_may_run_elsewhere() {
        let source = status.role == "source";
        // A parked source holds the whole guest: forcing is the way back when the destination
        // never ran it (it died before RUN or END arrived).
        if !(force && source) {
            return Err(format!(
                "refused: the migration ended in state {} and the guest may be running on the {} \
side; resuming here could run it twice{}",
                status.state,
                if source { "destination" } else { "source" },
                if source {
                    " (use --force only if you know the destination never ran it)"
                } else {
                    ""
                }
            ));
        }
    }
    let r = if pause { vm.pause() } else { vm.resume() };
    r.map_err(|e| e.to_string())
}

//! The destination of a migration over a connection, from the first byte to Complete: accept,
//! read the configuration, have the VMM build the VM ([`receive`]'s builder), receive RAM and
//! state ([`incoming::receive`]), restore and resume, answer the source, and after a postcopy
//! switch place the remaining pages in the background until END ([`spawn_postcopy_tail`]); after a
//! broken postcopy, [`recover`] takes the source's reconnection.

pub mod recover;

use std::fs::File;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::error::MigrationError;
use crate::incoming::{self, Answer, PostcopyTail, Received, ReturnPath};
use crate::peer::Heartbeat;
use crate::postcopy::{CompleteRecord, Listener};
use crate::progress::{summary, unix_ns, MigrationState, Phase, Role, StatusCell};
use crate::stream::{Section, StreamError, StreamReader, StreamWriter};
use crate::transport::{self, Endpoint};
use crate::{MigratableVm, VmConfigRecord, VmSideError};

/// What the destination needs from the VM it built, beyond [`MigratableVm`].
pub trait DestinationVm: MigratableVm {
    /// The status this VM's `migrate-status` shows (shared with the control API).
    fn status(&self) -> StatusCell;
    /// The vCPU threads' kernel thread ids: postcopy tells their faults from the VMM's own.
    fn vcpu_thread_ids(&self) -> Vec<u32>;
    /// Keeps a broken postcopy's listener (the pages still missing and where to ask for them)
    /// for a later `migrate-recover`.
    fn park_postcopy(&self, listener: Listener);
    /// Takes the parked listener back (a recovery starts).
    fn take_parked(&self) -> Option<Listener>;
}

/// What this side accepts.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Postcopy may be advised (`--postcopy` on the destination).
    pub postcopy: bool,
}

/// A built VM: what the caller keeps (`T`), and the same VM as the migration drives it.
pub type Built<T> = (T, Arc<dyn DestinationVm>);

/// Why an incoming migration failed (the source was told, when it could still hear).
#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
    #[error("waiting for the migration on {endpoint}: {source}")]
    Accept {
        endpoint: Endpoint,
        source: std::io::Error,
    },
    #[error("incoming migration: {0}")]
    Stream(#[from] StreamError),
    #[error("incoming migration: {0}")]
    Migration(#[from] MigrationError),
    /// The stream describes a VM this side will not build (checked before the builder runs).
    #[error("incoming migration: the incoming VM cannot be built here: {0}")]
    Incompatible(String),
    /// The builder's own error.
    #[error("incoming migration: {0}")]
    Build(Box<dyn std::error::Error + Send + Sync>),
    #[error("incoming migration: {0}")]
    Vm(#[from] VmSideError),
}

/// Receives a VM from `endpoint` (a connection, not a snapshot file): `build` makes it from the
/// stream's configuration and, for a local migration, the guest RAM the source handed over
/// (memfds already checked against the configuration's regions). Returns once the guest runs;
/// after a postcopy switch its remaining pages keep arriving on a `postcopy-listen` thread.
pub fn receive<T, E>(
    endpoint: &Endpoint,
    options: &Options,
    build: impl FnOnce(&VmConfigRecord, Option<Vec<File>>) -> Result<Built<T>, E>,
) -> Result<T, DestinationError>
where
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    eprintln!("tern: waiting for an incoming migration on {endpoint}");
    let (mut channel, listening) =
        transport::accept_keep(endpoint).map_err(|source| DestinationError::Accept {
            endpoint: endpoint.clone(),
            source,
        })?;
    // Kept listening for RAM channels and a postcopy preempt channel (a Unix path goes with it).
    let t0 = Instant::now();
    let reader = channel
        .reader
        .take()
        .ok_or_else(|| StreamError::Truncated("nothing to read".into()))?;
    let return_path: Option<ReturnPath> = channel
        .writer
        .take()
        .map(|w| Arc::new(Mutex::new(StreamWriter::new(w))));
    let mut rx = StreamReader::new(reader);
    // The source hears from this side at least every second until the migration ends here.
    let mut heartbeat = match &return_path {
        Some(rp) => Some(
            Heartbeat::start(rp.clone()).map_err(|source| MigrationError::Spawn {
                what: "heartbeat",
                source,
            })?,
        ),
        None => None,
    };
    let fds = std::mem::take(&mut channel.fds);
    let result = (|| {
        let incoming::Start {
            id,
            config: record,
            local,
        } = incoming::read_start(&mut rx).map_err(crate::peer::from_source)?;
        let local_ram = local.is_some();
        let (kept, vm) = match local {
            Some(l) => {
                if !record.shared || l.regions != record.ram {
                    return Err(DestinationError::Incompatible(format!(
                        "the local memory section names regions {:x?} for a configuration of \
{:x?} (shared={})",
                        l.regions, record.ram, record.shared
                    )));
                }
                let built =
                    build(&record, Some(fds)).map_err(|e| DestinationError::Build(e.into()))?;
                // Built on the same memory: the source may pause the guest now.
                if let Some(rp) = &return_path {
                    let mut w = rp.lock().unwrap_or_else(|e| e.into_inner());
                    w.section(Section::Ready, &[])?;
                    w.flush()?;
                }
                built
            }
            None if !fds.is_empty() => {
                return Err(DestinationError::Incompatible(format!(
                    "the source sent {} file descriptors but no local memory section",
                    fds.len()
                )))
            }
            None => build(&record, None).map_err(|e| DestinationError::Build(e.into()))?,
        };
        if options.postcopy {
            // Until END (or a precopy-only completion) a discarded page would look missing.
            vm.inhibit_discards(true);
        }
        let status = vm.status();
        status.update(|s| {
            s.state = MigrationState::Active;
            s.role = Role::Destination;
            s.endpoint = endpoint.to_string();
            s.migration_id = Some(id);
        });
        let stream_options = incoming::Options {
            postcopy: options.postcopy,
            vcpu_tids: vm.vcpu_thread_ids(),
            local: local_ram,
            shared_ram: record.shared,
            preempt: Mutex::new(listening),
            id,
        };
        let received =
            incoming::receive(rx, &*vm, &status, t0, return_path.clone(), &stream_options)?;
        let (state, paused_at, postcopy) = match received {
            Received::Precopy { state, paused_at } => {
                vm.inhibit_discards(false);
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
                spawn_postcopy_tail(vm.clone(), *tail, rp, t0, heartbeat.take());
                (state, paused_at, true)
            }
        };
        vm.restore_state(state)?;
        vm.resume()?;
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
        Ok::<_, DestinationError>((kept, status, postcopy))
    })();
    let (kept, status, postcopy) = match result {
        Ok(v) => v,
        Err(e) => {
            if let Some(rp) = &return_path {
                if let Err(ae) = incoming::answer(rp, Answer::Abort(&e.to_string())) {
                    log::warn!("cannot answer the source: {ae}");
                }
            }
            return Err(e);
        }
    };
    if !postcopy {
        drop(heartbeat.take());
        if let Some(rp) = &return_path {
            if let Err(e) = incoming::answer(rp, Answer::Resumed) {
                log::warn!("cannot answer the source: {e}");
            }
        }
        eprintln!("tern: {}", summary(&status.get()));
    }
    Ok(kept)
}

/// RUNNING -> END on a `postcopy-listen` thread: places the pages still arriving while the guest
/// runs, then answers END with the Complete section. If the connection drops, the guest pauses
/// here, the listener is parked for a recovery and the state says why.
pub fn spawn_postcopy_tail(
    vm: Arc<dyn DestinationVm>,
    tail: PostcopyTail,
    rp: ReturnPath,
    t0: Instant,
    heartbeat: Option<Heartbeat>,
) {
    let spawned = std::thread::Builder::new()
        .name("postcopy-listen".into())
        .spawn(move || {
            crate::thread_started("postcopy-listen");
            let status = vm.status();
            let outcome = tail.run(&status);
            drop(heartbeat);
            match outcome {
                Ok(()) => {
                    // END: RAM is unregistered, so balloon discards are safe again.
                    let figures = tail.listener.finish();
                    let discarded = vm.inhibit_discards(false);
                    let complete = CompleteRecord {
                        figures,
                        downtime_ms: Some(status.get().downtime_ms).filter(|d| d.is_finite()),
                        balloon_pages_discarded_at_end: discarded,
                    };
                    status.update(|s| {
                        s.state = MigrationState::Completed;
                        s.phase = Phase::End;
                        s.remaining_bytes = 0;
                        s.total_ms = t0.elapsed().as_secs_f64() * 1e3;
                        s.postcopy = Some(crate::postcopy::PostcopyStatus {
                            complete: complete.clone(),
                            source: None,
                        });
                    });
                    if let Err(e) = incoming::complete(&rp, &complete) {
                        log::warn!("cannot tell the source postcopy completed: {e}");
                    }
                    eprintln!("tern: {}", summary(&status.get()));
                }
                Err(e) => {
                    let left = tail.listener.pages_left();
                    let paused = vm.pause().is_ok();
                    let msg = format!(
                        "postcopy broke after the switch: {e}; {left} pages are still missing \
                         here (they never arrived; only the source holds them); guest {} (state \
                         postcopy-paused)",
                        if paused {
                            "paused"
                        } else {
                            "could not be paused"
                        }
                    );
                    eprintln!("tern: error: {msg}");
                    vm.park_postcopy(tail.into_listener());
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

//! Starting migrations: the outgoing thread behind the `migrate` command, and `--incoming`.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::VmExitReason;
use migration::incoming::{self, Received, ReturnPath};
use migration::outgoing::{self, MigrationError, Params};
use migration::progress::{summary, unix_ns, MigrationStatus};
use migration::stream::StreamReader;
use migration::stream::{Section, StreamWriter};
use migration::transport::{self, Endpoint};
use migration::MigratableVm;

use crate::apf::AsyncPfMode;
use crate::config::{KernelImage, MemoryConfig, SerialConfig, VmConfig};
use crate::vm::{Origin, Vm, VmInner};

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
        s.state = "active".into();
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
                    eprintln!(
                        "tern: error: migration to {endpoint} failed, guest keeps running: {e}"
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

/// What the destination accepts, from its command line.
pub struct IncomingOptions {
    pub serial: SerialConfig,
    pub async_pf: AsyncPfMode,
    pub postcopy: bool,
}

/// The VM an incoming stream describes, through the command line's checks (and one more: the RAM
/// layout must be the one tern builds for that size), before anything is created.
fn config_from_record(
    record: &migration::VmConfigRecord,
    opts: &IncomingOptions,
) -> Result<VmConfig, crate::vm::VmError> {
    let refuse = |e: String| {
        crate::vm::VmError::Incompatible(format!("the stream's configuration is refused: {e}"))
    };
    let memory = MemoryConfig {
        size: record.memory_size,
        mergeable: record.mergeable,
        ..Default::default()
    };
    memory.check().map_err(|e| refuse(e.to_string()))?;
    if let Some(host) = crate::config::host_memory_bytes() {
        memory
            .check_host_fits(host)
            .map_err(|e| refuse(e.to_string()))?;
    }
    let layout: Vec<(u64, u64)> = crate::memory::ram_ranges(memory.size)
        .into_iter()
        .map(|(a, l)| (a.0, l))
        .collect();
    if record.ram != layout {
        return Err(refuse(format!(
            "RAM regions {:x?} do not match {} bytes of memory",
            record.ram, memory.size
        )));
    }
    let vcpus =
        crate::config::check_vcpus(record.vcpus.into()).map_err(|e| refuse(e.to_string()))?;
    Ok(VmConfig {
        memory,
        vcpus,
        kernel: KernelImage::Builtin,
        cmdline: String::new(),
        initramfs: None,
        serial: opts.serial.clone(),
        serial2: crate::config::Serial2Config::Off,
        async_pf: opts.async_pf,
        // Built from the config record.
        balloon: None,
    })
}

/// Receives a VM from `endpoint` and resumes it. The returned VM runs like a booted one; after a
/// postcopy switch its remaining pages keep arriving in the background.
pub fn receive(
    endpoint: &Endpoint,
    opts: IncomingOptions,
    start: Instant,
) -> Result<Vm, IncomingError> {
    eprintln!("tern: waiting for an incoming migration on {endpoint}");
    let mut channel = transport::accept(endpoint).map_err(|source| IncomingError::Accept {
        endpoint: endpoint.clone(),
        source,
    })?;
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
    let result = (|| {
        let record = incoming::read_config(&mut rx)?;
        let cfg = config_from_record(&record, &opts)?;
        let vm = Vm::create(&cfg, Origin::Incoming(&record), start)?;
        if opts.postcopy {
            // Until END (or a precopy-only completion) a discarded page would look missing.
            vm.inner.inhibit_discards(true);
        }
        let status = vm.inner.migration.clone();
        status.update(|s| {
            s.state = "active".into();
            s.role = "destination".into();
            s.endpoint = endpoint.to_string();
        });
        let options = incoming::Options {
            postcopy: opts.postcopy,
            vcpu_tids: vm.inner.vcpu_thread_ids(),
        };
        let received =
            incoming::receive(rx, &*vm.inner, &status, t0, return_path.clone(), &options)?;
        let (state, paused_at, tail) = match received {
            Received::Precopy { state, paused_at } => {
                vm.inner.inhibit_discards(false);
                (state, paused_at, None)
            }
            Received::Postcopy {
                state,
                paused_at,
                tail,
            } => (state, paused_at, Some(tail)),
        };
        vm.inner.restore_state(state)?;
        vm.inner.resume()?;
        let downtime_ms = paused_at
            .map(|p| unix_ns().saturating_sub(p) as f64 / 1e6)
            .unwrap_or(0.0);
        status.update(|s| {
            s.total_ms = t0.elapsed().as_secs_f64() * 1e3;
            s.downtime_ms = downtime_ms;
            s.throughput_mbps = s.bytes as f64 / t0.elapsed().as_secs_f64() / 1e6;
            match tail {
                Some(_) => s.phase = "RUNNING".into(),
                None => s.state = "completed".into(),
            }
        });
        Ok::<_, IncomingError>((vm, tail))
    })();
    let (vm, tail) = match result {
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
    match (tail, return_path) {
        (Some(tail), Some(rp)) => spawn_postcopy_tail(&vm, tail, rp, t0),
        (None, Some(rp)) => {
            if let Err(e) = incoming::answer(&rp, Ok(())) {
                log::warn!("cannot answer the source: {e}");
            }
            eprintln!("tern: {}", summary(&vm.inner.migration.get()));
        }
        _ => eprintln!("tern: {}", summary(&vm.inner.migration.get())),
    }
    Ok(vm)
}

/// RUNNING -> END: places the pages still arriving while the guest runs. If the connection drops,
/// the guest pauses here and the state says why.
fn spawn_postcopy_tail(vm: &Vm, tail: incoming::PostcopyTail, rp: ReturnPath, t0: Instant) {
    let inner = vm.inner.clone();
    let spawned = std::thread::Builder::new()
        .name("postcopy-listen".into())
        .spawn(move || {
            crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::PostcopyListen);
            let status = inner.migration.clone();
            match tail.run(&status) {
                Ok(()) => {
                    // END: RAM is unregistered, so balloon discards are safe again.
                    let figures = tail.listener.finish();
                    let discarded = inner.inhibit_discards(false);
                    let downtime = status.get().downtime_ms;
                    let mut json = serde_json::to_value(&figures).unwrap_or_default();
                    json["downtime_ms"] = downtime.into();
                    json["balloon_pages_discarded_at_end"] = discarded.into();
                    status.update(|s| {
                        s.state = "completed".into();
                        s.phase = "END".into();
                        s.remaining_bytes = 0;
                        s.total_ms = t0.elapsed().as_secs_f64() * 1e3;
                        s.postcopy = Some(json.clone());
                    });
                    let mut w = rp.lock().unwrap_or_else(|e| e.into_inner());
                    if let Err(e) = w.record(Section::Complete, &json).and_then(|_| w.flush()) {
                        log::warn!("cannot tell the source postcopy completed: {e}");
                    }
                    eprintln!("tern: {}", summary(&status.get()));
                }
                Err(e) => {
                    let left = tail.listener.pages_left();
                    let paused = inner.pause().is_ok();
                    let msg = format!(
                        "postcopy broke: {e}; {left} pages never arrived; guest {}",
                        if paused {
                            "paused"
                        } else {
                            "could not be paused"
                        }
                    );
                    eprintln!("tern: error: {msg}");
                    status.update(|s| {
                        s.state = "failed".into();
                        s.error = Some(msg);
                    });
                }
            }
        });
    if let Err(e) = spawned {
        eprintln!("tern: error: cannot start the postcopy listener: {e}");
    }
}

/// Parameters for outgoing migrations, from the command line.
pub fn params(
    downtime_ms: u64,
    max_iterations: u32,
    timeout_s: u64,
    postcopy: bool,
    postcopy_after_iterations: Option<u32>,
) -> Params {
    Params {
        downtime: std::time::Duration::from_millis(downtime_ms),
        max_iterations,
        timeout: std::time::Duration::from_secs(timeout_s),
        postcopy,
        postcopy_after_iterations,
    }
}

/// Pauses or resumes the guest from the control API (refused while migrating).
pub fn set_paused(vm: &VmInner, pause: bool) -> Result<(), String> {
    if vm.migration.is_active() {
        return Err("a migration is in progress".into());
    }
    let r = if pause { vm.pause() } else { vm.resume() };
    r.map_err(|e| e.to_string())
}

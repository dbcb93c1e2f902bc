//! Starting migrations: the outgoing thread behind the `migrate` command, and `--incoming`.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use devices::VmExitReason;
use migration::incoming;
use migration::outgoing::{self, MigrationError, Params};
use migration::progress::{summary, MigrationStatus};
use migration::stream::StreamReader;
use migration::transport::{self, Endpoint};
use migration::MigratableVm;

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

/// Nanoseconds since the Unix epoch, for downtime across two local processes.
pub fn now_unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
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

/// Receives a VM from `endpoint` and resumes it. The returned VM runs like a booted one.
pub fn receive(
    endpoint: &Endpoint,
    serial: SerialConfig,
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
    let mut rx = StreamReader::new(reader);
    let result = (|| {
        let record = incoming::read_config(&mut rx)?;
        let cfg = VmConfig {
            memory: MemoryConfig {
                size: record.memory_size,
                mergeable: record.mergeable,
                ..Default::default()
            },
            vcpus: record.vcpus,
            kernel: KernelImage::Builtin,
            cmdline: String::new(),
            initramfs: None,
            serial,
            serial2: crate::config::Serial2Config::Off,
            async_pf: crate::apf::AsyncPfMode::Kvm,
        };
        if let Some(host) = crate::config::host_memory_bytes() {
            cfg.memory
                .check_host_fits(host)
                .map_err(|e| crate::vm::VmError::Incompatible(e.to_string()))?;
        }
        let vm = Vm::create(&cfg, Origin::Incoming(&record), start)?;
        let status = vm.inner.migration.clone();
        status.update(|s| {
            s.state = "active".into();
            s.role = "destination".into();
            s.endpoint = endpoint.to_string();
        });
        let (state, paused_at) = incoming::receive(&mut rx, &*vm.inner, &status, t0)?;
        vm.inner.restore_state(state)?;
        vm.inner.resume()?;
        let downtime_ms = paused_at
            .map(|p| now_unix_ns().saturating_sub(p) as f64 / 1e6)
            .unwrap_or(0.0);
        status.update(|s| {
            s.state = "completed".into();
            s.total_ms = t0.elapsed().as_secs_f64() * 1e3;
            s.downtime_ms = downtime_ms;
            s.throughput_mbps = s.bytes as f64 / t0.elapsed().as_secs_f64() / 1e6;
        });
        Ok::<_, IncomingError>(vm)
    })();
    if let Some(w) = channel.writer.take() {
        let outcome = result.as_ref().map(|_| ()).map_err(|e| e.to_string());
        if let Err(e) = incoming::answer(w, outcome) {
            log::warn!("cannot answer the source: {e}");
        }
    }
    let vm = result?;
    eprintln!("tern: {}", summary(&vm.inner.migration.get()));
    Ok(vm)
}

/// Parameters for outgoing migrations, from the command line.
pub fn params(downtime_ms: u64, max_iterations: u32, timeout_s: u64) -> Params {
    Params {
        downtime: std::time::Duration::from_millis(downtime_ms),
        max_iterations,
        timeout: std::time::Duration::from_secs(timeout_s),
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

//! The VM as it runs: KVM VM, guest memory, devices and vCPU threads (built by `builder`), and
//! its event loop.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use devices::legacy::SerialDevice;
use devices::{BusError, ExitRequest, VmExitReason};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use migration::progress::StatusCell;
use migration::VmConfigRecord;
use thiserror::Error;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::apf::{ApfController, AsyncPfMode};
use crate::boot::BootError;
use crate::cpu::vcpu::VcpuError;
use crate::cpu::VcpuHandle;
use crate::event_loop::{self, ConsoleInput, SignalWatcher, Subscriber};
use crate::lazy::{self, LazyMemory};
use crate::memory::{GuestMemory, MemoryError};
use crate::serial_socket::SerialSocket;

#[derive(Debug, Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0} (is KVM available and accessible to this user?)")]
    OpenKvm(kvm_ioctls::Error),
    #[error("{what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("device setup: {0}")]
    Bus(#[from] BusError),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("event loop: {0:?}")]
    EventLoop(event_manager::Error),
    #[error(transparent)]
    Lazy(#[from] lazy::LazyError),
    #[error("the incoming VM cannot be built here: {0}")]
    Incompatible(String),
    #[error("the incoming VM cannot be built here: {0}")]
    Refused(#[from] crate::machine::RecordRefused),
    #[error("{0}")]
    Seccomp(String),
}

pub(crate) fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

pub(crate) fn io_err(what: &'static str) -> impl Fn(std::io::Error) -> VmError {
    move |source| VmError::Io { what, source }
}

/// The parts of a VM that the vCPU controller, the migration and the control API share.
pub struct VmInner {
    pub vm_fd: Arc<VmFd>,
    pub mem: GuestMemory,
    pub exit: Arc<ExitRequest>,
    pub com1: Arc<Mutex<SerialDevice>>,
    pub record: VmConfigRecord,
    pub vcpus: Vec<VcpuHandle>,
    pub migration: StatusCell,
    pub dirty_logging: AtomicBool,
    /// How dirty pages are fetched and re-armed (`migrate::dirty::DirtyLogMode` as u8).
    pub dirty_mode: std::sync::atomic::AtomicU8,
    pub paused: AtomicBool,
    pub apf: Option<Arc<ApfController>>,
    /// `--async-pf` on this side: with `off`, an incoming guest's async-PF MSRs are not restored.
    pub async_pf: AsyncPfMode,
    pub lazy: Option<LazyMemory>,
    pub vcpu_tids: Arc<Mutex<Vec<u32>>>,
    pub balloon: Option<crate::balloon::SharedBalloon>,
    /// The devices whose state migrates (COM1, COM2, the balloon), by name.
    pub devices: crate::migrate::device_set::DeviceSet,
    /// A destination's postcopy machinery while postcopy is paused (broken connection), kept
    /// for `migrate-recover`.
    pub postcopy_paused: Mutex<Option<migration::postcopy::Listener>>,
    /// A lazy snapshot restore's fault thread (`--incoming file: --restore lazy`).
    pub restore_lazy: Mutex<Option<LazyMemory>>,
    /// This process's page table, for which guest pages hold data (None: unreadable here).
    pub pagemap: Option<crate::pagemap::Pagemap>,
}

pub struct Vm {
    pub inner: Arc<VmInner>,
    /// COM1 is on tern's terminal: its input goes to the guest.
    pub(crate) console_input: bool,
    /// COM2's socket side (`--serial2 socket=PATH`), for the caller to add to the event loop.
    pub serial2: Option<SerialSocket>,
}

impl Vm {
    /// Runs the event loop until the guest (or the host) ends the VM; returns why it ended.
    pub fn run(self, mut extra: Vec<Subscriber>) -> Result<VmExitReason, VmError> {
        let inner = self.inner;
        extra.push(Arc::new(Mutex::new(
            SignalWatcher::install(inner.exit.clone()).map_err(io_err("signal handlers"))?,
        )));
        if self.console_input {
            extra.push(Arc::new(Mutex::new(ConsoleInput::new(inner.com1.clone()))));
        }
        crate::seccomp::install(crate::seccomp::ThreadKind::Main)
            .map_err(|e| VmError::Seccomp(e.to_string()))?;
        let result = event_loop::run(inner.exit.clone(), extra);
        if result.is_err() {
            inner
                .exit
                .request(VmExitReason::Crash("event loop failed".into()));
        }
        for v in &inner.vcpus {
            v.stop();
        }
        report_lazy(&inner);
        result.map_err(VmError::EventLoop)
    }
}

/// Figures for lazy memory and tern's async page faults, printed when the VM ends.
fn report_lazy(inner: &VmInner) {
    use std::sync::atomic::Ordering::Relaxed;
    let Some(lazy) = &inner.lazy else { return };
    let s = &lazy.stats;
    eprintln!(
        "tern: lazy memory: {} faults, {} pages placed, mean fault-to-ready {:.1} us",
        s.faults.load(Relaxed),
        s.pages.load(Relaxed),
        lazy::mean_latency(s).as_secs_f64() * 1e6
    );
    if let Some(apf) = &inner.apf {
        let a = &apf.stats;
        eprintln!(
            "tern: async PF (tern): {} not-present, {} ready, {} acks, {} faults the vCPU waited out",
            a.not_present.load(Relaxed),
            a.ready.load(Relaxed),
            a.acks.load(Relaxed),
            a.blocked.load(Relaxed)
        );
    }
}

/// Registers (or re-registers, to switch dirty logging) every RAM region with KVM.
pub fn register_memory(vm_fd: &VmFd, mem: &GuestMemory, log_dirty: bool) -> Result<(), VmError> {
    for (slot, region) in mem.iter().enumerate() {
        let region_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: if log_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
        };
        // SAFETY: the host range is a live mapping owned by `mem`; the VM and its memory live in
        // the same VmInner and go away together.
        unsafe { vm_fd.set_user_memory_region(region_desc) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

//! One vCPU: its KVM state set-up and the run loop its thread executes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;

use devices::{ExitRequest, MmioBus, PioBus, VmExitReason};
use kvm_bindings::{kvm_run, CpuId};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use thiserror::Error;

use super::state::{self, StatePolicy};
use super::{cpuid, lapic, msrs};
use crate::apf::ApfController;
use crate::boot::{regs, EntryState};
use crate::compat;
use crate::memory::GuestMemory;
use migration::state::VcpuState;

#[derive(Debug, Error)]
pub enum VcpuError {
    #[error("vcpu {id}: {what}: {source}")]
    Kvm {
        id: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vcpu {id}: building the MSR list failed")]
    MsrList { id: u8 },
    #[error("vcpu {id}: KVM accepted only {set} of {total} boot MSRs")]
    MsrsRejected { id: u8, set: usize, total: usize },
}

/// What every vCPU thread shares: the devices, the exit request and guest memory.
pub struct VcpuContext {
    pub pio: PioBus,
    pub mmio: MmioBus,
    pub exit: Arc<ExitRequest>,
    pub mem: GuestMemory,
    pub state_policy: StatePolicy,
    /// tern-owned async page faults (`--async-pf tern`).
    pub apf: Option<Arc<ApfController>>,
    /// Each vCPU thread's kernel thread id, once it runs (faults name the faulting thread).
    pub tids: Arc<std::sync::Mutex<Vec<u32>>>,
}

/// Requests a paused vCPU thread serves (it owns its VcpuFd, so it does the KVM calls itself).
pub enum Request {
    SaveState,
    Restore(Box<VcpuState>),
    Resume,
    Exit,
}

pub enum Response {
    Paused,
    State(Result<Box<VcpuState>, state::StateError>),
    Restored(Result<(), state::StateError>),
    Resumed,
}

/// The vCPU thread's ends of its control channel.
pub struct ControlPort {
    pub pause: Arc<AtomicBool>,
    pub requests: Receiver<Request>,
    pub responses: Sender<Response>,
}

pub struct Vcpu {
    pub id: u8,
    fd: VcpuFd,
    ctx: Arc<VcpuContext>,
}

/// The size of each access in the current KVM_EXIT_IO.
fn io_access_size(run: *const kvm_run) -> usize {
    // SAFETY: `run` is this vCPU's kvm_run mapping, alive as long as its VcpuFd (the caller's);
    // KVM filled the `io` member for this KVM_EXIT_IO exit. Only the header is read; the data
    // the caller holds lies at io.data_offset, past the header, so nothing aliases.
    let size = unsafe { std::ptr::addr_of!((*run).__bindgen_anon_1.io.size).read() };
    usize::from(size).max(1)
}

impl Vcpu {
    pub fn create_fd(vm: &VmFd, id: u8) -> Result<VcpuFd, VcpuError> {
        vm.create_vcpu(u64::from(id))
            .map_err(|source| VcpuError::Kvm {
                id,
                what: "KVM_CREATE_VCPU",
                source,
            })
    }

    pub fn new(id: u8, fd: VcpuFd, ctx: Arc<VcpuContext>) -> Self {
        Vcpu { id, fd, ctx }
    }

    fn kvm_err(&self, what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VcpuError {
        let id = self.id;
        move |source| VcpuError::Kvm { id, what, source }
    }

    /// CPUID, MSRs and LAPIC for every vCPU; the boot vCPU also gets the 64-bit entry state.
    /// Application processors stay in KVM's wait-for-SIPI state until the guest starts them.
    pub fn configure(
        &self,
        cpuid_template: &CpuId,
        vcpus: u8,
        boot_entry: Option<EntryState>,
    ) -> Result<(), VcpuError> {
        let tsc_khz = self
            .fd
            .get_tsc_khz()
            .map_err(self.kvm_err("KVM_GET_TSC_KHZ"))?;
        let cpuid = cpuid::for_vcpu(cpuid_template, self.id, vcpus, tsc_khz);
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(self.kvm_err("KVM_SET_CPUID2"))?;
        let boot_msrs = msrs::boot_msrs().map_err(|_| VcpuError::MsrList { id: self.id })?;
        let set = self
            .fd
            .set_msrs(&boot_msrs)
            .map_err(self.kvm_err("KVM_SET_MSRS"))?;
        if set != boot_msrs.as_slice().len() {
            return Err(VcpuError::MsrsRejected {
                id: self.id,
                set,
                total: boot_msrs.as_slice().len(),
            });
        }
        let mut lapic_state = self.fd.get_lapic().map_err(self.kvm_err("KVM_GET_LAPIC"))?;
        lapic::configure_lint(&mut lapic_state);
        self.fd
            .set_lapic(&lapic_state)
            .map_err(self.kvm_err("KVM_SET_LAPIC"))?;
        if let Some(entry) = boot_entry {
            let sregs = self.fd.get_sregs().map_err(self.kvm_err("KVM_GET_SREGS"))?;
            let (sregs, gprs) = match entry {
                EntryState::Long64 { rip } => (regs::boot_sregs(sregs), regs::boot_regs(rip)),
                EntryState::Multiboot32 { eip, info } => (
                    regs::protected_mode_sregs(sregs),
                    regs::multiboot_regs(eip, info),
                ),
            };
            self.fd
                .set_sregs(&sregs)
                .map_err(self.kvm_err("KVM_SET_SREGS"))?;
            self.fd
                .set_regs(&gprs)
                .map_err(self.kvm_err("KVM_SET_REGS"))?;
            self.fd
                .set_fpu(&regs::boot_fpu())
                .map_err(self.kvm_err("KVM_SET_FPU"))?;
        }
        Ok(())
    }

    fn crash(&self, msg: String) {
        self.ctx.exit.request(VmExitReason::Crash(msg));
    }

    /// Describes where the guest is, for error messages.
    fn where_(&self) -> String {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => format!(
                "rip={:#x} rsp={:#x} cpl={} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
                r.rip,
                r.rsp,
                s.cs.selector & 3,
                s.cr0,
                s.cr3,
                s.cr4,
                s.efer
            ),
            _ => "registers unavailable".into(),
        }
    }

    /// Serves requests while paused; returns false when the thread should end.
    fn paused(&mut self, port: &ControlPort) -> bool {
        if port.responses.send(Response::Paused).is_err() {
            return false;
        }
        loop {
            let reply = match port.requests.recv() {
                Ok(Request::SaveState) => Response::State(
                    state::save(&self.fd, self.id, &self.ctx.state_policy).map(Box::new),
                ),
                Ok(Request::Restore(s)) => {
                    Response::Restored(state::restore(&self.fd, &s, &self.ctx.state_policy))
                }
                Ok(Request::Resume) => {
                    port.pause.store(false, Ordering::SeqCst);
                    return port.responses.send(Response::Resumed).is_ok();
                }
                Ok(Request::Exit) | Err(_) => return false,
            };
            if port.responses.send(reply).is_err() {
                return false;
            }
        }
    }

    /// Runs the guest until the VM is asked to exit, pausing when the controller asks.
    pub fn run(mut self, port: ControlPort) {
        if let Some(slot) = devices::bus::lock(&self.ctx.tids).get_mut(self.id as usize) {
            // SAFETY: gettid has no preconditions.
            *slot = unsafe { libc::gettid() } as u32;
        }
        if let Some(apf) = &self.ctx.apf {
            apf.register_thread(self.id);
        }
        let run_area: *const kvm_run = self.fd.get_kvm_run();
        let mut syscall = compat::SyscallAssist::new();
        let mut exits = compat::ExitCounts::default();
        while !self.ctx.exit.is_requested() {
            if port.pause.load(Ordering::SeqCst) {
                if !self.paused(&port) {
                    return;
                }
                // A restore may have left async-PF work for this thread.
                self.after_kick();
                continue;
            }
            syscall.before_run(&self.fd, &self.ctx.mem);
            let result = self.fd.run();
            exits.record(&result);
            match result {
                // String I/O (`rep outsb`...) brings `count` accesses of `size` bytes in one exit.
                Ok(VcpuExit::IoOut(port, data)) => {
                    for access in data.chunks(io_access_size(run_area)) {
                        if !self.ctx.pio.write(port, access) {
                            log::debug!("vcpu {}: write to unclaimed port {port:#x}", self.id);
                        }
                    }
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    for access in data.chunks_mut(io_access_size(run_area)) {
                        self.ctx.pio.read(port, access);
                    }
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !self.ctx.mmio.read(addr, data) {
                        log::debug!("vcpu {}: read from unclaimed MMIO {addr:#x}", self.id);
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if !self.ctx.mmio.write(addr, data) {
                        log::debug!("vcpu {}: write to unclaimed MMIO {addr:#x}", self.id);
                    }
                }
                Ok(VcpuExit::Hlt) => {}
                Ok(VcpuExit::Shutdown) => {
                    let msg = format!("vcpu {}: guest triple fault ({})", self.id, self.where_());
                    self.crash(msg);
                }
                Ok(VcpuExit::SystemEvent(kind, _)) => self.system_event(kind),
                Ok(VcpuExit::InternalError) => {
                    match compat::handle_internal_error(&mut self.fd, &self.ctx.mem) {
                        Ok(done) => log::debug!("vcpu {}: completed {done:?}", self.id),
                        Err(e) => {
                            let msg = format!("vcpu {}: {e}", self.id);
                            self.crash(msg);
                        }
                    }
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    let msg = format!(
                        "vcpu {}: KVM entry failed (hardware reason {reason:#x}, cpu {cpu}) ({})",
                        self.id,
                        self.where_()
                    );
                    self.crash(msg);
                }
                Ok(VcpuExit::Intr) => self.after_kick(),
                Ok(VcpuExit::Debug(arch)) => {
                    match syscall.handle_debug(&self.fd, &self.ctx.mem, &arch) {
                        Ok(compat::DebugOutcome::Syscall | compat::DebugOutcome::PageFault) => {}
                        Ok(compat::DebugOutcome::NotOurs) => {
                            let msg = format!(
                                "vcpu {}: unexpected debug exit {arch:?} ({})",
                                self.id,
                                self.where_()
                            );
                            self.crash(msg);
                        }
                        Err(e) => {
                            let msg = format!("vcpu {}: completing syscall: {e}", self.id);
                            self.crash(msg);
                        }
                    }
                }
                Ok(VcpuExit::X86Rdmsr(exit)) => {
                    match self
                        .ctx
                        .apf
                        .as_ref()
                        .and_then(|a| a.rdmsr(self.id, exit.index))
                    {
                        Some(v) => *exit.data = v,
                        None => *exit.error = 1,
                    }
                }
                Ok(VcpuExit::X86Wrmsr(exit)) => {
                    let ok = self
                        .ctx
                        .apf
                        .as_ref()
                        .map(|a| a.wrmsr(self.id, exit.index, exit.data));
                    if !matches!(ok, Some(Ok(()))) {
                        log::debug!(
                            "vcpu {}: #GP for wrmsr {:#x} <- {:#x}: {ok:?}",
                            self.id,
                            exit.index,
                            exit.data
                        );
                        *exit.error = 1;
                    }
                }
                Ok(other) => {
                    let exit = format!("{other:?}");
                    let msg = format!(
                        "vcpu {}: unhandled exit {exit} ({})",
                        self.id,
                        self.where_()
                    );
                    self.crash(msg);
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.after_kick()
                }
                Err(e) => {
                    let msg = format!("vcpu {}: KVM_RUN failed: {e} ({})", self.id, self.where_());
                    self.crash(msg);
                }
            }
        }
        log::info!("{}", exits.summary(self.id));
    }

    /// A kick can mean an async page fault is waiting for this vCPU's decision.
    fn after_kick(&self) {
        if let Some(apf) = &self.ctx.apf {
            apf.service(self.id, &self.fd);
        }
    }

    fn system_event(&self, kind: u32) {
        match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN | kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                self.ctx.exit.request(VmExitReason::Reset)
            }
            other => self.crash(format!("vcpu {}: guest system event {other}", self.id)),
        }
    }
}

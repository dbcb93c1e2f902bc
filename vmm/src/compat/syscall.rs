//! SYSCALL completion for this machine's hypervisor (design.md §1).
//!
//! A 64-bit `syscall` executed by guest user code (CPL3) is not completed by the hypervisor here:
//! the vCPU arrives at the guest's MSR_LSTAR target with RIP switched but CS/SS and RFLAGS still
//! those of user mode, so its first instruction fetch from the (supervisor) kernel text faults
//! (#PF, error 15) and the guest kills the process. tern finishes the transition itself:
//!
//! 1. Every vCPU puts a hardware execute breakpoint (DR0, through KVM_SET_GUEST_DEBUG) on the
//!    guest's LSTAR value as soon as one is known (its own LSTAR, or the one another vCPU saw:
//!    an application processor may run user code before it ever exits to tern).
//! 2. At the resulting `KVM_EXIT_DEBUG`, if RIP == LSTAR and CPL == 3, tern does what the
//!    instruction should have done: CS = STAR[47:32] (64-bit code, DPL 0), SS = STAR[47:32] + 8,
//!    RCX = return RIP, R11 = RFLAGS, RFLAGS &= ~SFMASK. RCX/R11 already hold the return address
//!    and the user flags here (the hypervisor's own hardware `syscall` wrote them), and are kept.
//!    RF is set so the breakpoint does not fire again on the same instruction, now at CPL0.
//! 3. If the guest is seen at LSTAR at CPL0, the hypervisor completed the instruction itself
//!    (a host with real VMX/SVM): the breakpoint is removed and never armed again in this
//!    process. It is only armed at all on a host like this one ([`super::host_emulates_kernel_mode`]).
//!
//! Cost: one extra exit to tern per guest system call (the return uses `sysretq`, which the
//! emulator runs). Only 64-bit `syscall` through LSTAR is handled; 32-bit entry (CSTAR, sysenter)
//! is not.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use kvm_bindings::{
    kvm_debug_exit_arch, kvm_guest_debug, kvm_msr_entry, kvm_segment, Msrs, KVM_GUESTDBG_ENABLE,
    KVM_GUESTDBG_USE_HW_BP,
};
use kvm_ioctls::VcpuFd;

const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// DR7: L0 and G0 (breakpoint 0 on), R/W0 = 00 (instruction), LEN0 = 00; bit 10 reads as one.
const DR7_EXEC_BP0: u64 = 0x403;
const RFLAGS_RF: u64 = 1 << 16;
const RFLAGS_FIXED: u64 = 1 << 1;
const DB_VECTOR: u32 = 1;

/// The LSTAR value last seen on any vCPU (0: none yet). tern runs one VM per process.
static KNOWN_LSTAR: AtomicU64 = AtomicU64::new(0);
/// Set when a vCPU was seen entering LSTAR at CPL0: the host completes `syscall` itself.
static HOST_COMPLETES: AtomicBool = AtomicBool::new(false);
/// Completed system calls, all vCPUs.
pub static COMPLETED: AtomicU64 = AtomicU64::new(0);

/// What a debug exit turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DebugOutcome {
    /// A system call was completed; the vCPU can run again.
    Completed,
    /// The breakpoint was stale or the host completed `syscall` itself; nothing to do.
    Resumed,
    /// Not our breakpoint: the caller decides (tern sets no other debug state).
    NotOurs,
}

/// Per-vCPU state: which address the breakpoint is on.
pub struct SyscallAssist {
    enabled: bool,
    armed: u64,
    own_lstar: u64,
}

fn read_msrs(fd: &VcpuFd) -> Result<[u64; 3], kvm_ioctls::Error> {
    let entries = [MSR_STAR, MSR_LSTAR, MSR_SYSCALL_MASK].map(|index| kvm_msr_entry {
        index,
        ..Default::default()
    });
    let mut msrs = Msrs::from_entries(&entries).map_err(|_| kvm_ioctls::Error::new(libc::E2BIG))?;
    let n = fd.get_msrs(&mut msrs)?;
    if n != entries.len() {
        return Err(kvm_ioctls::Error::new(libc::EINVAL));
    }
    let s = msrs.as_slice();
    Ok([s[0].data, s[1].data, s[2].data])
}

fn set_breakpoint(fd: &VcpuFd, addr: Option<u64>) -> Result<(), kvm_ioctls::Error> {
    let mut dbg = kvm_guest_debug::default();
    if let Some(addr) = addr {
        dbg.control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP;
        dbg.arch.debugreg[0] = addr;
        dbg.arch.debugreg[7] = DR7_EXEC_BP0;
    }
    fd.set_guest_debug(&dbg)
}

/// A flat 64-bit ring-0 code or data segment with the given selector.
fn ring0_segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 0,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

impl SyscallAssist {
    pub fn new() -> Self {
        SyscallAssist {
            enabled: super::host_emulates_kernel_mode(),
            armed: 0,
            own_lstar: 0,
        }
    }

    /// Before each KVM_RUN: arms the breakpoint once an LSTAR value is known. Polls this vCPU's
    /// LSTAR (one KVM_GET_MSRS) only until the guest has written it.
    pub fn before_run(&mut self, fd: &VcpuFd) {
        if !self.enabled {
            return;
        }
        if HOST_COMPLETES.load(Ordering::Relaxed) {
            if self.armed != 0 {
                if let Err(e) = set_breakpoint(fd, None) {
                    log::warn!("syscall assist: clearing the breakpoint: {e}");
                }
            }
            self.enabled = false;
            return;
        }
        if self.own_lstar == 0 {
            if let Ok([_, lstar, _]) = read_msrs(fd) {
                if lstar != 0 {
                    self.own_lstar = lstar;
                    KNOWN_LSTAR.store(lstar, Ordering::Relaxed);
                }
            }
        }
        let target = match self.own_lstar {
            0 => KNOWN_LSTAR.load(Ordering::Relaxed),
            own => own,
        };
        if target != 0 && target != self.armed {
            match set_breakpoint(fd, Some(target)) {
                Ok(()) => {
                    log::debug!("syscall assist: breakpoint on LSTAR {target:#x}");
                    self.armed = target;
                }
                Err(e) => {
                    log::warn!("syscall assist: KVM_SET_GUEST_DEBUG failed ({e}); disabled");
                    self.enabled = false;
                }
            }
        }
    }

    /// Handles a KVM_EXIT_DEBUG.
    pub fn handle_debug(
        &mut self,
        fd: &VcpuFd,
        exit: &kvm_debug_exit_arch,
    ) -> Result<DebugOutcome, kvm_ioctls::Error> {
        if self.armed == 0 || exit.exception != DB_VECTOR {
            return Ok(DebugOutcome::NotOurs);
        }
        let [star, lstar, sfmask] = read_msrs(fd)?;
        let mut regs = fd.get_regs()?;
        let mut sregs = fd.get_sregs()?;
        if lstar != self.armed {
            // The guest moved its entry point: follow it, and let the stale hit go.
            self.own_lstar = lstar;
            KNOWN_LSTAR.store(lstar, Ordering::Relaxed);
        }
        if regs.rip != lstar || sregs.cs.selector & 3 == 0 {
            if regs.rip == lstar {
                log::info!("syscall assist: the host completes syscall itself; disabled");
                HOST_COMPLETES.store(true, Ordering::Relaxed);
            }
            regs.rflags |= RFLAGS_RF;
            fd.set_regs(&regs)?;
            self.before_run(fd);
            return Ok(DebugOutcome::Resumed);
        }
        if COMPLETED.load(Ordering::Relaxed) < 3 {
            log::info!(
                "syscall assist: rip={:#x} rcx={:#x} r11={:#x} rflags={:#x} rax={} cs={:#x} ss={:#x} dr6={:#x}",
                regs.rip, regs.rcx, regs.r11, regs.rflags, regs.rax, sregs.cs.selector, sregs.ss.selector, exit.dr6
            );
        }
        let cs = ((star >> 32) & 0xfffc) as u16;
        sregs.cs = ring0_segment(cs, true);
        sregs.ss = ring0_segment(cs.wrapping_add(8), false);
        fd.set_sregs(&sregs)?;
        regs.rflags = (regs.rflags & !sfmask & !RFLAGS_RF) | RFLAGS_FIXED | RFLAGS_RF;
        fd.set_regs(&regs)?;
        COMPLETED.fetch_add(1, Ordering::Relaxed);
        Ok(DebugOutcome::Completed)
    }
}

impl Default for SyscallAssist {
    fn default() -> Self {
        Self::new()
    }
}

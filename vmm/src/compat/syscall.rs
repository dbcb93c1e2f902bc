//! SYSCALL completion for this machine's hypervisor (design.md §1).
//!
//! A 64-bit `syscall` executed by guest user code (CPL3) is not completed by the hypervisor here:
//! the vCPU arrives at the guest's MSR_LSTAR target with RIP switched but CS/SS and RFLAGS still
//! those of user mode, so its first instruction fetch from the (supervisor) kernel text faults
//! (#PF, error 0x15) and the guest kills the process. tern finishes the transition itself.
//!
//! A hardware breakpoint on the guest's entry point cannot be used: the hypervisor only loads
//! breakpoints on guest addresses it considers the guest's own (the user half and its own
//! kernel range), and drops one on 0xffffffff8xxxxxxx. So:
//!
//! 1. tern moves LSTAR to the entry's *alias* in the user half: the low 47 bits of the kernel
//!    address (`0xffffffff81400040` -> `0x7fff81400040`). The kernel address is recovered by
//!    sign-extending bit 47 back in, so the MSR value alone says where the guest wants to go (a
//!    snapshot or migration carries it as is).
//! 2. Each vCPU puts an execute breakpoint on the alias (DR0, KVM_SET_GUEST_DEBUG). A code
//!    breakpoint fires before the instruction fetch, so `syscall` now ends in KVM_EXIT_DEBUG.
//! 3. There tern does what the instruction should have done: RIP = the kernel entry,
//!    CS = STAR[47:32] (64-bit code, DPL 0), SS = STAR[47:32] + 8, RFLAGS = R11 & ~SFMASK.
//!    RCX (return RIP) and R11 (user RFLAGS) already hold what `syscall` puts there: the
//!    hypervisor's own hardware `syscall` wrote them.
//!
//! The guest reads LSTAR back as the alias; Linux never reads it. Nothing of this runs unless
//! [`super::host_emulates_kernel_mode`]: on a host with VMX/SVM LSTAR is left alone.
//!
//! Cost: one exit to tern per guest system call, plus four vCPU ioctls. Only 64-bit `syscall`
//! through LSTAR is handled; 32-bit entry (CSTAR, sysenter) is not.

use std::sync::atomic::{AtomicU64, Ordering};

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
const RFLAGS_FIXED: u64 = 1 << 1;
/// What `syscall`/`sysret` keep of RFLAGS (RF and VM are cleared).
const RFLAGS_SYSRET_MASK: u64 = 0x3c_7fd7;
const DB_VECTOR: u32 = 1;
const USER_HALF_MASK: u64 = (1 << 47) - 1;
const KERNEL_HALF: u64 = !USER_HALF_MASK;

/// Completed system calls, all vCPUs.
pub static COMPLETED: AtomicU64 = AtomicU64::new(0);

/// The user-half alias of a kernel entry point.
pub fn alias_of(entry: u64) -> u64 {
    entry & USER_HALF_MASK
}

/// The kernel entry point an alias stands for.
pub fn entry_of(alias: u64) -> u64 {
    alias | KERNEL_HALF
}

/// What a debug exit turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DebugOutcome {
    /// A system call was completed; the vCPU can run again.
    Completed,
    /// Not our breakpoint: the caller decides (tern sets no other debug state).
    NotOurs,
}

/// Per-vCPU state: the alias the breakpoint is on (0: none).
pub struct SyscallAssist {
    enabled: bool,
    armed: u64,
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

fn write_lstar(fd: &VcpuFd, value: u64) -> Result<(), kvm_ioctls::Error> {
    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_LSTAR,
        data: value,
        ..Default::default()
    }])
    .map_err(|_| kvm_ioctls::Error::new(libc::E2BIG))?;
    match fd.set_msrs(&msrs)? {
        1 => Ok(()),
        _ => Err(kvm_ioctls::Error::new(libc::EINVAL)),
    }
}

fn set_breakpoint(fd: &VcpuFd, addr: u64) -> Result<(), kvm_ioctls::Error> {
    let mut dbg = kvm_guest_debug {
        control: KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP,
        ..Default::default()
    };
    dbg.arch.debugreg[0] = addr;
    dbg.arch.debugreg[7] = DR7_EXEC_BP0;
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
        }
    }

    /// Before each KVM_RUN until armed: once the guest has written LSTAR, moves it to its alias
    /// and puts the breakpoint there.
    pub fn before_run(&mut self, fd: &VcpuFd) {
        if !self.enabled || self.armed != 0 {
            return;
        }
        if let Err(e) = self.arm(fd) {
            log::warn!("syscall assist: {e}; disabled");
            self.enabled = false;
        }
    }

    fn arm(&mut self, fd: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
        let [_, lstar, _] = read_msrs(fd)?;
        if let Ok(v) = std::env::var("TERN_TEST_BP") {
            if lstar != 0 {
                let a = u64::from_str_radix(v.trim_start_matches("0x"), 16).unwrap_or(0);
                set_breakpoint(fd, a)?;
                self.armed = a;
                log::info!("TEST: bp at {a:#x}");
            }
            return Ok(());
        }
        if lstar == 0 {
            return Ok(());
        }
        let alias = alias_of(lstar);
        if lstar != alias {
            write_lstar(fd, alias)?;
        }
        set_breakpoint(fd, alias)?;
        log::debug!(
            "syscall assist: LSTAR {:#x} -> alias {alias:#x}",
            entry_of(alias)
        );
        self.armed = alias;
        Ok(())
    }

    /// Handles a KVM_EXIT_DEBUG.
    pub fn handle_debug(
        &mut self,
        fd: &VcpuFd,
        exit: &kvm_debug_exit_arch,
    ) -> Result<DebugOutcome, kvm_ioctls::Error> {
        log::info!("TEST: debug exit {exit:?}");
        if self.armed == 0 || exit.exception != DB_VECTOR {
            return Ok(DebugOutcome::NotOurs);
        }
        let [star, lstar, sfmask] = read_msrs(fd)?;
        let mut regs = fd.get_regs()?;
        if regs.rip != lstar || lstar & KERNEL_HALF != 0 {
            return Ok(DebugOutcome::NotOurs);
        }
        let mut sregs = fd.get_sregs()?;
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
        regs.rip = entry_of(lstar);
        regs.rflags = (regs.r11 & RFLAGS_SYSRET_MASK & !sfmask) | RFLAGS_FIXED;
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

//! SYSCALL completion for this machine's hypervisor (docs/machine-kvm.md).
//!
//! A 64-bit `syscall` executed by guest user code (CPL3) is not completed by the hypervisor here:
//! the vCPU arrives at the guest's MSR_LSTAR target with RIP switched but CS/SS still those of
//! user mode, so the instruction fetch from the (supervisor) kernel entry faults: #PF with
//! CR2 = RIP = LSTAR, error code 0x15 (present, user, fetch), and the guest kills the process.
//!
//! What was measured to work, and what not:
//! - A hardware breakpoint on LSTAR (or on anything else the guest runs at CPL3): never fires.
//!   The hypervisor does not load guest-debug breakpoints into the debug registers for code
//!   that runs natively, and the faulting fetch is not emulated.
//! - A guest-debug breakpoint on code the *emulator* runs: fires. KVM's instruction emulator
//!   checks guest-debug code breakpoints before each instruction, and guest kernel code runs in
//!   it here. The #PF above is delivered to the guest's IDT and its handler runs at CPL0.
//!
//! So tern puts an execute breakpoint (DR0, KVM_SET_GUEST_DEBUG) on the guest's #PF handler, read
//! from IDT entry 14 once the guest has written LSTAR (by then Linux has its final IDT; all CPUs
//! share it, so application processors use the address the first vCPU found). At each hit:
//! - If CR2 == LSTAR and the exception frame says the fault was a user fetch at RIP == LSTAR from
//!   CPL3, it is a failed `syscall`: tern drops the frame and does what the instruction should
//!   have done: RIP = LSTAR, RSP = the user RSP from the frame, CS = STAR[47:32] (64-bit code,
//!   DPL 0), SS = STAR[47:32] + 8, RFLAGS = R11 & ~SFMASK. RCX (return RIP) and R11 (user
//!   RFLAGS) already hold what `syscall` puts there: the hypervisor's own hardware `syscall`
//!   wrote them and nothing touched them since.
//! - Otherwise it is an ordinary page fault and the handler must run on. The emulator does not
//!   honour RF for guest-debug breakpoints (measured: the hit repeats forever), so tern steps
//!   over the handler's first instruction itself when it is a nop/`endbr64`/`cld`/`clac` (Linux's
//!   entry stubs start so), else single-steps it (KVM_GUESTDBG_SINGLESTEP) and re-arms.
//!
//! Cost: one exit to tern per guest system call and per guest page fault. Nothing of this is
//! armed unless [`super::host_emulates_kernel_mode`] (on a host with VMX/SVM `syscall` works).
//! Only 64-bit `syscall` through LSTAR is handled; 32-bit entry (CSTAR, sysenter) is not.

use std::sync::atomic::{AtomicU64, Ordering};

use kvm_bindings::{
    kvm_debug_exit_arch, kvm_guest_debug, kvm_msr_entry, kvm_segment, Msrs, KVM_GUESTDBG_ENABLE,
    KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP,
};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::InsnKind;
use crate::memory::GuestMemory;

const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// DR7: L0 and G0 (breakpoint 0 on), R/W0 = 00 (instruction), LEN0 = 00; bit 10 reads as one.
const DR7_EXEC_BP0: u64 = 0x403;
const RFLAGS_FIXED: u64 = 1 << 1;
/// What `syscall` saves of RFLAGS into R11 (RF and VM read as zero there).
const RFLAGS_SAVED_MASK: u64 = 0x3c_7fd7;
const DB_VECTOR: u32 = 1;
const PF_VECTOR: u64 = 14;
/// #PF error code: the access was a user-mode instruction fetch.
const PF_USER_FETCH: u64 = (1 << 2) | (1 << 4);

/// The #PF handler the first vCPU found in the guest's IDT (0: none yet). One VM per process.
static KNOWN_HANDLER: AtomicU64 = AtomicU64::new(0);

/// Counters, all vCPUs.
pub static SYSCALLS: AtomicU64 = AtomicU64::new(0);
pub static PAGE_FAULTS: AtomicU64 = AtomicU64::new(0);

/// What a debug exit turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DebugOutcome {
    /// A failed system call was completed.
    Syscall,
    /// An ordinary page fault; the handler runs on.
    PageFault,
    /// Not our breakpoint: the caller decides (tern sets no other debug state).
    NotOurs,
}

/// Per-vCPU state.
pub struct SyscallAssist {
    enabled: bool,
    /// The #PF handler the breakpoint is on (0: not armed).
    armed: u64,
    /// Single-stepping over the handler's first instruction (breakpoint off meanwhile).
    stepping: bool,
}

fn read_msrs(fd: &VcpuFd) -> Result<[u64; 3], kvm_ioctls::Error> {
    let entries = [MSR_STAR, MSR_LSTAR, MSR_SYSCALL_MASK].map(|index| kvm_msr_entry {
        index,
        ..Default::default()
    });
    let mut msrs = Msrs::from_entries(&entries).map_err(|_| kvm_ioctls::Error::new(libc::E2BIG))?;
    if fd.get_msrs(&mut msrs)? != entries.len() {
        return Err(kvm_ioctls::Error::new(libc::EINVAL));
    }
    let s = msrs.as_slice();
    Ok([s[0].data, s[1].data, s[2].data])
}

/// Reads a guest-virtual u64 through the vCPU's page tables; None if unmapped.
fn read_gva_u64(fd: &VcpuFd, mem: &GuestMemory, gva: u64) -> Option<u64> {
    let gpa = |a: u64| {
        fd.translate_gva(a)
            .ok()
            .filter(|t| t.valid != 0)
            .map(|t| GuestAddress(t.physical_address))
    };
    let mut bytes = [0u8; 8];
    if gva & 0xfff <= 0xff8 {
        mem.read_slice(&mut bytes, gpa(gva)?).ok()?;
    } else {
        // It crosses a page: byte by byte.
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = mem.read_obj(gpa(gva.wrapping_add(i as u64))?).ok()?;
        }
    }
    Some(u64::from_le_bytes(bytes))
}

/// The handler address of IDT entry 14, if the guest has an IDT.
fn pf_handler(fd: &VcpuFd, mem: &GuestMemory) -> Option<u64> {
    let sregs = fd.get_sregs().ok()?;
    if u64::from(sregs.idt.limit) < PF_VECTOR * 16 + 15 {
        return None;
    }
    let gate = sregs.idt.base.wrapping_add(PF_VECTOR * 16);
    let lo = read_gva_u64(fd, mem, gate)?;
    let hi = read_gva_u64(fd, mem, gate + 8)?;
    let handler = (lo & 0xffff) | ((lo >> 32) & 0xffff_0000) | ((hi & 0xffff_ffff) << 32);
    Some(handler).filter(|h| *h != 0)
}

/// Some(addr): an execute breakpoint on addr; None: single-step one instruction instead.
fn set_debug(fd: &VcpuFd, breakpoint: Option<u64>) -> Result<(), kvm_ioctls::Error> {
    let mut dbg = kvm_guest_debug::default();
    match breakpoint {
        Some(addr) => {
            dbg.control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP;
            dbg.arch.debugreg[0] = addr;
            dbg.arch.debugreg[7] = DR7_EXEC_BP0;
        }
        None => dbg.control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP,
    }
    fd.set_guest_debug(&dbg)
}

/// Up to 15 instruction bytes at a guest-virtual address, stopping at the page end.
fn insn_bytes(fd: &VcpuFd, mem: &GuestMemory, rip: u64) -> Vec<u8> {
    let Some(t) = fd.translate_gva(rip).ok().filter(|t| t.valid != 0) else {
        return Vec::new();
    };
    let n = (0x1000 - (rip & 0xfff) as usize).min(15);
    let mut buf = vec![0u8; n];
    match mem.read_slice(&mut buf, GuestAddress(t.physical_address)) {
        Ok(()) => buf,
        Err(_) => Vec::new(),
    }
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
            stepping: false,
        }
    }

    /// Before each KVM_RUN until armed.
    pub fn before_run(&mut self, fd: &VcpuFd, mem: &GuestMemory) {
        if !self.enabled || self.armed != 0 {
            return;
        }
        let handler = match read_msrs(fd) {
            Ok([_, lstar, _]) if lstar != 0 => pf_handler(fd, mem),
            Ok(_) => None,
            Err(e) => {
                log::warn!("syscall assist: reading LSTAR: {e}; disabled");
                self.enabled = false;
                return;
            }
        };
        let handler = match handler {
            Some(h) => {
                KNOWN_HANDLER.store(h, Ordering::Relaxed);
                h
            }
            None => match KNOWN_HANDLER.load(Ordering::Relaxed) {
                0 => return,
                h => h,
            },
        };
        match set_debug(fd, Some(handler)) {
            Ok(()) => {
                log::debug!("syscall assist: breakpoint on the #PF handler {handler:#x}");
                self.armed = handler;
            }
            Err(e) => {
                log::warn!("syscall assist: KVM_SET_GUEST_DEBUG: {e}; disabled");
                self.enabled = false;
            }
        }
    }

    /// Handles a KVM_EXIT_DEBUG.
    pub fn handle_debug(
        &mut self,
        fd: &VcpuFd,
        mem: &GuestMemory,
        exit: &kvm_debug_exit_arch,
    ) -> Result<DebugOutcome, kvm_ioctls::Error> {
        if self.stepping && exit.exception == DB_VECTOR {
            // The single step over the handler's first instruction is done: re-arm.
            self.stepping = false;
            set_debug(fd, Some(self.armed))?;
            return Ok(DebugOutcome::PageFault);
        }
        let mut regs = fd.get_regs()?;
        if self.armed == 0 || exit.exception != DB_VECTOR || regs.rip != self.armed {
            return Ok(DebugOutcome::NotOurs);
        }
        let mut sregs = fd.get_sregs()?;
        let [star, lstar, sfmask] = read_msrs(fd)?;
        if sregs.cr2 == lstar && sregs.cs.selector & 3 == 0 {
            let frame: Option<Vec<u64>> = (0..6)
                .map(|i| read_gva_u64(fd, mem, regs.rsp.wrapping_add(i * 8)))
                .collect();
            if let Some(&[error, rip, cs, _rflags, rsp, _ss]) = frame.as_deref() {
                if rip == lstar && cs & 3 == 3 && error & PF_USER_FETCH == PF_USER_FETCH {
                    if SYSCALLS.load(Ordering::Relaxed) < 2 {
                        log::debug!(
                            "syscall assist: nr={} rcx={:#x} r11={:#x} user rsp={rsp:#x}",
                            regs.rax,
                            regs.rcx,
                            regs.r11
                        );
                    }
                    let kcs = ((star >> 32) & 0xfffc) as u16;
                    sregs.cs = ring0_segment(kcs, true);
                    sregs.ss = ring0_segment(kcs.wrapping_add(8), false);
                    fd.set_sregs(&sregs)?;
                    regs.rip = lstar;
                    regs.rsp = rsp;
                    regs.rflags = (regs.r11 & RFLAGS_SAVED_MASK & !sfmask) | RFLAGS_FIXED;
                    fd.set_regs(&regs)?;
                    SYSCALLS.fetch_add(1, Ordering::Relaxed);
                    return Ok(DebugOutcome::Syscall);
                }
            }
        }
        // An ordinary page fault. The emulator does not honour RF for guest-debug breakpoints
        // (measured: the same breakpoint fires again forever), so tern steps over the handler's
        // first instruction itself when it is one it can complete, else single-steps it.
        match super::decode(&insn_bytes(fd, mem, regs.rip)) {
            Some(insn) if matches!(insn.kind, InsnKind::Nop | InsnKind::Cld | InsnKind::Clac) => {
                regs.rip = regs.rip.wrapping_add(insn.len as u64);
                regs.rflags &= !insn.kind.rflags_cleared();
                fd.set_regs(&regs)?;
            }
            _ => {
                set_debug(fd, None)?;
                self.stepping = true;
            }
        }
        PAGE_FAULTS.fetch_add(1, Ordering::Relaxed);
        Ok(DebugOutcome::PageFault)
    }
}

impl Default for SyscallAssist {
    fn default() -> Self {
        Self::new()
    }
}

//! CPL3 side of the guest kernel: `int 0x80` system calls (never `syscall`, which this machine's
//! hypervisor does not complete), the interrupt flag, and leaving the VM.
//!
//! CPUs enter CPL3 through `tern_enter_user` (entry.rs) with RFLAGS = `tern_user_rflags`:
//! IOPL = 3 and IF as `set_initial_interrupts` chose. Measured on this machine: the hypervisor
//! does not give user mode the IOPL (port I/O at CPL3 works through the TSS I/O bitmap instead,
//! cli/sti would fault), and `int N` at CPL3 raises #UD (idt.rs turns it into the system call).

use super::platform::*;

extern "C" {
    #[allow(dead_code, reason = "written by set_initial_interrupts")]
    static mut tern_user_rflags: u64;
}

/// Issues `int 0x80` with number `nr` and arguments `a0`, `a1`.
///
/// # Safety
/// The call must be valid for the current state (e.g. writing CR3 or an MSR can break the VM).
pub unsafe fn syscall(nr: u64, a0: u64, a1: u64) -> u64 {
    let ret;
    // SAFETY: the CPL0 handler saves and restores every other register; the privilege change
    // switches stacks, so the user stack (and its red zone) is untouched.
    unsafe {
        core::arch::asm!("int 0x80", inlateout("rax") nr => ret, in("rdi") a0, in("rsi") a1, options(nostack))
    };
    ret
}

/// Halts this CPU until an interrupt arrives, unless `*flag != 0` (checked with IF = 0 first,
/// so a wake-up IPI sent after the caller's check is not lost).
pub fn wait(flag: *const u64) {
    // SAFETY: the handler only reads *flag (a live atomic owned by the caller) and halts.
    unsafe { syscall(sys::WAIT, flag as u64, 0) };
}

/// CPUID as KVM answers it at CPL0, i.e. with tern's table (see `sys::CPUID`).
pub fn cpuid(leaf: u32, subleaf: u32) -> core::arch::x86_64::CpuidResult {
    let (eax, ebx, ecx, edx): (u64, u64, u64, u64);
    // SAFETY: the handler writes the four results into the saved RAX..RDX; RBX is reserved by
    // the compiler, so it is swapped through a scratch register around the call.
    unsafe {
        core::arch::asm!(
            "xchg {tmp}, rbx", "int 0x80", "xchg {tmp}, rbx",
            tmp = out(reg) ebx,
            inlateout("rax") sys::CPUID => eax, in("rdi") leaf as u64, in("rsi") subleaf as u64,
            lateout("rcx") ecx, lateout("rdx") edx, options(nostack),
        )
    };
    core::arch::x86_64::CpuidResult {
        eax: eax as u32,
        ebx: ebx as u32,
        ecx: ecx as u32,
        edx: edx as u32,
    }
}

pub fn read_cr(n: u64) -> u64 {
    // SAFETY: reading a control register has no side effects.
    unsafe { syscall(sys::READ_CR, n, 0) }
}

pub fn write_cr3(pml4: u64) {
    // SAFETY: callers pass the guest's own (valid, identity) PML4.
    unsafe { syscall(sys::WRITE_CR3, pml4, 0) };
}

#[allow(
    dead_code,
    reason = "runtime API for the suites to come (apf, ksm, dirty)"
)]
/// Reads an MSR (a #GP at CPL0 for a bad MSR is reported as an exception).
pub fn rdmsr(msr: u32) -> u64 {
    // SAFETY: reading an MSR has no side effects.
    unsafe { syscall(sys::RDMSR, msr as u64, 0) }
}

#[allow(
    dead_code,
    reason = "runtime API for the suites to come (apf, ksm, dirty)"
)]
/// # Safety
/// Writing an MSR can change anything about the CPU; the caller answers for the value.
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: forwarded to the caller.
    unsafe { syscall(sys::WRMSR, msr as u64, value) };
}

#[allow(
    dead_code,
    reason = "runtime API for the suites to come (apf, ksm, dirty)"
)]
/// Chooses IF for CPUs that enter CPL3 from now on (APs started later). Default: off.
pub fn set_initial_interrupts(on: bool) {
    let flags = 0x3002 | if on { 0x200 } else { 0 };
    // SAFETY: a plain store to a u64 read by CPL0 entry code of CPUs that have not started yet.
    unsafe { core::ptr::write_volatile(core::ptr::addr_of_mut!(tern_user_rflags), flags) };
}

#[allow(
    dead_code,
    reason = "runtime API for the suites to come (apf, ksm, dirty)"
)]
/// Sets this CPU's IF at CPL3 (through the kernel: this machine gives user mode no IOPL).
pub fn set_interrupts(on: bool) {
    // SAFETY: only the caller's RFLAGS.IF changes; the IDT handles every vector.
    unsafe { syscall(sys::SET_IF, on as u64, 0) };
}

/// Writes an MSR; false when the write raised #GP (caught, not fatal).
pub fn wrmsr_safe(msr: u32, value: u64) -> bool {
    // SAFETY: the CPL0 side catches #GP on this one instruction; callers only probe MSRs whose
    // successful writes they are prepared for.
    unsafe { syscall(sys::WRMSR_SAFE, msr as u64, value) == 0 }
}

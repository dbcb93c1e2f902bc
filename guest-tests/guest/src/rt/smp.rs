//! Application processors: INIT/SIPI bring-up, the real-mode trampoline at 0x8000, and a
//! per-CPU mailbox through which the BSP hands work to APs parked at CPL3.
//!
//! An AP's path: SIPI -> `tern_ap_trampoline` (16-bit, 0x8000) -> protected mode -> long mode
//! with the guest's PML4 -> `tern_ap_entry64` takes a CPU index (atomic counter, BSP is 0),
//! loads GDT/IDT/its own TSS, enters CPL3 at `ap_main(index)` on its own stack. `ap_main`
//! checks in and then waits on its mailbox, halting (via `int 0x80`) while it is empty; `run_on`
//! fills the mailbox and sends a wake IPI.

use core::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use super::bootinfo::MpCpus;
use super::platform::*;
use super::{cpu, user, Fail};

core::arch::global_asm!(
    r#"
    .section .trampoline, "awx"
    .code16
    .global tern_ap_trampoline
tern_ap_trampoline:
    cli
    xorw %ax, %ax
    movw %ax, %ds
    lgdtl tern_tramp_gdtr
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x08, $tern_tramp32

    .code32
tern_tramp32:
    movw $0x18, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl %cr4, %eax
    orl $0x620, %eax
    movl %eax, %cr4
    movl $tern_pml4, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    # PG | WP | NE | ET | MP | PE: caches on (CD/NW clear), x87/SSE usable (EM clear)
    movl $0x80010033, %eax
    movl %eax, %cr0
    ljmpl $0x10, $tern_tramp64

    .code64
tern_tramp64:
    movabsq $tern_ap_entry64, %rax
    jmpq *%rax

    .balign 8
tern_tramp_gdt:
    .quad 0
    .quad 0x00cf9a000000ffff
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
tern_tramp_gdtr:
    .word 31
    .long tern_tramp_gdt

    .section .data.tern_smp, "aw"
    .balign 8
tern_ap_next:
    .long 0

    .section .text.tern_smp, "ax"
    .code64
tern_ap_entry64:
    movl ${kds}, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl $1, %edi
    lock xaddl %edi, tern_ap_next(%rip)
    incl %edi
    cmpl ${max_cpus}, %edi
    jae 9f
    # CPL0 stack until CPL3: this CPU's IST1 (no int 0x80 can arrive before then)
    movq %rdi, %rax
    shlq ${ist_shift}, %rax
    leaq tern_ist_stacks + {ist}(%rip), %rsp
    addq %rax, %rsp
    call tern_cpu_setup
    movq %rdi, %rax
    shlq ${user_shift}, %rax
    leaq tern_user_stacks + {user_stack}(%rip), %rcx
    addq %rcx, %rax
    leaq {ap_main}(%rip), %rcx
    jmp tern_enter_user
9:
    cli
    hlt
    jmp 9b
"#,
    kds = const KERNEL_DS,
    max_cpus = const MAX_CPUS,
    ist_shift = const IST_AREA_SHIFT,
    ist = const IST_STACK_SIZE,
    user_shift = const USER_STACK_SHIFT,
    user_stack = const USER_STACK_SIZE,
    ap_main = sym ap_main,
    options(att_syntax)
);

/// Work for one CPU: `func(cpu_index, arg)`; `func == 0` means empty.
#[repr(C, align(64))]
struct Mailbox {
    func: AtomicU64,
    arg: AtomicU64,
    apic_id: AtomicU32,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Mailbox = Mailbox {
    func: AtomicU64::new(0),
    arg: AtomicU64::new(0),
    apic_id: AtomicU32::new(0),
};
static MAILBOXES: [Mailbox; MAX_CPUS] = [EMPTY; MAX_CPUS];
/// CPUs that reached CPL3 (the BSP counts itself).
static ONLINE: AtomicUsize = AtomicUsize::new(1);

/// How long the BSP waits for APs to check in or to finish handed-over work.
const AP_TIMEOUT_MS: u64 = 5000;
/// TSC cycles per ms used for the timeouts (set by start_aps).
static TSC_KHZ: AtomicU64 = AtomicU64::new(0);

/// Spins until `done()` or AP_TIMEOUT_MS pass; false on timeout.
fn spin_until(done: impl Fn() -> bool) -> bool {
    let khz = TSC_KHZ.load(Ordering::Relaxed);
    let start = cpu::rdtsc();
    while !done() {
        if cpu::rdtsc() - start > AP_TIMEOUT_MS * khz {
            return false;
        }
        cpu::pause();
    }
    true
}

extern "C" fn ap_main(cpu: usize) -> ! {
    cpu::lapic_enable();
    let mb = &MAILBOXES[cpu];
    mb.apic_id.store(cpu::apic_id(), Ordering::Release);
    ONLINE.fetch_add(1, Ordering::AcqRel);
    loop {
        let f = mb.func.load(Ordering::Acquire);
        if f == 0 {
            user::wait(mb.func.as_ptr());
            continue;
        }
        // SAFETY: only run_on stores non-zero values here, and they are `fn(usize, u64)`s.
        let func: fn(usize, u64) =
            unsafe { core::mem::transmute::<usize, fn(usize, u64)>(f as usize) };
        func(cpu, mb.arg.load(Ordering::Relaxed));
        mb.func.store(0, Ordering::Release);
    }
}

/// CPUs online (BSP included).
pub fn online() -> usize {
    ONLINE.load(Ordering::Acquire)
}

/// Starts every AP the MP table lists and waits (bounded) until all have checked in.
/// Returns the number of CPUs online.
pub fn start_aps(mp: &MpCpus, tsc_khz: u64) -> Result<usize, Fail> {
    let bsp = cpu::apic_id();
    if let Some(listed) = mp.bsp_apic_id {
        if listed as u32 != bsp {
            return Err(crate::fail!(
                "MP table says the BSP is APIC {listed}, but it is {bsp}"
            ));
        }
    }
    if mp.count > MAX_CPUS {
        return Err(crate::fail!(
            "MP table lists {} CPUs; the guest supports {MAX_CPUS}",
            mp.count
        ));
    }
    MAILBOXES[0].apic_id.store(bsp, Ordering::Release);
    cpu::lapic_enable();
    for &id in &mp.apic_ids[..mp.count] {
        if id as u32 == bsp {
            continue;
        }
        // INIT, then SIPI twice (a second SIPI is ignored by an AP that already started).
        cpu::send_ipi(id as u32, 0x4500);
        cpu::send_ipi(id as u32, 0x4600 | SIPI_VECTOR);
        cpu::send_ipi(id as u32, 0x4600 | SIPI_VECTOR);
    }
    // An unknown TSC rate: assume a fast one, which only makes the timeouts longer.
    TSC_KHZ.store(
        if tsc_khz == 0 { 5_000_000 } else { tsc_khz },
        Ordering::Relaxed,
    );
    if !spin_until(|| online() >= mp.count) {
        return Err(crate::fail!(
            "only {} of {} CPUs came online within {AP_TIMEOUT_MS} ms",
            online(),
            mp.count
        ));
    }
    Ok(online())
}

/// Hands `func(cpu, arg)` to AP `cpu` (waiting for its previous work first) and wakes it.
pub fn run_on(cpu: usize, func: fn(usize, u64), arg: u64) -> Result<(), Fail> {
    assert!(cpu > 0 && cpu < online(), "run_on: no AP {cpu}");
    wait_idle(cpu)?;
    let mb = &MAILBOXES[cpu];
    mb.arg.store(arg, Ordering::Relaxed);
    mb.func.store(func as usize as u64, Ordering::Release);
    cpu::send_ipi(mb.apic_id.load(Ordering::Acquire), 0x4000 | WAKE_VECTOR);
    Ok(())
}

/// Waits (bounded) until AP `cpu` has finished the work `run_on` gave it.
pub fn wait_idle(cpu: usize) -> Result<(), Fail> {
    if spin_until(|| MAILBOXES[cpu].func.load(Ordering::Acquire) == 0) {
        Ok(())
    } else {
        Err(crate::fail!(
            "CPU {cpu} did not finish its work within {AP_TIMEOUT_MS} ms"
        ))
    }
}

/// Top (16-byte aligned) of the CPL3 stack of the `n`-th CPU slot that no CPU uses (slots
/// `online()..MAX_CPUS`), for other contexts that need a stack inside the image (e.g. the apf
/// suite's tasks); None when there are not that many.
pub fn spare_user_stack(n: usize) -> Option<u64> {
    extern "C" {
        static tern_user_stacks: [u8; USER_STACK_SIZE * MAX_CPUS];
    }
    let slot = online() + n;
    if slot >= MAX_CPUS {
        return None;
    }
    // Only the address is taken; CPU slot `slot` (< MAX_CPUS) never started, so its stack is free.
    let base = core::ptr::addr_of!(tern_user_stacks) as u64;
    Some(base + ((slot + 1) * USER_STACK_SIZE) as u64)
}

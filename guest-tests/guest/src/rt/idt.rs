//! IDT, interrupt stubs, the `int 0x80` system calls and the exception path.
//!
//! All CPL0 code is assembly (KVM's emulator runs it here and lacks most SSE). Every gate uses an
//! IST stack (see `platform::IST_*`). `int 0x80` from CPL3 arrives either through its DPL 3 gate
//! or, on this machine, as #UD on the `cd 80` bytes (the hypervisor refuses software interrupts
//! from user mode); both reach `tern_syscall`. IRQs/IPIs are counted and EOId. Other exceptions
//! are fatal: the CPL0 stub records the frame in `tern_fault_info` and `iretq`s to
//! `tern_fault_report` at CPL3, which formats and prints it. Async page faults (`apf.rs`) hook in
//! `tern_isr_common`: every #PF goes to `tern_apf_pf` first (which goes on to `tern_fault` unless
//! it is a PAGE_NOT_PRESENT), the page-ready vector to `tern_apf_ready`; `sys::APF_RESUME` is
//! `tern_apf_resume`.

use core::sync::atomic::{AtomicU64, Ordering};

use super::platform::*;

core::arch::global_asm!(
    r#"
    .section .bss.tern_idt, "aw", @nobits
    .balign 4096
    .global tern_idt
tern_idt:
    .skip 256 * 16
    .global tern_irq_count
tern_irq_count:
    .skip 256 * 8
    .global tern_fault_info
tern_fault_info:
    .skip 23 * 8
tern_fault_claimed:
    .skip 8

    .section .data.tern_idtr, "aw"
    .balign 8
    .global tern_idtr
tern_idtr:
    .word 256 * 16 - 1
    .quad tern_idt

    .section .text.tern_isr, "ax"
    .code64
# 256 stubs, 16 bytes apart: push a zero error code where the CPU pushes none, push the vector.
    .balign 16
tern_isr_stubs:
    .set tern_vec, 0
    .rept 256
    .balign 16
    .if (tern_vec == 8) || (tern_vec == 10) || (tern_vec == 11) || (tern_vec == 12) || (tern_vec == 13) || (tern_vec == 14) || (tern_vec == 17) || (tern_vec == 21) || (tern_vec == 29) || (tern_vec == 30)
    .else
    pushq $0
    .endif
    pushq $tern_vec
    jmp tern_isr_common
    .set tern_vec, tern_vec + 1
    .endr

# tern_idt_fill: write the 256 gates (BSP, once, before tern_cpu_setup loads the IDT).
    .global tern_idt_fill
tern_idt_fill:
    leaq tern_idt(%rip), %rdi
    leaq tern_isr_stubs(%rip), %rsi
    xorl %ecx, %ecx
1:
    movq %rsi, %rax
    movw %ax, (%rdi)
    movw ${kcs}, 2(%rdi)
    movw $(0x8e00 | {ist_irq}), %dx
    cmpl $32, %ecx
    jae 2f
    movw $(0x8e00 | {ist_exc}), %dx
2:
    movw %dx, 4(%rdi)
    shrq $16, %rax
    movw %ax, 6(%rdi)
    shrq $16, %rax
    movl %eax, 8(%rdi)
    movl $0, 12(%rdi)
    addq $16, %rdi
    addq $16, %rsi
    incl %ecx
    cmpl $256, %ecx
    jb 1b
    # NMI, #DF, #MC get their own stack; int 0x80 is callable from CPL3 (DPL 3); #UD may be a
    # system call (below), so it uses the system call stack.
    leaq tern_idt(%rip), %rdi
    movw $(0x8e00 | {ist_crit}), 2 * 16 + 4(%rdi)
    movw $(0x8e00 | {ist_crit}), 8 * 16 + 4(%rdi)
    movw $(0x8e00 | {ist_crit}), 18 * 16 + 4(%rdi)
    movw $(0xee00 | {ist_sys}), {sysvec} * 16 + 4(%rdi)
    movw $(0x8e00 | {ist_sys}), 6 * 16 + 4(%rdi)
    ret

# Frame after the pushes below: r15 0, r14 8, r13 16, r12 24, r11 32, r10 40, r9 48, r8 56,
# rbp 64, rdi 72, rsi 80, rdx 88, rcx 96, rbx 104, rax 112, vector 120, error 128, rip 136,
# cs 144, rflags 152, rsp 160, ss 168.
tern_isr_common:
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq 120(%rsp), %rax
    cmpq ${sysvec}, %rax
    je tern_syscall
    # #UD at CPL3 on an `int 0x80` (cd 80): this machine's hypervisor raises #UD for software
    # interrupts from user mode; carry out the system call and skip the instruction.
    cmpq $6, %rax
    jne 1f
    testb $3, 144(%rsp)
    jz 1f
    movq 136(%rsp), %rcx
    cmpw $0x80cd, (%rcx)
    jne 1f
    addq $2, 136(%rsp)
    jmp tern_syscall
1:
    # #PF: an async page fault's PAGE_NOT_PRESENT (apf.rs), which falls back to tern_fault
    cmpq $14, %rax
    je tern_apf_pf
    # #GP on the guarded wrmsr of sys::WRMSR_SAFE: resume at its fault label (returns 1).
    cmpq $13, %rax
    jne 2f
    leaq tern_wrmsr_safe_insn(%rip), %rcx
    cmpq %rcx, 136(%rsp)
    jne 2f
    leaq tern_wrmsr_safe_fault(%rip), %rcx
    movq %rcx, 136(%rsp)
    jmp tern_isr_return
2:
    cmpq $32, %rax
    jb tern_fault
    # IRQ or IPI: count it for CPL3 code to see, then EOI (not for the spurious vector).
    leaq tern_irq_count(%rip), %rcx
    lock incq (%rcx,%rax,8)
    # async page-ready (apf.rs): EOIs itself
    cmpq ${apf_vector}, %rax
    je tern_apf_ready
    cmpq ${spurious}, %rax
    je tern_isr_return
    movl ${lapic_eoi}, %ecx
    movl $0, (%rcx)
    .global tern_isr_return
tern_isr_return:
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
    addq $16, %rsp
    iretq

# int 0x80: number in the caller's rax (saved at 112), arguments still in rdi, rsi.
tern_syscall:
    movq 112(%rsp), %rax
    cmpq ${sys_wait}, %rax
    je 10f
    cmpq ${sys_read_cr}, %rax
    je 20f
    cmpq ${sys_write_cr3}, %rax
    je 30f
    cmpq ${sys_rdmsr}, %rax
    je 40f
    cmpq ${sys_wrmsr}, %rax
    je 50f
    cmpq ${sys_invlpg}, %rax
    je 60f
    cmpq ${sys_set_if}, %rax
    je 70f
    cmpq ${sys_cpuid}, %rax
    je 80f
    cmpq ${sys_apf_resume}, %rax
    je tern_apf_resume
    cmpq ${sys_wrmsr_safe}, %rax
    je 55f
    movq $-1, %rax
    jmp 90f
10: # wait: sleep unless *rdi != 0; an IRQ (own IST) wakes the hlt; IF is off again on return
    testq %rdi, %rdi
    jz 11f
    cmpq $0, (%rdi)
    jne 12f
11:
    sti
    hlt
    cli
12:
    xorl %eax, %eax
    jmp 90f
20:
    movq %cr0, %rax
    cmpq $0, %rdi
    je 90f
    movq %cr2, %rax
    cmpq $2, %rdi
    je 90f
    movq %cr3, %rax
    cmpq $3, %rdi
    je 90f
    movq %cr4, %rax
    cmpq $4, %rdi
    je 90f
    movq $-1, %rax
    jmp 90f
30:
    movq %rdi, %cr3
    xorl %eax, %eax
    jmp 90f
40:
    movl %edi, %ecx
    rdmsr
    shlq $32, %rdx
    movl %eax, %eax
    orq %rdx, %rax
    jmp 90f
50:
    movl %edi, %ecx
    movl %esi, %eax
    movq %rsi, %rdx
    shrq $32, %rdx
    wrmsr
    xorl %eax, %eax
    jmp 90f
55: # wrmsr that survives #GP: rax = 0 when written, 1 when the CPU refused it
    movl %edi, %ecx
    movl %esi, %eax
    movq %rsi, %rdx
    shrq $32, %rdx
tern_wrmsr_safe_insn:
    wrmsr
    xorl %eax, %eax
    jmp 90f
tern_wrmsr_safe_fault:
    movl $1, %eax
    jmp 90f
60:
    invlpg (%rdi)
    xorl %eax, %eax
    jmp 90f
70:
    andq $~0x200, 152(%rsp)
    testq %rdi, %rdi
    jz 71f
    orq $0x200, 152(%rsp)
71:
    xorl %eax, %eax
    jmp 90f
80:
    movl %edi, %eax
    movl %esi, %ecx
    cpuid
    movq %rbx, 104(%rsp)
    movq %rcx, 96(%rsp)
    movq %rdx, 88(%rsp)
90:
    movq %rax, 112(%rsp)
    jmp tern_isr_return

# Exception: record the frame and CR2, then report from CPL3 on the reporter's stack.
    .global tern_fault
tern_fault:
    lock btsq $0, tern_fault_claimed(%rip)
    jc 5f
    movq %rsp, %rsi
    leaq tern_fault_info(%rip), %rdi
    movl $22, %ecx
1:
    movq (%rsi), %rax
    movq %rax, (%rdi)
    addq $8, %rsi
    addq $8, %rdi
    decl %ecx
    jnz 1b
    movq %cr2, %rax
    movq %rax, (%rdi)
    # the reporter's argument: this CPU's index, from which IST area we are on
    movq %rsp, %rdi
    leaq tern_ist_stacks(%rip), %rax
    subq %rax, %rdi
    shrq ${ist_shift}, %rdi
    pushq ${uds}
    leaq tern_fault_stack_top(%rip), %rax
    subq $8, %rax
    pushq %rax
    pushq $0x3002
    pushq ${ucs}
    leaq {report}(%rip), %rax
    pushq %rax
    iretq
5: # an exception while one is being reported: fixed message with both frames' vector, error,
   # rip and cr2 (hex, printed by asm: no Rust at CPL0), exit 3
    leaq tern_nested_msg(%rip), %rsi
    movl $tern_nested_msg_end - tern_nested_msg, %ecx
    movl ${com1}, %edx
6:
    movb (%rsi), %al
    outb %al, %dx
    incq %rsi
    decl %ecx
    jnz 6b
    movq 120(%rsp), %rax
    call tern_put_hex
    movq 128(%rsp), %rax
    call tern_put_hex
    movq 136(%rsp), %rax
    call tern_put_hex
    movq %cr2, %rax
    call tern_put_hex
    leaq tern_fault_info(%rip), %rdi
    movq 120(%rdi), %rax
    call tern_put_hex
    movq 128(%rdi), %rax
    call tern_put_hex
    movq 136(%rdi), %rax
    call tern_put_hex
    movq 176(%rdi), %rax
    call tern_put_hex
    movb $10, %al
    outb %al, %dx
    movl ${test_exit}, %edx
    movl ${exit_exc}, %eax
    outl %eax, %dx
7:
    cli
    hlt
    jmp 7b

# tern_put_hex: print rax as 0x + 16 hex digits and a space on COM1. Clobbers rax, rcx, rdx, rsi.
tern_put_hex:
    movq %rax, %rsi
    movl ${com1}, %edx
    movb $48, %al
    outb %al, %dx
    movb $120, %al
    outb %al, %dx
    movl $16, %ecx
1:
    rolq $4, %rsi
    movl %esi, %eax
    andl $15, %eax
    cmpl $10, %eax
    jb 2f
    addl $39, %eax
2:
    addl $48, %eax
    outb %al, %dx
    decl %ecx
    jnz 1b
    movb $32, %al
    outb %al, %dx
    ret

    .section .rodata.tern_nested_msg, "a"
tern_nested_msg:
    .ascii "\ntern-guest: exception while reporting an exception (vector error rip cr2, then the first one's): "
tern_nested_msg_end:
"#,
    kcs = const KERNEL_CS,
    uds = const USER_DS,
    ucs = const USER_CS,
    ist_sys = const IST_SYSCALL,
    ist_exc = const IST_EXCEPTION,
    ist_crit = const IST_CRITICAL,
    ist_irq = const IST_IRQ,
    sysvec = const SYSCALL_VECTOR,
    spurious = const SPURIOUS_VECTOR,
    lapic_eoi = const LAPIC_BASE + LAPIC_EOI,
    sys_wait = const sys::WAIT,
    sys_read_cr = const sys::READ_CR,
    sys_write_cr3 = const sys::WRITE_CR3,
    sys_rdmsr = const sys::RDMSR,
    sys_wrmsr = const sys::WRMSR,
    sys_wrmsr_safe = const sys::WRMSR_SAFE,
    sys_invlpg = const sys::INVLPG,
    sys_set_if = const sys::SET_IF,
    sys_cpuid = const sys::CPUID,
    sys_apf_resume = const sys::APF_RESUME,
    apf_vector = const APF_VECTOR,
    com1 = const COM1,
    test_exit = const TEST_EXIT,
    exit_exc = const EXIT_EXCEPTION,
    ist_shift = const IST_AREA_SHIFT,
    report = sym tern_fault_report,
    options(att_syntax)
);

/// What `tern_fault` saved: the stub frame (GPRs r15..rax, vector, error, rip, cs, rflags, rsp,
/// ss) and CR2.
#[repr(C)]
struct FaultInfo {
    gprs: [u64; 15],
    vector: u64,
    error: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
    cr2: u64,
}

extern "C" {
    static tern_fault_info: FaultInfo;
    #[allow(dead_code, reason = "read by irq_count")]
    static tern_irq_count: [AtomicU64; 256];
}

#[allow(
    dead_code,
    reason = "runtime API for the suites to come (apf, ksm, dirty)"
)]
/// How many times `vector` (>= 32) was delivered, on any CPU.
pub fn irq_count(vector: u8) -> u64 {
    // SAFETY: tern_irq_count is a 256-entry u64 array in .bss, only updated with `lock inc`.
    unsafe { tern_irq_count[vector as usize].load(Ordering::Relaxed) }
}

/// Runs at CPL3 on the reporter's stack after an unexpected exception; never returns.
extern "C" fn tern_fault_report(cpu: usize) -> ! {
    // SAFETY: written once by tern_fault (claimed with a lock bts) before it entered this code.
    let f = unsafe { &*core::ptr::addr_of!(tern_fault_info) };
    crate::report!(
        "exception vector={} error={:#x} rip={:#x} cr2={:#x} cpl={} rsp={:#x} rflags={:#x} cpu={}",
        f.vector,
        f.error,
        f.rip,
        f.cr2,
        f.cs & 3,
        f.rsp,
        f.rflags,
        cpu
    );
    let g = &f.gprs;
    crate::report!(
        "  rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} rbp={:#x}",
        g[14],
        g[13],
        g[12],
        g[11],
        g[10],
        g[9],
        g[8]
    );
    crate::report!("{} FAIL exception {}", super::suite_name(), f.vector);
    super::exit(EXIT_EXCEPTION)
}

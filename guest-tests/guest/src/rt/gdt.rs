//! GDT, per-CPU TSS (with IST stacks) and per-CPU stacks; `tern_cpu_setup` loads them on a CPU.
//!
//! Everything that runs at CPL0 is assembly: this machine runs guest CPL0 code through KVM's
//! instruction emulator, which lacks most SSE instructions that compiled Rust may contain.

use super::platform::*;

// GDT: null, (unused), kernel code 0x10, kernel data 0x18, user data 0x20, user code 0x28, then
// one 16-byte TSS descriptor per CPU from 0x30 (filled by the CPU itself in `tern_cpu_setup`).
// TSS of CPU i: 128 bytes at tern_tss + 128 * i (104 used; no I/O bitmap: user code runs with
// IOPL = 3).
core::arch::global_asm!(
    r#"
    .section .data.tern_gdt, "aw"
    .balign 16
    .global tern_gdt
tern_gdt:
    .quad 0
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
    .quad 0x00cff2000000ffff
    .quad 0x00affa000000ffff
tern_gdt_tss:
    .skip 16 * {max_cpus}
tern_gdt_end:
    .balign 8
    .global tern_gdtr
tern_gdtr:
    .word tern_gdt_end - tern_gdt - 1
    .quad tern_gdt

    .section .bss.tern_cpu, "aw", @nobits
    .balign 4096
    .global tern_user_stacks
tern_user_stacks:
    .skip {user_stack} * {max_cpus}
    .global tern_ist_stacks
tern_ist_stacks:
    .skip (1 << {ist_shift}) * {max_cpus}
    .global tern_fault_stack
tern_fault_stack:
    .skip {fault_stack}
    .global tern_fault_stack_top
tern_fault_stack_top:

# TSSes, then one I/O permission bitmap (all ports allowed, 0xff terminator) that every TSS
# reaches through its own I/O map base: CPL3 port I/O goes by the bitmap on this machine (see
# platform::USER_RFLAGS). In .data because of the terminator; the CPU never writes a TSS in
# long mode, so overlapping TSS segments are fine.
    .section .data.tern_tss, "aw"
    .balign 128
    .global tern_tss
tern_tss:
    .skip 128 * {max_cpus}
tern_iopb:
    .skip 8192
    .byte 0xff
tern_iopb_end:

    .section .text.tern_cpu, "ax"
    .code64
# tern_cpu_setup(rdi = cpu index): load GDT, segments, IDT and this CPU's TSS. CPL0, needs a
# stack. Clobbers rax, rcx, rdx, r8.
    .global tern_cpu_setup
tern_cpu_setup:
    lgdt tern_gdtr(%rip)
    pushq ${kcs}
    leaq 1f(%rip), %rax
    pushq %rax
    lretq
1:
    movl ${kds}, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
    lidt tern_idtr(%rip)

    # r8 = &tss[i]; rax = base of CPU i's IST area
    movq %rdi, %r8
    shlq $7, %r8
    leaq tern_tss(%rip), %rax
    addq %rax, %r8
    movq %rdi, %rax
    shlq ${ist_shift}, %rax
    leaq tern_ist_stacks(%rip), %rcx
    addq %rcx, %rax
    leaq {ist}(%rax), %rcx
    movq %rcx, 0x04(%r8)
    movq %rcx, 0x24(%r8)
    leaq 2 * {ist}(%rax), %rcx
    movq %rcx, 0x2c(%r8)
    leaq 3 * {ist}(%rax), %rcx
    movq %rcx, 0x34(%r8)
    leaq 4 * {ist}(%rax), %rcx
    movq %rcx, 0x3c(%r8)
    leaq tern_iopb(%rip), %rcx
    subq %r8, %rcx
    movw %cx, 0x66(%r8)

    # 64-bit available TSS descriptor (type 0x89, limit: to the bitmap's end) at tern_gdt_tss + 16 * i
    movq %rdi, %rdx
    shlq $4, %rdx
    leaq tern_gdt_tss(%rip), %rax
    addq %rax, %rdx
    leaq tern_iopb_end - 1(%rip), %rcx
    subq %r8, %rcx
    movw %cx, (%rdx)
    movq %r8, %rax
    movw %ax, 2(%rdx)
    shrq $16, %rax
    movb %al, 4(%rdx)
    movb $0x89, 5(%rdx)
    movb $0, 6(%rdx)
    movb %ah, 7(%rdx)
    shrq $16, %rax
    movl %eax, 8(%rdx)
    movl $0, 12(%rdx)

    movq %rdi, %rax
    shlq $4, %rax
    addq ${tss0}, %rax
    ltr %ax
    ret
"#,
    max_cpus = const MAX_CPUS,
    user_stack = const USER_STACK_SIZE,
    ist_shift = const IST_AREA_SHIFT,
    ist = const IST_STACK_SIZE,
    fault_stack = const FAULT_STACK_SIZE,
    kcs = const KERNEL_CS,
    kds = const KERNEL_DS,
    tss0 = const TSS_SEL0,
    options(att_syntax)
);

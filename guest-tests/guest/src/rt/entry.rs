//! The BSP's entry from tern (64-bit, CPL0, tern's GDT and page tables, RSI = boot_params) and
//! the common drop to CPL3. Kept to a few dozen instructions: CPL0 code runs emulated here.

use super::platform::*;

core::arch::global_asm!(
    r#"
    .section .data.tern_entry, "aw"
    .balign 8
# RFLAGS for CPUs entering CPL3: IOPL = 3 (not given to user mode on this machine: the TSS I/O
# bitmap grants the ports), bit 1; IF chosen by user::set_initial_interrupts (default off).
    .global tern_user_rflags
tern_user_rflags:
    .quad 0x3002

    .section .text.entry, "ax"
    .code64
    .global _start
_start:
    movq %rsi, %r12
    # SSE for the Rust code (which runs at CPL3 only): CR0.MP|NE, clear CR0.EM; CR4.OSFXSR|
    # OSXMMEXCPT, clear CR4.TSD (rdtsc at CPL3). MXCSR keeps its reset value: ldmxcsr is one of
    # the instructions the emulator fails on.
    movq %cr0, %rax
    andq $~0x4, %rax
    orq $0x22, %rax
    movq %rax, %cr0
    movq %cr4, %rax
    andq $~0x4, %rax
    orq $0x600, %rax
    movq %rax, %cr4
    leaq tern_pml4(%rip), %rax
    movq %rax, %cr3
    call tern_idt_fill
    xorl %edi, %edi
    call tern_cpu_setup
    # bsp_main(boot_params) on CPU 0's user stack
    movq %r12, %rdi
    leaq tern_user_stacks + {user_stack}(%rip), %rax
    leaq {bsp_main}(%rip), %rcx
    jmp tern_enter_user

# tern_enter_user: iretq to rcx at CPL3 with rsp = rax - 8 (as if called: rsp + 8 is 16-byte
# aligned), RFLAGS = tern_user_rflags. rdi (the argument) is left as is.
    .global tern_enter_user
tern_enter_user:
    subq $8, %rax
    pushq ${uds}
    pushq %rax
    pushq tern_user_rflags(%rip)
    pushq ${ucs}
    pushq %rcx
    iretq
"#,
    user_stack = const USER_STACK_SIZE,
    uds = const USER_DS,
    ucs = const USER_CS,
    bsp_main = sym crate::bsp_main,
    options(att_syntax)
);

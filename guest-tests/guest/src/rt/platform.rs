//! The guest's side of the contract with tern (`docs/guest-abi.md`; tern's side is
//! `vmm/src/layout.rs`), plus the guest's own fixed choices (selectors, stacks, vectors).

// ---- tern's contract -------------------------------------------------------------------------

/// Linux `boot_params` page; tern passes its address in RSI too.
pub const ZERO_PAGE: usize = 0x7000;
/// `boot_params` fields.
pub const BP_E820_ENTRIES: usize = 0x1e8; // u8
pub const BP_CMD_LINE_PTR: usize = 0x228; // u32
pub const BP_CMDLINE_SIZE: usize = 0x238; // u32
pub const BP_E820_TABLE: usize = 0x2d0; // 20-byte entries
pub const E820_MAX_ENTRIES: usize = 128;
pub const E820_RAM: u32 = 1;

/// AP trampoline page (SIPI vector 0x08 starts APs at 0x0800:0000).
pub const AP_TRAMPOLINE: usize = 0x8000;
pub const SIPI_VECTOR: u32 = (AP_TRAMPOLINE >> 12) as u32;
/// The MP floating pointer is in the EBDA's first KiB; the BIOS area is the fallback.
pub const EBDA_START: usize = 0x9fc00;
pub const BIOS_ROM: (usize, usize) = (0xf0000, 0x10_0000);
/// [MMIO_GAP_START, MMIO_GAP_END) is the MMIO hole (IOAPIC, LAPIC, virtio); RAM skips it.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;

/// Local APIC (xAPIC MMIO) and the registers the guest uses.
pub const LAPIC_BASE: usize = 0xfee0_0000;
pub const LAPIC_ID: usize = 0x20;
pub const LAPIC_EOI: usize = 0xb0;
pub const LAPIC_SVR: usize = 0xf0;
pub const LAPIC_ICR_LOW: usize = 0x300;
pub const LAPIC_ICR_HIGH: usize = 0x310;

/// I/O ports.
pub const COM1: u16 = 0x3f8;
/// COM2, the host control channel (IRQ 3).
pub const COM2: u16 = 0x2f8;
pub const COM2_IRQ: u32 = 3;
/// The 8259 PICs' data (mask) ports.
pub const PIC1_DATA: u16 = 0x21;
pub const PIC2_DATA: u16 = 0xa1;
/// I/O APIC (MMIO): register select and window.
pub const IOAPIC_BASE: usize = 0xfec0_0000;
pub const IOAPIC_IOWIN: usize = 0x10;
pub const TEST_EXIT: u16 = 0x4f0;
pub const BOOT_TIMER: u16 = 0x4f8;
pub const BOOT_TIMER_MAGIC: u8 = 123;

/// CPUID leaf with the TSC frequency in kHz in EAX (VMware/KVM timing leaf).
pub const CPUID_TIMING_LEAF: u32 = 0x4000_0010;

/// Test-exit statuses.
pub const EXIT_PASS: u32 = 0;
pub const EXIT_FAIL: u32 = 1;
pub const EXIT_EXCEPTION: u32 = 3;

// ---- the guest's own layout ------------------------------------------------------------------

/// GDT selectors. Kernel code/data match tern's boot GDT (0x10/0x18) so reloading the GDT never
/// leaves CS pointing at a different kind of descriptor.
pub const KERNEL_CS: u16 = 0x10;
pub const KERNEL_DS: u16 = 0x18;
pub const USER_DS: u16 = 0x20 | 3;
pub const USER_CS: u16 = 0x28 | 3;
/// TSS descriptor of CPU i is at TSS_SEL0 + 16 * i.
pub const TSS_SEL0: u16 = 0x30;

/// CPUs the guest supports (per-CPU TSS and stacks are static, in .bss).
pub const MAX_CPUS: usize = 16;
/// Per-CPU CPL3 stack (Rust code runs here). Power of two: the entry asm shifts by its log2.
pub const USER_STACK_SHIFT: u32 = 15;
pub const USER_STACK_SIZE: usize = 1 << USER_STACK_SHIFT;
/// Per-CPU interrupt stacks: only asm runs at CPL0, so they are small. IST_COUNT of them per CPU.
pub const IST_STACK_SIZE: usize = 2048;
pub const IST_COUNT: usize = 4;
pub const IST_AREA_SHIFT: u32 = 13; // IST_COUNT * IST_STACK_SIZE == 1 << 13
const _: () = assert!(IST_COUNT * IST_STACK_SIZE == 1 << IST_AREA_SHIFT);
/// Stack of the CPL3 exception reporter.
pub const FAULT_STACK_SIZE: usize = 16384;

/// Which IST each kind of gate uses. Every gate has one, so CPL0 code's red zone is never
/// overwritten, and a handler never shares a stack with the one it may interrupt.
pub const IST_SYSCALL: u8 = 1; // int 0x80 and #UD (see idt.rs) (may `sti; hlt`, taking an IRQ)
pub const IST_EXCEPTION: u8 = 2; // vectors 0..31
pub const IST_CRITICAL: u8 = 3; // NMI, #DF, #MC
pub const IST_IRQ: u8 = 4; // vectors 32..255 except 0x80

/// Interrupt vectors.
pub const SYSCALL_VECTOR: usize = 0x80;
/// IPI that wakes a parked AP (its handler only counts and EOIs).
pub const WAKE_VECTOR: u32 = 0xf0;
/// COM2's receive interrupt (I/O APIC pin 3).
pub const COM2_VECTOR: u32 = 0x23;
/// Async page faults' page-ready interrupt (rt/apf.rs; Linux uses the same vector).
pub const APF_VECTOR: u32 = 0xf3;
pub const SPURIOUS_VECTOR: u32 = 0xff;

/// Page tables: page directories for [0, PD_COUNT GiB) (enough for 64 GiB of RAM, which ends at
/// 65 GiB because of the hole).
pub const PD_COUNT: usize = 66;

/// `int 0x80` numbers (RAX; arguments in RDI, RSI; result in RAX). Implemented in `idt.rs`.
/// On this machine `int N` at CPL3 raises #UD, which the #UD handler turns into the system call.
pub mod sys {
    /// Halt until an interrupt, unless the u64 at RDI (if RDI != 0) is non-zero.
    pub const WAIT: u64 = 0;
    /// RAX = CR<RDI> for RDI in {0, 2, 3, 4}.
    pub const READ_CR: u64 = 1;
    /// CR3 = RDI (flushes the TLB).
    pub const WRITE_CR3: u64 = 2;
    /// RAX = MSR[RDI].
    pub const RDMSR: u64 = 3;
    /// MSR[RDI] = RSI.
    pub const WRMSR: u64 = 4;
    /// invlpg [RDI].
    pub const INVLPG: u64 = 5;
    /// Sets the caller's RFLAGS.IF to RDI != 0 (cli/sti at CPL3 would need IOPL 3, which this
    /// machine does not give user mode).
    pub const SET_IF: u64 = 6;
    /// CPUID leaf RDI, subleaf RSI, executed at CPL0; returns EAX..EDX in RAX, RBX, RCX, RDX.
    /// At CPL3 this machine answers CPUID itself, ignoring tern's KVM_SET_CPUID2 (e.g. no
    /// 0x40000010 leaf); at CPL0 KVM answers with tern's table.
    pub const CPUID: u64 = 7;
    /// Resumes the saved context (`apf::Frame`) at RDI: `iretq` to it at CPL3 (rt/apf.rs).
    pub const APF_RESUME: u64 = 8;
    /// MSR[RDI] = RSI, returning 1 instead of faulting when the CPU raises #GP (0 when written).
    pub const WRMSR_SAFE: u64 = 9;
}

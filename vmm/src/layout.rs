//! The one place that owns the guest physical memory layout and the I/O port map.
//!
//! The built-in test guest (`guest-tests/guest`) relies on these values too; its copy lives in
//! `guest-tests/guest/src/rt/platform.rs` and must stay in step (see `docs/guest-abi.md`).

/// Boot GDT written by tern for the 64-bit entry (null, null, code 0x10, data 0x18).
pub const BOOT_GDT_START: u64 = 0x500;
/// Empty boot IDT (the guest installs its own).
pub const BOOT_IDT_START: u64 = 0x520;
/// Linux `boot_params` ("zero page"); RSI points here at entry.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Identity page tables for the 64-bit entry: PML4, PDPT and 4 PDs (first 4 GiB in 2 MiB pages).
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
pub const PD_START: u64 = 0xb000;
/// Number of page directories tern fills for the boot identity map (4 x 1 GiB).
pub const BOOT_PD_COUNT: u64 = 4;
/// Boot stack top for the BSP (grows down through free low memory below the zero page).
pub const BOOT_STACK_POINTER: u64 = 0x6ff0;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// Start of the EBDA; the MP table lives here and the e820 low RAM region ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// Where the 64-bit kernel is loaded (ELF by its program headers; bzImage here).
pub const HIMEM_START: u64 = 0x10_0000;
/// RAM below 4 GiB ends here; [MMIO_GAP_START, 4 GiB) is the MMIO hole (IOAPIC, LAPIC, virtio).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// The virtio-balloon device's virtio-mmio window (4 KiB).
pub const VIRTIO_BALLOON_MMIO: u64 = 0xd000_0000;
/// Default addresses of the in-kernel interrupt controllers.
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;
/// pc-testdev's iomem window (64 KiB of MMIO that reads back what was written).
pub const TESTDEV_IOMEM: u64 = 0xff00_0000;
/// Where the initramfs goes: as high as possible below this limit (Linux's initrd_addr_max default).
pub const INITRAMFS_MAX_END: u64 = 0x3800_0000;

/// I/O ports.
pub mod ports {
    /// COM1, 16550 UART (IRQ 4).
    pub const COM1: u16 = 0x3f8;
    /// COM2, 16550 UART (IRQ 3): the host control channel.
    pub const COM2: u16 = 0x2f8;
    /// i8042 keyboard controller (data 0x60, command 0x64); command 0xfe resets.
    pub const I8042_DATA: u16 = 0x60;
    /// tern test-exit: a write of status S makes tern exit with code S & 0xff.
    pub const TEST_EXIT: u16 = 0x4f0;
    /// tern boot timer: a write of [`BOOT_TIMER_MAGIC`] logs the time since tern started.
    pub const BOOT_TIMER: u16 = 0x4f8;
    pub const BOOT_TIMER_MAGIC: u8 = 123;
    /// QEMU-compatible isa-debug-exit: a write of code C makes tern exit with (C << 1) | 1.
    pub const ISA_DEBUG_EXIT: u16 = 0xf4;
    /// QEMU fw_cfg (selector 0x510, data 0x511): CPU count and RAM size for kvm-unit-tests.
    pub const FW_CFG: u16 = 0x510;
    /// QEMU pc-testdev (kvm-unit-tests): scratch register, flush-page port, IRQ line ports.
    pub const TESTDEV_DATA: u16 = 0xe0;
    pub const TESTDEV_FLUSH: u16 = 0xe4;
    pub const TESTDEV_IRQ: u16 = 0x2000;
}

/// Legacy IRQ lines (GSI numbers on the in-kernel PIC/IOAPIC).
pub mod irqs {
    pub const COM1: u32 = 4;
    pub const COM2: u32 = 3;
    /// virtio-balloon (virtio-mmio; edge-triggered through an irqfd).
    pub const BALLOON: u32 = 5;
}

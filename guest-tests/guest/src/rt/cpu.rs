//! Instructions usable at CPL3 (port I/O through the TSS I/O bitmap; CR4.TSD = 0 allows rdtsc)
//! and the local APIC, which is user-mapped (uncached).

use super::platform::*;

pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O is permitted at CPL3 (IOPL = 3); no memory is touched.
    unsafe {
        core::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as outb (the TSS I/O bitmap allows the port); no memory is touched.
    unsafe {
        core::arch::asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    }
    value
}

pub fn outl(port: u16, value: u32) {
    // SAFETY: as outb.
    unsafe {
        core::arch::asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    }
}

pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no side effects; allowed at CPL3 because the guest clears CR4.TSD.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// This CPU's local APIC ID, from the LAPIC ID register (CPUID.1:EBX[31:24] is the host's on
/// this machine, which does not honour most of KVM_SET_CPUID2's leaf 1).
pub fn apic_id() -> u32 {
    // SAFETY: the LAPIC page is mapped (paging::map_ram ran before any caller); 32-bit read.
    unsafe { core::ptr::read_volatile((LAPIC_BASE + LAPIC_ID) as *const u32) >> 24 }
}

/// TSC frequency in kHz from tern's timing leaf, 0 when absent. Asked at CPL0: CPL3 CPUID
/// does not see tern's leaves on this machine.
pub fn tsc_khz() -> u64 {
    if super::user::cpuid(0x4000_0000, 0).eax < CPUID_TIMING_LEAF {
        return 0;
    }
    super::user::cpuid(CPUID_TIMING_LEAF, 0).eax as u64
}

pub fn pause() {
    core::hint::spin_loop();
}

/// Writes a local APIC register (xAPIC MMIO).
pub fn lapic_write(reg: usize, value: u32) {
    // SAFETY: the LAPIC page is identity mapped, user-accessible and uncached (paging::map_ram);
    // a 32-bit aligned store is how xAPIC registers are written.
    unsafe { core::ptr::write_volatile((LAPIC_BASE + reg) as *mut u32, value) }
}

/// Software-enables this CPU's local APIC (so fixed IPIs such as the wake vector are accepted).
pub fn lapic_enable() {
    lapic_write(LAPIC_SVR, 0x100 | SPURIOUS_VECTOR);
}

/// Sends an IPI: `icr_low` (vector, delivery mode...) to the CPU with APIC ID `apic_id`.
pub fn send_ipi(apic_id: u32, icr_low: u32) {
    lapic_write(LAPIC_ICR_HIGH, apic_id << 24);
    lapic_write(LAPIC_ICR_LOW, icr_low);
}

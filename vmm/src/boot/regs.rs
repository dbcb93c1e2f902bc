//! The boot vCPU's entry state: for the 64-bit entry its GDT, identity page tables, segment and
//! control registers; for a multiboot kernel flat 32-bit protected mode with paging off.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use super::multiboot::BOOTLOADER_MAGIC as MULTIBOOT_BOOTLOADER_MAGIC;
use crate::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_PD_COUNT, BOOT_STACK_POINTER, PDPT_START, PD_START,
    PML4_START, ZERO_PAGE_START,
};
use crate::memory::GuestMemory;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NE: u64 = 1 << 5;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const PTE_PRESENT_RW: u64 = 0x3;
const PDE_HUGE: u64 = 0x80;

/// Boot GDT: null, null, 64-bit code (0x10), data (0x18), TSS (0x20), as Linux's boot protocol
/// expects __BOOT_CS = 0x10 and __BOOT_DS = 0x18.
const GDT: [u64; 5] = [
    0,
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x008f_8b00_0000_ffff,
];
/// The multiboot entry's GDT: the same slots, with a flat 32-bit code segment at 0x10.
const GDT32: [u64; 5] = [
    0,
    0,
    0x00cf_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x008f_8b00_0000_ffff,
];
pub const BOOT_CS: u16 = 0x10;
pub const BOOT_DS: u16 = 0x18;
const BOOT_TSS: u16 = 0x20;

/// Unpacks a GDT descriptor into KVM's segment form.
fn segment(selector: u16, desc: u64) -> kvm_segment {
    let limit = ((desc & 0xffff) | ((desc >> 32) & 0xf_0000)) as u32;
    let g = ((desc >> 55) & 1) as u8;
    kvm_segment {
        base: ((desc >> 16) & 0xff_ffff) | (((desc >> 56) & 0xff) << 24),
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector,
        type_: ((desc >> 40) & 0xf) as u8,
        present: ((desc >> 47) & 1) as u8,
        dpl: ((desc >> 45) & 3) as u8,
        db: ((desc >> 54) & 1) as u8,
        s: ((desc >> 44) & 1) as u8,
        l: ((desc >> 53) & 1) as u8,
        g,
        avl: ((desc >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

fn write_gdt(mem: &GuestMemory, gdt: &[u64]) -> Result<(), vm_memory::GuestMemoryError> {
    for (i, d) in gdt.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(BOOT_GDT_START + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
}

/// Writes the 32-bit GDT and an empty IDT; the multiboot entry needs no page tables.
pub fn write_protected_mode_gdt(mem: &GuestMemory) -> Result<(), vm_memory::GuestMemoryError> {
    write_gdt(mem, &GDT32)
}

/// Writes the boot GDT, an empty IDT and identity page tables for the first 4 GiB.
pub fn write_boot_tables(mem: &GuestMemory) -> Result<(), vm_memory::GuestMemoryError> {
    write_gdt(mem, &GDT)?;
    mem.write_obj(PDPT_START | PTE_PRESENT_RW, GuestAddress(PML4_START))?;
    let mut pd = vec![0u8; 4096];
    for dir in 0..BOOT_PD_COUNT {
        let pd_addr = PD_START + dir * 4096;
        mem.write_obj(pd_addr | PTE_PRESENT_RW, GuestAddress(PDPT_START + dir * 8))?;
        for (i, entry) in pd.chunks_exact_mut(8).enumerate() {
            let phys = (dir << 30) | ((i as u64) << 21);
            entry.copy_from_slice(&(phys | PTE_PRESENT_RW | PDE_HUGE).to_le_bytes());
        }
        mem.write_slice(&pd, GuestAddress(pd_addr))?;
    }
    Ok(())
}

/// Special registers for a 64-bit entry with the boot tables above.
pub fn boot_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment(BOOT_CS, GDT[2]);
    let data = segment(BOOT_DS, GDT[3]);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(BOOT_TSS, GDT[4]);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET | X86_CR0_NE;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// Special registers for the multiboot entry: flat 4 GiB CS/DS/ES/FS/GS/SS, protected mode,
/// paging off, PAE/long mode off. CD/NW are cleared, as a BIOS leaves them.
pub fn protected_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment(BOOT_CS, GDT32[2]);
    let data = segment(BOOT_DS, GDT32[3]);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(BOOT_TSS, GDT32[4]);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&GDT32) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    sregs
}

/// General registers at a multiboot entry: EAX = the boot loader magic, EBX = the information.
pub fn multiboot_regs(eip: u32, info: u32) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: eip.into(),
        rax: MULTIBOOT_BOOTLOADER_MAGIC.into(),
        rbx: info.into(),
        rsp: BOOT_STACK_POINTER,
        ..Default::default()
    }
}

/// General registers at the kernel entry (Linux 64-bit boot protocol: RSI = boot_params).
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_unpack_like_the_cpu_would() {
        let cs = segment(BOOT_CS, GDT[2]);
        assert_eq!((cs.type_, cs.l, cs.db, cs.present, cs.s), (0xb, 1, 0, 1, 1));
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment(BOOT_DS, GDT[3]);
        assert_eq!((ds.type_, ds.l, ds.db), (3, 0, 1));
        let tr = segment(BOOT_TSS, GDT[4]);
        assert_eq!((tr.type_, tr.s), (0xb, 0));
    }

    #[test]
    fn multiboot_entry_is_flat_32_bit_protected_mode() {
        let s = protected_mode_sregs(kvm_sregs::default());
        assert_eq!((s.cs.l, s.cs.db, s.cs.type_, s.cs.base), (0, 1, 0xb, 0));
        assert_eq!(
            (s.cs.limit, s.ss.limit, s.ds.db),
            (0xffff_ffff, 0xffff_ffff, 1)
        );
        assert_eq!(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE);
        assert_eq!((s.efer, s.cr4), (0, 0));
        let r = multiboot_regs(0x40_0000, 0x10_2000);
        assert_eq!(
            (r.rax, r.rbx, r.rip, r.rflags),
            (0x2bad_b002, 0x10_2000, 0x40_0000, 2)
        );
    }
}

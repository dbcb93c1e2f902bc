//! Identity page tables with 2 MiB pages, USER on everything (suite code runs at CPL3).
//!
//! The tables are static data, so the CPL0 entry only loads CR3: PML4[0] -> PDPT, whose first
//! PD_COUNT entries point at the page directories; PD 0 (the first GiB, holding this image and
//! the low pages tern uses) starts out fully mapped. `map_ram` then rewrites every PD entry at
//! CPL3, natively (a loop of tens of thousands of iterations would take seconds at emulated
//! CPL0): RAM from e820 write-back, the [3 GiB, 4 GiB) hole uncached, the rest not present. The
//! tables are therefore user-writable, which is fine for a test guest.

use super::bootinfo::BootInfo;
use super::platform::*;
use super::user;

const PAGE_2M: u64 = 2 << 20;
const P: u64 = 1 << 0;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
const PWT: u64 = 1 << 3;
const PCD: u64 = 1 << 4;
const PS: u64 = 1 << 7;
const RAM_FLAGS: u64 = P | RW | US | PS;
const MMIO_FLAGS: u64 = P | RW | US | PWT | PCD | PS;

core::arch::global_asm!(
    r#"
    .section .data.tern_paging, "aw"
    .balign 4096
    .global tern_pml4
tern_pml4:
    .quad tern_pdpt + 7
    .fill 511, 8, 0
tern_pdpt:
    .quad tern_pd0 + 7
    .set tern_pdi, 0
    .rept {pd_count} - 1
    .quad tern_pd_rest + tern_pdi * 4096 + 7
    .set tern_pdi, tern_pdi + 1
    .endr
    .fill 512 - {pd_count}, 8, 0
    .global tern_pd0
tern_pd0:
    .set tern_pdi, 0
    .rept 512
    .quad (tern_pdi << 21) | 0x87
    .set tern_pdi, tern_pdi + 1
    .endr

    .section .bss.tern_paging, "aw", @nobits
    .balign 4096
    .global tern_pd_rest
tern_pd_rest:
    .skip 4096 * ({pd_count} - 1)
"#,
    pd_count = const PD_COUNT,
    options(att_syntax)
);

extern "C" {
    static mut tern_pml4: [u64; 512];
    static mut tern_pd0: [u64; 512];
    static mut tern_pd_rest: [[u64; 512]; PD_COUNT - 1];
}

/// Highest address + 1 the tables can map.
pub const MAPPABLE_END: u64 = (PD_COUNT as u64) << 30;

/// Rewrites the page directories from the e820 map and flushes the TLB.
pub fn map_ram(boot: &BootInfo) -> Result<(), &'static str> {
    if boot.ram_regions().any(|(_, end)| end > MAPPABLE_END) {
        return Err("RAM above the 66 GiB the page tables can map");
    }
    for pd in 0..PD_COUNT {
        let table: *mut [u64; 512] = if pd == 0 {
            core::ptr::addr_of_mut!(tern_pd0)
        } else {
            // SAFETY: only the address is taken (pd - 1 < PD_COUNT - 1); written below.
            unsafe { core::ptr::addr_of_mut!(tern_pd_rest[pd - 1]) }
        };
        for i in 0..512 {
            let addr = ((pd as u64) << 30) + ((i as u64) << 21);
            let end = addr + PAGE_2M;
            let entry = if boot.ram_regions().any(|(s, e)| s < end && addr < e) {
                addr | RAM_FLAGS
            } else if (MMIO_GAP_START..MMIO_GAP_END).contains(&addr) {
                addr | MMIO_FLAGS
            } else {
                0
            };
            // SAFETY: the tables are ours and identity mapped; the entries covering this code
            // and its data keep their value (they are RAM), so nothing in use moves. Volatile:
            // the MMU reads these, the compiler must not elide or reorder them away.
            unsafe { core::ptr::write_volatile(&mut (*table)[i], entry) };
        }
    }
    // Reloading CR3 flushes stale (now not-present) entries.
    let pml4 = core::ptr::addr_of!(tern_pml4) as u64;
    user::write_cr3(pml4);
    Ok(())
}

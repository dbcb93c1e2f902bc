//! The Linux `boot_params` page: setup header, command line pointer, initramfs and the e820 map.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{CMDLINE_START, EBDA_START, HIMEM_START, ZERO_PAGE_START};
use crate::memory::{ram_ranges, GuestMemory};

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;

/// The e820 map tern reports for `mem_size` bytes of RAM.
pub fn e820_map(mem_size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for (start, size) in ram_ranges(mem_size) {
        let (start, size) = if start.0 == 0 {
            (HIMEM_START, size.saturating_sub(HIMEM_START))
        } else {
            (start.0, size)
        };
        if size > 0 {
            map.push((start, size, E820_RAM));
        }
    }
    map
}

pub struct BootParamsInput {
    /// The bzImage's own setup header, when booting a bzImage.
    pub setup_header: Option<setup_header>,
    pub cmdline_len: usize,
    pub initramfs: Option<(u64, u64)>,
    pub mem_size: u64,
}

pub fn write_boot_params(
    mem: &GuestMemory,
    input: &BootParamsInput,
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut params = boot_params::default();
    if let Some(hdr) = input.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = input.cmdline_len as u32;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    if let Some((addr, size)) = input.initramfs {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = e820_map(input.mem_size);
    for (slot, (addr, size, type_)) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *type_,
        };
    }
    params.e820_entries = map.len().min(params.e820_table.len()) as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_covers_ram_and_skips_holes() {
        let map = e820_map(512 << 20);
        assert_eq!(map[0], (0, EBDA_START, E820_RAM));
        assert_eq!(map[2], (HIMEM_START, (512 << 20) - HIMEM_START, E820_RAM));
        let big = e820_map(8 << 30);
        let ram: u64 = big.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        assert_eq!(ram, (8 << 30) - (HIMEM_START - EBDA_START));
        assert_eq!(big.last().map(|e| e.0), Some(4 << 30));
    }
}

//! What tern tells the guest: `boot_params` (e820 map, command line) and the MP table.
//! Read at CPL3 (all low memory is user-mapped).

use super::platform::*;

#[derive(Clone, Copy, Default)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

pub struct BootInfo {
    e820: [E820Entry; E820_MAX_ENTRIES],
    e820_len: usize,
    cmdline: &'static str,
}

/// Reads a little-endian value of type T at physical address `addr`.
///
/// # Safety
/// `addr` must be mapped and hold a T (alignment not needed).
unsafe fn peek<T: Copy>(addr: usize) -> T {
    // SAFETY: the caller guarantees the address; read_unaligned copes with packed layouts.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

impl BootInfo {
    /// Parses the `boot_params` page at `zero_page`.
    pub fn parse(zero_page: usize) -> BootInfo {
        let mut info = BootInfo {
            e820: [E820Entry::default(); E820_MAX_ENTRIES],
            e820_len: 0,
            cmdline: "",
        };
        // SAFETY: tern filled the boot_params page (identity mapped, user-readable) per the ABI.
        let n: u8 = unsafe { peek(zero_page + BP_E820_ENTRIES) };
        info.e820_len = (n as usize).min(E820_MAX_ENTRIES);
        for i in 0..info.e820_len {
            let at = zero_page + BP_E820_TABLE + 20 * i;
            // SAFETY: inside the e820 table of the boot_params page.
            info.e820[i] = unsafe {
                E820Entry {
                    addr: peek(at),
                    size: peek(at + 8),
                    kind: peek(at + 16),
                }
            };
        }
        // SAFETY: header fields of the boot_params page.
        let (ptr, max): (u32, u32) = unsafe {
            (
                peek(zero_page + BP_CMD_LINE_PTR),
                peek(zero_page + BP_CMDLINE_SIZE),
            )
        };
        if ptr != 0 {
            let max = (max as usize).clamp(1, 0x10000);
            // SAFETY: tern's command line area (identity mapped RAM) of at least `max` bytes.
            let bytes = unsafe { core::slice::from_raw_parts(ptr as usize as *const u8, max) };
            let len = bytes.iter().position(|&b| b == 0).unwrap_or(max);
            info.cmdline = core::str::from_utf8(&bytes[..len]).unwrap_or("");
        }
        info
    }

    pub fn e820(&self) -> &[E820Entry] {
        &self.e820[..self.e820_len]
    }

    /// RAM regions as (start, end).
    pub fn ram_regions(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.e820()
            .iter()
            .filter(|e| e.kind == E820_RAM && e.size > 0)
            .map(|e| (e.addr, e.addr.saturating_add(e.size)))
    }

    /// The memory size the user asked tern for, in bytes: tern reports [0, 0x9fc00) +
    /// [1 MiB, min(size, 3 GiB)) + [4 GiB, ...), so the size is the end of the highest RAM region
    /// below the hole plus all RAM above 4 GiB (the low gaps are not subtracted).
    pub fn memory_size(&self) -> u64 {
        let below = self
            .ram_regions()
            .filter(|&(s, _)| s < MMIO_GAP_START)
            .map(|(_, e)| e.min(MMIO_GAP_START))
            .max()
            .unwrap_or(0);
        let above: u64 = self
            .ram_regions()
            .filter(|&(s, _)| s >= MMIO_GAP_END)
            .map(|(s, e)| e - s)
            .sum();
        below + above
    }

    /// Value of `key=value` on the command line (the last one wins).
    pub fn arg(&self, key: &str) -> Option<&'static str> {
        self.cmdline
            .split_ascii_whitespace()
            .filter_map(|w| w.split_once('='))
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v)
            .next_back()
    }
}

/// Processors listed in the MP table.
pub struct MpCpus {
    pub apic_ids: [u8; 256],
    pub count: usize,
    pub bsp_apic_id: Option<u8>,
}

fn checksum_ok(addr: usize, len: usize) -> bool {
    // SAFETY: callers pass ranges inside the EBDA / BIOS area, identity mapped.
    let bytes = unsafe { core::slice::from_raw_parts(addr as *const u8, len) };
    bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b)) == 0
}

/// Finds the "_MP_" floating pointer (16-byte aligned, valid checksum) in [start, end).
fn find_floating(start: usize, end: usize) -> Option<usize> {
    (start..end).step_by(16).find(|&a| {
        // SAFETY: a + 16 <= end, inside the scanned low-memory area.
        let sig: [u8; 4] = unsafe { peek(a) };
        &sig == b"_MP_" && checksum_ok(a, 16)
    })
}

/// Reads the MP configuration table's processor entries (enabled ones only).
pub fn scan_mp() -> Result<MpCpus, &'static str> {
    let fp = find_floating(EBDA_START, EBDA_START + 1024)
        .or_else(|| find_floating(BIOS_ROM.0, BIOS_ROM.1))
        .ok_or("no MP floating pointer")?;
    // SAFETY: fields of the floating pointer structure found above.
    let table: u32 = unsafe { peek(fp + 4) };
    let table = table as usize;
    // SAFETY: the configuration table header (44 bytes) the floating pointer points at.
    let (sig, len, entries): ([u8; 4], u16, u16) =
        unsafe { (peek(table), peek(table + 4), peek(table + 0x22)) };
    if &sig != b"PCMP" || !checksum_ok(table, len as usize) {
        return Err("bad MP configuration table");
    }
    let mut cpus = MpCpus {
        apic_ids: [0; 256],
        count: 0,
        bsp_apic_id: None,
    };
    let (mut at, end) = (table + 0x2c, table + len as usize);
    for _ in 0..entries {
        if at >= end {
            break;
        }
        // SAFETY: inside the checksummed configuration table.
        let kind: u8 = unsafe { peek(at) };
        match kind {
            0 => {
                // SAFETY: processor entry (20 bytes): APIC ID at 1, flags at 3.
                let (id, flags): (u8, u8) = unsafe { (peek(at + 1), peek(at + 3)) };
                if flags & 1 != 0 && cpus.count < cpus.apic_ids.len() {
                    cpus.apic_ids[cpus.count] = id;
                    cpus.count += 1;
                    if flags & 2 != 0 {
                        cpus.bsp_apic_id = Some(id);
                    }
                }
                at += 20;
            }
            1..=4 => at += 8, // bus, I/O APIC, I/O interrupt, local interrupt
            _ => return Err("unknown MP table entry type"),
        }
    }
    if cpus.count == 0 {
        return Err("MP table lists no processors");
    }
    Ok(cpus)
}

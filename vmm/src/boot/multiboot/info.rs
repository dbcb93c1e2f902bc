//! The multiboot information structure and everything it points to, laid out as one block:
//! info (88 bytes), module list, memory map, strings, then the module data on a page boundary.

use super::MultibootError;

/// Info flags tern sets: mem_lower/upper, cmdline, mods, mmap, boot_loader_name.
const INFO_MEMORY: u32 = 1 << 0;
const INFO_CMDLINE: u32 = 1 << 2;
const INFO_MODS: u32 = 1 << 3;
const INFO_MMAP: u32 = 1 << 6;
const INFO_LOADER_NAME: u32 = 1 << 9;

const INFO_LEN: usize = 88;
const MODULE_AT: usize = 0x80;
// The module list sits after the 88-byte info structure.
const _: () = assert!(INFO_LEN <= MODULE_AT);
const MMAP_AT: usize = 0x100;
/// Each mmap entry: size (u32, not counting itself) = 20, base (u64), length (u64), type (u32).
const MMAP_ENTRY_LEN: usize = 24;
const PAGE: u64 = 4096;
const LOADER_NAME: &str = "tern";

pub struct InfoInput<'a> {
    pub cmdline: &'a str,
    /// Module 0: its bytes and its string (tern passes the file's path).
    pub module: Option<(&'a [u8], &'a str)>,
    /// KiB of conventional memory (below the EBDA) and of contiguous RAM from 1 MiB.
    pub mem_lower_kib: u32,
    pub mem_upper_kib: u32,
    /// (base, length, type) as in e820: 1 = RAM.
    pub memory_map: &'a [(u64, u64, u32)],
}

/// The block to write at `base`; `len` covers the module data too.
pub struct InfoLayout {
    pub bytes: Vec<u8>,
    pub len: u64,
    /// Where the module data goes (page aligned), if there is one.
    pub module_at: Option<u64>,
}

fn put32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Lays out the information block at `base` (page aligned by the caller). Addresses must fit in
/// 32 bits: the kernel reads them in protected mode.
pub fn build_info(base: u64, input: &InfoInput) -> Result<InfoLayout, MultibootError> {
    let too_high = |end| MultibootError::OutsideRam {
        what: "multiboot information",
        start: base,
        end,
    };
    let addr32 =
        |off: usize| u32::try_from(base + off as u64).map_err(|_| too_high(base + off as u64));
    let mmap_len = input.memory_map.len() * MMAP_ENTRY_LEN;
    let name_at = MMAP_AT + mmap_len;
    let cmdline_at = name_at + LOADER_NAME.len() + 1;
    let mod_name_at = cmdline_at + input.cmdline.len() + 1;
    let mod_name = input.module.map_or("", |(_, name)| name);
    let strings_end = mod_name_at + mod_name.len() + 1;
    let mut bytes = vec![0u8; strings_end];

    let mut flags = INFO_MEMORY | INFO_CMDLINE | INFO_MMAP | INFO_LOADER_NAME;
    put32(&mut bytes, 4, input.mem_lower_kib);
    put32(&mut bytes, 8, input.mem_upper_kib);
    put32(&mut bytes, 16, addr32(cmdline_at)?);
    for (i, &(addr, len, kind)) in input.memory_map.iter().enumerate() {
        let at = MMAP_AT + i * MMAP_ENTRY_LEN;
        put32(&mut bytes, at, (MMAP_ENTRY_LEN - 4) as u32);
        put64(&mut bytes, at + 4, addr);
        put64(&mut bytes, at + 12, len);
        put32(&mut bytes, at + 20, kind);
    }
    put32(&mut bytes, 44, mmap_len as u32);
    put32(&mut bytes, 48, addr32(MMAP_AT)?);
    put32(&mut bytes, 64, addr32(name_at)?);
    bytes[name_at..name_at + LOADER_NAME.len()].copy_from_slice(LOADER_NAME.as_bytes());
    bytes[cmdline_at..cmdline_at + input.cmdline.len()].copy_from_slice(input.cmdline.as_bytes());

    let mut len = strings_end as u64;
    let mut module_at = None;
    if let Some((data, name)) = input.module {
        flags |= INFO_MODS;
        let at = (base + len).div_ceil(PAGE) * PAGE;
        let end = at + data.len() as u64;
        let start32 = u32::try_from(at).map_err(|_| too_high(end))?;
        let end32 = u32::try_from(end).map_err(|_| too_high(end))?;
        put32(&mut bytes, 20, 1);
        put32(&mut bytes, 24, addr32(MODULE_AT)?);
        put32(&mut bytes, MODULE_AT, start32);
        put32(&mut bytes, MODULE_AT + 4, end32);
        put32(&mut bytes, MODULE_AT + 8, addr32(mod_name_at)?);
        bytes[mod_name_at..mod_name_at + name.len()].copy_from_slice(name.as_bytes());
        len = end - base;
        module_at = Some(at);
    }
    put32(&mut bytes, 0, flags);
    Ok(InfoLayout {
        bytes,
        len,
        module_at,
    })
}

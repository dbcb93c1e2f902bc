//! Multiboot v1 kernels (kvm-unit-tests' `x86/*.flat`, GRUB-style kernels): finds the header in the
//! image's first 8 KiB, loads the image (ELF32 program headers, or the header's address fields when
//! flag 16 is set), writes the multiboot information and says where the 32-bit entry goes.
//!
//! Everything about the image is input: every offset and length read from it is checked.

mod info;

use std::ops::Range;

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use super::params::e820_map;
use crate::layout::{EBDA_START, HIMEM_START};
use crate::memory::{ram_ranges, GuestMemory};
pub use info::{build_info, InfoInput};

/// In the image's header.
pub const HEADER_MAGIC: u32 = 0x1bad_b002;
/// In EAX at the kernel's entry.
pub const BOOTLOADER_MAGIC: u32 = 0x2bad_b002;
/// The header must sit, 4-byte aligned, within the image's first 8 KiB.
pub const SEARCH_LEN: usize = 8192;

/// Header flags tern honours (bits 0-15 are requirements: an unknown one means "do not boot").
const FLAG_PAGE_ALIGN: u32 = 1 << 0;
const FLAG_MEMORY_INFO: u32 = 1 << 1;
/// Video mode wishes are only hints; tern has no framebuffer and reports none.
const FLAG_VIDEO_MODE: u32 = 1 << 2;
const FLAG_ADDRESS_FIELDS: u32 = 1 << 16;
const KNOWN_REQUIRED: u32 = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO | FLAG_VIDEO_MODE;

const ELF_HEADER_LEN: usize = 52;
const ELF_PHDR_LEN: usize = 32;
const EM_386: u16 = 3;
const PT_LOAD: u32 = 1;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum MultibootError {
    #[error("no multiboot header in the first 8 KiB")]
    NoHeader,
    #[error("multiboot header at offset {offset:#x} has a bad checksum")]
    BadChecksum { offset: usize },
    #[error("multiboot header requires features tern does not provide (flags {flags:#x})")]
    UnsupportedFlags { flags: u32 },
    #[error("image truncated: {what} needs bytes {start:#x}..{end:#x}, the image has {len}")]
    Truncated {
        what: &'static str,
        start: u64,
        end: u64,
        len: usize,
    },
    #[error("not a loadable multiboot image: {0}")]
    BadImage(&'static str),
    #[error("{what} at {start:#x}..{end:#x} is outside guest RAM")]
    OutsideRam {
        what: &'static str,
        start: u64,
        end: u64,
    },
    #[error("cannot write into guest memory: {0}")]
    GuestMemory(String),
}

/// One piece of the image to copy into guest memory: `file` bytes at `addr`, then zeros up to
/// `mem_size` (BSS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub addr: u64,
    pub file: Range<usize>,
    pub mem_size: u64,
}

/// A parsed, checked multiboot image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// The header's flags.
    pub flags: u32,
    /// Physical entry point.
    pub entry: u32,
    pub segments: Vec<Segment>,
    /// First byte after the highest segment.
    pub end: u64,
}

fn u32_at(image: &[u8], offset: usize, what: &'static str) -> Result<u32, MultibootError> {
    let end = offset.checked_add(4);
    match end.and_then(|e| image.get(offset..e)) {
        Some(b) => Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        None => Err(truncated(
            what,
            offset as u64,
            offset as u64 + 4,
            image.len(),
        )),
    }
}

fn u16_at(image: &[u8], offset: usize, what: &'static str) -> Result<u16, MultibootError> {
    match offset.checked_add(2).and_then(|e| image.get(offset..e)) {
        Some(b) => Ok(u16::from_le_bytes([b[0], b[1]])),
        None => Err(truncated(
            what,
            offset as u64,
            offset as u64 + 2,
            image.len(),
        )),
    }
}

fn truncated(what: &'static str, start: u64, end: u64, len: usize) -> MultibootError {
    MultibootError::Truncated {
        what,
        start,
        end,
        len,
    }
}

/// Where the first valid header is: `Ok(Some(offset))`; `Ok(None)` if the magic never appears;
/// `Err(BadChecksum)` if it appears only with a bad checksum.
pub fn find_header(image: &[u8]) -> Result<Option<usize>, MultibootError> {
    let window = &image[..image.len().min(SEARCH_LEN)];
    let mut bad = None;
    for (i, word) in window.chunks_exact(4).enumerate() {
        if u32::from_le_bytes([word[0], word[1], word[2], word[3]]) != HEADER_MAGIC {
            continue;
        }
        let offset = i * 4;
        // A header cut off by the end of the window or the file is not a header.
        let (Ok(flags), Ok(sum)) = (
            u32_at(window, offset + 4, "header"),
            u32_at(window, offset + 8, "header"),
        ) else {
            bad.get_or_insert(offset);
            continue;
        };
        if HEADER_MAGIC.wrapping_add(flags).wrapping_add(sum) == 0 {
            return Ok(Some(offset));
        }
        bad.get_or_insert(offset);
    }
    match bad {
        Some(offset) => Err(MultibootError::BadChecksum { offset }),
        None => Ok(None),
    }
}

/// Whether `[start, start + len)` lies inside one of the RAM ranges `(base, size)`.
fn check_in_ram(
    ram: &[(u64, u64)],
    what: &'static str,
    start: u64,
    len: u64,
) -> Result<(), MultibootError> {
    let outside = |end| MultibootError::OutsideRam { what, start, end };
    let end = start.checked_add(len).ok_or(outside(u64::MAX))?;
    // The entry runs with 32-bit addresses: nothing can live at or above 4 GiB.
    let fits = end <= 1 << 32
        && ram
            .iter()
            .any(|&(base, size)| start >= base && base.checked_add(size).is_some_and(|e| end <= e));
    if fits {
        Ok(())
    } else {
        Err(outside(end))
    }
}

/// Parses and checks a multiboot image against guest RAM (`(base, size)` ranges).
pub fn parse(image: &[u8], ram: &[(u64, u64)]) -> Result<Image, MultibootError> {
    let offset = find_header(image)?.ok_or(MultibootError::NoHeader)?;
    let flags = u32_at(image, offset + 4, "header")?;
    if flags & 0xffff & !KNOWN_REQUIRED != 0 {
        return Err(MultibootError::UnsupportedFlags { flags });
    }
    let (entry, segments) = if flags & FLAG_ADDRESS_FIELDS != 0 {
        address_fields(image, offset)?
    } else {
        elf32(image)?
    };
    let mut end = 0u64;
    for s in &segments {
        check_in_ram(ram, "segment", s.addr, s.mem_size)?;
        end = end.max(s.addr + s.mem_size);
    }
    if segments.is_empty() {
        return Err(MultibootError::BadImage("no loadable segment"));
    }
    let entry_inside = segments
        .iter()
        .any(|s| (s.addr..s.addr + s.mem_size).contains(&u64::from(entry)));
    if !entry_inside {
        return Err(MultibootError::BadImage(
            "the entry point is outside every loaded segment",
        ));
    }
    Ok(Image {
        flags,
        entry,
        segments,
        end,
    })
}

/// Flag 16: the header says where the image goes (the "a.out kludge").
fn address_fields(image: &[u8], offset: usize) -> Result<(u32, Vec<Segment>), MultibootError> {
    let field = |n: usize| u32_at(image, offset + 12 + 4 * n, "header address fields");
    let (header_addr, load_addr, load_end, bss_end, entry) =
        (field(0)?, field(1)?, field(2)?, field(3)?, field(4)?);
    // The header's own file offset ties file positions to addresses.
    let start = (offset as u64)
        .checked_sub(u64::from(
            header_addr
                .checked_sub(load_addr)
                .ok_or(MultibootError::BadImage("header_addr is below load_addr"))?,
        ))
        .ok_or(MultibootError::BadImage(
            "load_addr lies before the start of the file",
        ))?;
    let file_len = image.len() as u64;
    let load_len = match load_end {
        0 => file_len.saturating_sub(start),
        e => u64::from(
            e.checked_sub(load_addr)
                .ok_or(MultibootError::BadImage("load_end_addr is below load_addr"))?,
        ),
    };
    let file_end = start + load_len;
    if file_end > file_len {
        return Err(truncated("the loaded image", start, file_end, image.len()));
    }
    let mem_size = match bss_end {
        0 => load_len,
        e => u64::from(
            e.checked_sub(load_addr)
                .ok_or(MultibootError::BadImage("bss_end_addr is below load_addr"))?,
        ),
    };
    if mem_size < load_len {
        return Err(MultibootError::BadImage(
            "bss_end_addr is below load_end_addr",
        ));
    }
    let segment = Segment {
        addr: u64::from(load_addr),
        file: start as usize..file_end as usize,
        mem_size,
    };
    Ok((entry, vec![segment]))
}

/// The ELF32 program headers: every PT_LOAD segment at its physical address.
fn elf32(image: &[u8]) -> Result<(u32, Vec<Segment>), MultibootError> {
    if image.len() < 4 || image[..4] != *b"\x7fELF" {
        return Err(MultibootError::BadImage(
            "not ELF and the header has no address fields (flag 16)",
        ));
    }
    if image.len() < ELF_HEADER_LEN {
        return Err(truncated(
            "ELF header",
            0,
            ELF_HEADER_LEN as u64,
            image.len(),
        ));
    }
    if image[4] != 1 || image[5] != 1 {
        return Err(MultibootError::BadImage(
            "not a little-endian ELF32 image (use the address fields for other formats)",
        ));
    }
    if u16_at(image, 18, "ELF header")? != EM_386 {
        return Err(MultibootError::BadImage("ELF machine is not i386"));
    }
    let entry = u32_at(image, 24, "ELF header")?;
    let phoff = u32_at(image, 28, "ELF header")? as usize;
    let phentsize = usize::from(u16_at(image, 42, "ELF header")?);
    let phnum = usize::from(u16_at(image, 44, "ELF header")?);
    if phentsize < ELF_PHDR_LEN {
        return Err(MultibootError::BadImage(
            "ELF program header size is too small",
        ));
    }
    let table_end = phentsize
        .checked_mul(phnum)
        .and_then(|n| n.checked_add(phoff))
        .filter(|&e| e <= image.len())
        .ok_or(truncated(
            "ELF program headers",
            phoff as u64,
            phoff as u64 + (phentsize as u64) * (phnum as u64),
            image.len(),
        ))?;
    let mut segments = Vec::new();
    for ph in (phoff..table_end).step_by(phentsize) {
        let field = |n: usize| u32_at(image, ph + 4 * n, "ELF program header");
        let (kind, offset, vaddr, paddr, filesz, memsz) = (
            field(0)?,
            field(1)?,
            field(2)?,
            field(3)?,
            field(4)?,
            field(5)?,
        );
        if kind != PT_LOAD || memsz == 0 {
            continue;
        }
        if filesz > memsz {
            return Err(MultibootError::BadImage(
                "a segment's file size exceeds its memory size",
            ));
        }
        let file_end = u64::from(offset) + u64::from(filesz);
        if file_end > image.len() as u64 {
            return Err(truncated(
                "ELF segment",
                offset.into(),
                file_end,
                image.len(),
            ));
        }
        segments.push((
            vaddr,
            Segment {
                addr: paddr.into(),
                file: offset as usize..file_end as usize,
                mem_size: memsz.into(),
            },
        ));
    }
    // e_entry is virtual; it runs with paging off, so translate it through its segment.
    let entry = segments
        .iter()
        .find(|(vaddr, s)| entry >= *vaddr && u64::from(entry - vaddr) < s.mem_size)
        .map(|(vaddr, s)| (s.addr + u64::from(entry - vaddr)) as u32)
        .unwrap_or(entry);
    Ok((entry, segments.into_iter().map(|(_, s)| s).collect()))
}

/// Copies the segments into guest memory and zeroes their BSS.
pub fn load_segments(
    mem: &GuestMemory,
    image: &[u8],
    parsed: &Image,
) -> Result<(), MultibootError> {
    let mem_err = |e: vm_memory::GuestMemoryError| MultibootError::GuestMemory(e.to_string());
    for s in &parsed.segments {
        let data = image
            .get(s.file.clone())
            .ok_or(MultibootError::BadImage("segment outside the image"))?;
        mem.write_slice(data, GuestAddress(s.addr))
            .map_err(mem_err)?;
        // Guest RAM starts zeroed, but a segment may overlap what tern wrote before it. BSS is
        // bounded by guest RAM (checked), still zeroed a chunk at a time.
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK as usize];
        let mut at = s.addr + data.len() as u64;
        let end = s.addr + s.mem_size;
        while at < end {
            let n = (end - at).min(CHUNK) as usize;
            mem.write_slice(&zeros[..n], GuestAddress(at))
                .map_err(mem_err)?;
            at += n as u64;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;

/// Where the boot vCPU starts: EIP, and EBX = the information block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loaded {
    pub entry: u32,
    pub info: u32,
}

/// Loads a multiboot image, its command line and module 0, and writes the information block
/// right after the image (at 1 MiB at the lowest), as QEMU does.
pub fn load(
    mem: &GuestMemory,
    image: &[u8],
    cmdline: &str,
    module: Option<(&[u8], &str)>,
    mem_size: u64,
) -> Result<Loaded, MultibootError> {
    let ram: Vec<(u64, u64)> = ram_ranges(mem_size)
        .into_iter()
        .map(|(a, l)| (a.0, l))
        .collect();
    let parsed = parse(image, &ram)?;
    load_segments(mem, image, &parsed)?;
    let low_end = ram.first().map_or(0, |&(base, size)| base + size);
    let map = e820_map(mem_size);
    let input = InfoInput {
        cmdline,
        module,
        mem_lower_kib: (EBDA_START / 1024) as u32,
        mem_upper_kib: (low_end.saturating_sub(HIMEM_START) / 1024) as u32,
        memory_map: &map,
    };
    let base = parsed.end.max(HIMEM_START).div_ceil(4096) * 4096;
    let layout = build_info(base, &input)?;
    check_in_ram(&ram, "multiboot information and module", base, layout.len)?;
    let mem_err = |e: vm_memory::GuestMemoryError| MultibootError::GuestMemory(e.to_string());
    mem.write_slice(&layout.bytes, GuestAddress(base))
        .map_err(mem_err)?;
    if let (Some(at), Some((data, _))) = (layout.module_at, module) {
        mem.write_slice(data, GuestAddress(at)).map_err(mem_err)?;
    }
    Ok(Loaded {
        entry: parsed.entry,
        info: base as u32,
    })
}

//! Zero-filled parts of ELF segments (p_memsz beyond p_filesz: BSS). linux-loader copies only the
//! file part. Fresh guest RAM reads zero anyway, but lazy RAM (`lazy-from=FILE`) would fill the
//! pages tern never wrote from the file, so the loader writes the zeros itself, as QEMU does.

use std::io::{Read, Seek, SeekFrom};

use vm_memory::{Bytes, GuestAddress, GuestMemory as _, Permissions};

use super::BootError;
use crate::memory::GuestMemory;

const PT_LOAD: u32 = 1;
/// Size of an ELF64 program header.
const PHDR_SIZE: usize = 56;

/// A PT_LOAD segment's zero-filled part: (guest physical start, length).
fn zero_ranges(image: &mut (impl Read + Seek)) -> std::io::Result<Vec<(u64, u64)>> {
    let mut ehdr = [0u8; 64];
    image.seek(SeekFrom::Start(0))?;
    image.read_exact(&mut ehdr)?;
    let phoff = u64::from_le_bytes(ehdr[0x20..0x28].try_into().unwrap_or_default());
    let phnum = u16::from_le_bytes([ehdr[0x38], ehdr[0x39]]);
    image.seek(SeekFrom::Start(phoff))?;
    let mut out = Vec::new();
    let mut ph = [0u8; PHDR_SIZE];
    for _ in 0..phnum {
        image.read_exact(&mut ph)?;
        let field = |at: usize| u64::from_le_bytes(ph[at..at + 8].try_into().unwrap_or_default());
        let kind = u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]);
        let (paddr, filesz, memsz) = (field(24), field(32), field(40));
        if kind == PT_LOAD && memsz > filesz {
            let start = paddr.checked_add(filesz).ok_or_else(|| {
                std::io::Error::other(format!("segment at {paddr:#x} wraps around"))
            })?;
            out.push((start, memsz - filesz));
        }
    }
    Ok(out)
}

/// Writes zeros over every loaded segment's BSS; each must lie in guest RAM.
pub fn zero_elf_bss(mem: &GuestMemory, image: &mut (impl Read + Seek)) -> Result<(), BootError> {
    let ranges = zero_ranges(image).map_err(BootError::ReadProgramHeaders)?;
    const CHUNK: usize = 64 << 10;
    let zeros = [0u8; CHUNK];
    for (start, len) in ranges {
        let fits = usize::try_from(len)
            .ok()
            .is_some_and(|l| mem.check_range(GuestAddress(start), l, Permissions::Write));
        if !fits {
            return Err(BootError::BssOutsideRam { start, len });
        }
        let mut done = 0u64;
        while done < len {
            // Both bounded by `len`, which fits guest RAM (checked above).
            let n = (len - done).min(CHUNK as u64) as usize;
            mem.write_slice(&zeros[..n], GuestAddress(start + done))?;
            done += n as u64;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// An ELF64 image with one PT_LOAD segment: `data` at `paddr`, `memsz` bytes in memory.
    fn elf(paddr: u64, data: &[u8], memsz: u64) -> Vec<u8> {
        let mut e = vec![0u8; 64 + PHDR_SIZE];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2; // 64-bit
        e[5] = 1; // little-endian
        e[6] = 1; // version
        e[0x10..0x12].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        e[0x12..0x14].copy_from_slice(&62u16.to_le_bytes()); // x86-64
        e[0x14..0x18].copy_from_slice(&1u32.to_le_bytes());
        e[0x18..0x20].copy_from_slice(&paddr.to_le_bytes()); // entry
        e[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // phoff
        e[0x34..0x36].copy_from_slice(&64u16.to_le_bytes()); // ehsize
        e[0x36..0x38].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
        e[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes()); // phnum
        let ph = &mut e[64..];
        ph[..4].copy_from_slice(&PT_LOAD.to_le_bytes());
        ph[4..8].copy_from_slice(&7u32.to_le_bytes());
        ph[8..16].copy_from_slice(&((64 + PHDR_SIZE) as u64).to_le_bytes()); // offset
        ph[16..24].copy_from_slice(&paddr.to_le_bytes());
        ph[24..32].copy_from_slice(&paddr.to_le_bytes());
        ph[32..40].copy_from_slice(&(data.len() as u64).to_le_bytes());
        ph[40..48].copy_from_slice(&memsz.to_le_bytes());
        ph[48..56].copy_from_slice(&4096u64.to_le_bytes());
        e.extend_from_slice(data);
        e
    }

    fn ram() -> GuestMemory {
        crate::memory::create(&crate::config::MemoryConfig {
            size: 4 << 20,
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn bss_is_zeroed_over_what_ram_held() {
        let mem = ram();
        mem.write_slice(&[0xa5; 0x4000], GuestAddress(0x20_0000))
            .unwrap();
        // Through the loader, from a file, as `--kernel` loads it.
        let path = std::env::temp_dir().join(format!("tern-bss-{}.elf", std::process::id()));
        std::fs::write(&path, elf(0x20_0000, &[1, 2, 3, 4], 0x3000)).unwrap();
        let loaded = super::super::loader::load_kernel(
            &mem,
            &crate::config::KernelImage::Path(path.clone()),
        );
        let _ = std::fs::remove_file(&path);
        assert_eq!(loaded.unwrap().kernel_end, 0x20_3000);
        let mut got = [0u8; 0x4000];
        mem.read_slice(&mut got, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(got[..4], [1, 2, 3, 4]);
        assert!(got[4..0x3000].iter().all(|&b| b == 0), "BSS zeroed");
        assert!(
            got[0x3000..].iter().all(|&b| b == 0xa5),
            "nothing past p_memsz"
        );
    }

    #[test]
    fn bss_outside_ram_is_refused() {
        let mem = ram();
        for (paddr, memsz) in [
            (0x3f_f000, 0x2000),
            (0x20_0000, u64::MAX),
            (u64::MAX - 1, 8),
        ] {
            let image = elf(paddr, &[1], memsz);
            let err = zero_elf_bss(&mem, &mut Cursor::new(image));
            assert!(err.is_err(), "{paddr:#x}+{memsz:#x}");
        }
    }
}

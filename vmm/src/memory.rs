//! Guest RAM: private anonymous mappings laid out around the MMIO hole (see `layout`).

use thiserror::Error;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MmapRegion,
};

use crate::config::MemoryConfig;
use crate::layout::{MMIO_GAP_END, MMIO_GAP_START};

#[derive(Debug, Error)]
pub enum MemoryError {
    #[error("cannot map {size} bytes of guest RAM at {start:#x}: {source}")]
    Map {
        start: u64,
        size: u64,
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("guest RAM regions are invalid: {0}")]
    Regions(#[from] vm_memory::GuestRegionCollectionError),
    #[error("madvise({what}) on guest RAM failed: {source}")]
    Madvise {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("guest RAM size {0} does not fit this host's address space")]
    TooLarge(u64),
}

/// Guest RAM with a dirty bitmap of the writes tern itself makes (merged with KVM's dirty log when
/// migrating).
pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

/// The guest-physical RAM ranges for `size` bytes: below the MMIO hole, then above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(MMIO_GAP_END), size - MMIO_GAP_START),
        ]
    }
}

const MADV_POPULATE_WRITE: libc::c_int = 23;

/// Maps guest RAM as private anonymous memory (KSM can only merge private anonymous pages).
pub fn create(cfg: &MemoryConfig) -> Result<GuestMemory, MemoryError> {
    let mut regions = Vec::new();
    for (start, size) in ram_ranges(cfg.size) {
        let len = usize::try_from(size).map_err(|_| MemoryError::TooLarge(cfg.size))?;
        let mapping = MmapRegion::<AtomicBitmap>::new(len).map_err(|source| MemoryError::Map {
            start: start.0,
            size,
            source,
        })?;
        let region = GuestRegionMmap::new(mapping, start).ok_or(MemoryError::TooLarge(cfg.size))?;
        regions.push(region);
    }
    let mem = GuestMemoryMmap::from_regions(regions)?;
    for region in mem.iter() {
        let ptr = region.as_ptr();
        let len = region.len() as usize;
        if cfg.mergeable {
            madvise(ptr, len, libc::MADV_MERGEABLE, "MADV_MERGEABLE")?;
        }
        if cfg.prefault {
            madvise(ptr, len, MADV_POPULATE_WRITE, "MADV_POPULATE_WRITE")?;
        }
    }
    Ok(mem)
}

fn madvise(
    ptr: *mut u8,
    len: usize,
    advice: libc::c_int,
    what: &'static str,
) -> Result<(), MemoryError> {
    // SAFETY: ptr/len describe a mapping owned by the guest memory object; these advices change
    // neither the mapping's validity nor its contents.
    let rc = unsafe { libc::madvise(ptr.cast(), len, advice) };
    if rc != 0 {
        return Err(MemoryError::Madvise {
            what,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_skip_the_mmio_hole() {
        assert_eq!(ram_ranges(512 << 20), vec![(GuestAddress(0), 512 << 20)]);
        let r = ram_ranges(8 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].0, GuestAddress(4 << 30));
        assert_eq!(r[0].1 + r[1].1, 8 << 30);
    }
}

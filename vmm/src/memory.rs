//! Guest RAM laid out around the MMIO hole (see `layout`): private anonymous mappings, or with
//! `shared=on` one sealed memfd per region mapped MAP_SHARED (a local migration hands the fds over).

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd};

use thiserror::Error;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MmapRegion,
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
    #[error("cannot create the guest RAM memfd ({what}): {source}")]
    Memfd {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("handed-over guest RAM refused: {0}")]
    Handover(String),
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

/// Seals a handed-over memfd must carry: nobody can shrink it under a mapping (SIGBUS).
const REQUIRED_SEALS: libc::c_int = libc::F_SEAL_SHRINK;

/// Maps guest RAM: private anonymous memory (what KSM can merge), or with `shared=on` one memfd
/// per region.
pub fn create(cfg: &MemoryConfig) -> Result<GuestMemory, MemoryError> {
    let mut regions = Vec::new();
    for (start, size) in ram_ranges(cfg.size) {
        let len = usize::try_from(size).map_err(|_| MemoryError::TooLarge(cfg.size))?;
        let mapping = if cfg.shared {
            MmapRegion::<AtomicBitmap>::from_file(FileOffset::new(memfd(size)?, 0), len)
        } else {
            MmapRegion::<AtomicBitmap>::new(len)
        };
        let mapping = mapping.map_err(|source| MemoryError::Map {
            start: start.0,
            size,
            source,
        })?;
        regions.push(GuestRegionMmap::new(mapping, start).ok_or(MemoryError::TooLarge(cfg.size))?);
    }
    let mem = GuestMemoryMmap::from_regions(regions)?;
    advise(&mem, cfg)?;
    if cfg.prefault {
        for region in mem.iter() {
            madvise(
                region.as_ptr(),
                region.len() as usize,
                MADV_POPULATE_WRITE,
                "MADV_POPULATE_WRITE",
            )?;
        }
    }
    Ok(mem)
}

/// Maps guest RAM a local migration handed over: one memfd per region of `cfg.size`, each a
/// sealed regular file of exactly the region's size (checked: the peer chose these fds).
pub fn from_files(cfg: &MemoryConfig, files: Vec<File>) -> Result<GuestMemory, MemoryError> {
    let ranges = ram_ranges(cfg.size);
    if files.len() != ranges.len() {
        return Err(MemoryError::Handover(format!(
            "{} memory fds for {} RAM regions",
            files.len(),
            ranges.len()
        )));
    }
    let mut regions = Vec::new();
    for (i, ((start, size), file)) in ranges.into_iter().zip(files).enumerate() {
        let meta = file
            .metadata()
            .map_err(|e| MemoryError::Handover(format!("fstat of memory fd {i}: {e}")))?;
        if !meta.is_file() || meta.len() != size {
            return Err(MemoryError::Handover(format!(
                "memory fd {i} is {} bytes{}, RAM region {i} needs a memfd of {size} bytes",
                meta.len(),
                if meta.is_file() {
                    ""
                } else {
                    " and not a file"
                }
            )));
        }
        // SAFETY: F_GET_SEALS only reads the fd's seals.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & REQUIRED_SEALS != REQUIRED_SEALS {
            return Err(MemoryError::Handover(format!(
                "memory fd {i} is not a memfd sealed against shrinking"
            )));
        }
        let len = usize::try_from(size).map_err(|_| MemoryError::TooLarge(cfg.size))?;
        let mapping = MmapRegion::<AtomicBitmap>::from_file(FileOffset::new(file, 0), len)
            .map_err(|source| MemoryError::Map {
                start: start.0,
                size,
                source,
            })?;
        regions.push(GuestRegionMmap::new(mapping, start).ok_or(MemoryError::TooLarge(cfg.size))?);
    }
    let mem = GuestMemoryMmap::from_regions(regions)?;
    advise(&mem, cfg)?;
    Ok(mem)
}

/// The memfds behind shared guest RAM, one per region in order; empty for private RAM.
pub fn shared_fds(mem: &GuestMemory) -> Vec<BorrowedFd<'_>> {
    let fds: Vec<_> = mem
        .iter()
        .filter_map(|r| r.file_offset().map(|f| f.file().as_fd()))
        .collect();
    if fds.len() == mem.num_regions() {
        fds
    } else {
        Vec::new()
    }
}

/// A sealed memfd of `size` bytes: it can grow no more and never shrink under a mapping.
fn memfd(size: u64) -> Result<File, MemoryError> {
    let err = |what| move |source| MemoryError::Memfd { what, source };
    // SAFETY: the name is a NUL-terminated literal; the flags are valid.
    let fd = unsafe {
        libc::memfd_create(
            c"tern-guest-ram".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(err("memfd_create")(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a new descriptor nobody else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(err("ftruncate"))?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS only changes the seals of our own fd.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(err("F_ADD_SEALS")(std::io::Error::last_os_error()));
    }
    Ok(file)
}

/// The advice every guest RAM mapping gets, however it was made.
fn advise(mem: &GuestMemory, cfg: &MemoryConfig) -> Result<(), MemoryError> {
    if cfg.thp && cfg.mergeable {
        log::warn!(
            "--memory thp=on with mergeable=on: KSM must split a huge page before merging any \
page in it, and where that split fails (it does on nested KVM hosts) nothing merges (README, KSM)"
        );
    }
    for region in mem.iter() {
        let ptr = region.as_ptr();
        let len = region.len() as usize;
        if cfg.mergeable {
            madvise(ptr, len, libc::MADV_MERGEABLE, "MADV_MERGEABLE")?;
        }
        // Before any page is populated (prefault, a migration), so it is populated huge.
        if cfg.thp {
            madvise(ptr, len, libc::MADV_HUGEPAGE, "MADV_HUGEPAGE")?;
        }
    }
    Ok(())
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
    use vm_memory::Bytes;

    #[test]
    fn shared_ram_hands_over_its_memfds() {
        let cfg = MemoryConfig {
            size: 8 << 20,
            shared: true,
            ..Default::default()
        };
        let a = create(&cfg).unwrap();
        a.write_slice(b"tern", GuestAddress(0x1000)).unwrap();
        let files: Vec<File> = shared_fds(&a)
            .iter()
            .map(|fd| File::from(fd.try_clone_to_owned().unwrap()))
            .collect();
        assert_eq!(files.len(), 1);
        let b = from_files(&cfg, files).unwrap();
        let mut buf = [0u8; 4];
        b.read_slice(&mut buf, GuestAddress(0x1000)).unwrap();
        assert_eq!(&buf, b"tern", "the same memory, not a copy");
        let private = create(&MemoryConfig::default()).unwrap();
        assert!(shared_fds(&private).is_empty());
    }

    #[test]
    fn handed_over_fds_must_match_the_regions() {
        let cfg = MemoryConfig {
            size: 8 << 20,
            shared: true,
            ..Default::default()
        };
        let small = memfd(4 << 20).unwrap();
        let err = from_files(&cfg, vec![small]).unwrap_err().to_string();
        assert!(err.contains("needs a memfd of"), "{err}");
        assert!(from_files(&cfg, Vec::new()).is_err());
        let unsealed = tempfile();
        unsealed.set_len(8 << 20).unwrap();
        let err = from_files(&cfg, vec![unsealed]).unwrap_err().to_string();
        assert!(err.contains("sealed"), "{err}");
    }

    fn tempfile() -> File {
        let p = std::env::temp_dir().join(format!("tern-memtest-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        let _ = std::fs::remove_file(&p);
        f
    }

    #[test]
    fn ranges_skip_the_mmio_hole() {
        assert_eq!(ram_ranges(512 << 20), vec![(GuestAddress(0), 512 << 20)]);
        let r = ram_ranges(8 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].0, GuestAddress(4 << 30));
        assert_eq!(r[0].1 + r[1].1, 8 << 30);
    }
}

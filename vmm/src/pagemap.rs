//! "Was this guest page ever written?" for the passes and snapshots that skip pages never
//! populated (they are zero). Not `mincore`: it says resident, and a page swapped out (swap,
//! zswap) is not resident, yet holds data.
//!
//! - Private anonymous RAM: `/proc/self/pagemap`, one 64-bit entry per page; bit 63 = present,
//!   bit 62 = swapped (or another swap-type entry: migration, hwpoison). Either means data.
//!   (Bits 0-54 hold the PFN, zeroed without CAP_SYS_ADMIN; tern never needs them.)
//! - Shared memfd RAM (`shared=on`): the file's data extents (`SEEK_DATA`/`SEEK_HOLE`), which
//!   count swapped shmem pages and pages this process has not mapped yet (a local migration's
//!   destination), and not the holes that `MADV_REMOVE` punched.

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;

use migration::{DirtyBitmap, PAGE_SIZE};

const PRESENT: u64 = 1 << 63;
const SWAPPED: u64 = 1 << 62;
/// Entries read per `pread` (512 KiB of them).
const CHUNK: usize = 64 << 10;

/// Whether one pagemap entry says the page holds data (present or swapped).
pub fn entry_has_data(entry: u64) -> bool {
    entry & (PRESENT | SWAPPED) != 0
}

/// This process's page table, opened once (before any seccomp filter) and read with `pread`.
pub struct Pagemap(File);

impl Pagemap {
    pub fn open() -> std::io::Result<Pagemap> {
        File::open("/proc/self/pagemap").map(Pagemap)
    }

    /// Pages `0..pages` from `host` (page aligned) that hold data: one bit each.
    pub fn with_data(&self, host: usize, pages: usize) -> std::io::Result<DirtyBitmap> {
        let mut map = DirtyBitmap::new(pages);
        let mut buf = vec![0u8; CHUNK.min(pages.max(1)) * 8];
        let first = host / PAGE_SIZE;
        let mut done = 0;
        while done < pages {
            let n = (pages - done).min(CHUNK);
            let bytes = &mut buf[..n * 8];
            let offset = first
                .checked_add(done)
                .and_then(|p| p.checked_mul(8))
                .ok_or_else(|| std::io::Error::other("pagemap offset overflows"))?;
            self.0.read_exact_at(bytes, offset as u64)?;
            for (i, e) in bytes.chunks_exact(8).enumerate() {
                let mut raw = [0u8; 8];
                raw.copy_from_slice(e);
                if entry_has_data(u64::from_ne_bytes(raw)) {
                    map.set(done + i);
                }
            }
            done += n;
        }
        Ok(map)
    }
}

/// Pages `first..first + pages` of a memfd (file offsets in pages) that hold data: the file's
/// data extents.
pub fn memfd_with_data(
    fd: BorrowedFd<'_>,
    first: usize,
    pages: usize,
) -> std::io::Result<DirtyBitmap> {
    let mut map = DirtyBitmap::new(pages);
    let overflow = || std::io::Error::other("memfd offset overflows");
    let start = first.checked_mul(PAGE_SIZE).ok_or_else(overflow)?;
    let end = first
        .checked_add(pages)
        .and_then(|e| e.checked_mul(PAGE_SIZE))
        .ok_or_else(overflow)?;
    let mut at = start;
    while at < end {
        let Some(data) = seek(fd, at, libc::SEEK_DATA)? else {
            break;
        };
        if data >= end {
            break;
        }
        let hole = seek(fd, data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        let run = data / PAGE_SIZE;
        map.set_range(run - first, hole.div_ceil(PAGE_SIZE) - run);
        at = hole;
    }
    Ok(map)
}

/// `lseek(fd, at, whence)`; None where no data follows `at` (ENXIO).
fn seek(fd: BorrowedFd<'_>, at: usize, whence: libc::c_int) -> std::io::Result<Option<usize>> {
    let at = libc::off_t::try_from(at).map_err(std::io::Error::other)?;
    // SAFETY: lseek only moves the descriptor's offset; the fd is borrowed and live.
    let rc = unsafe { libc::lseek(fd.as_raw_fd(), at, whence) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    usize::try_from(rc).map(Some).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crafted_entries() {
        // Present with a PFN, present with the PFN hidden, swapped (type + offset), soft-dirty
        // only, exclusively mapped only, nothing.
        let cases = [
            (PRESENT | 0x1234, true),
            (PRESENT, true),
            (SWAPPED | (5 << 5) | 3, true),
            (SWAPPED, true),
            (1 << 55, false),
            (1 << 56, false),
            (0, false),
        ];
        for (entry, data) in cases {
            assert_eq!(entry_has_data(entry), data, "{entry:#x}");
        }
    }

    #[test]
    fn anonymous_pages_written_untouched_and_discarded() {
        const PAGES: usize = 64;
        // SAFETY: a fresh private anonymous mapping owned by this test, unmapped at its end.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGES * PAGE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let p = base.cast::<u8>();
        for page in [0, 7, 63] {
            // SAFETY: inside the mapping above.
            unsafe { p.add(page * PAGE_SIZE).write(1) };
        }
        let pm = Pagemap::open().unwrap();
        let map = pm.with_data(base as usize, PAGES).unwrap();
        assert_eq!(map.count(), 3);
        assert!(map.get(0) && map.get(7) && map.get(63));
        // A discarded page (as the balloon does) holds no data again.
        // SAFETY: page 7 lies inside the mapping.
        let rc =
            unsafe { libc::madvise(p.add(7 * PAGE_SIZE).cast(), PAGE_SIZE, libc::MADV_DONTNEED) };
        assert_eq!(rc, 0);
        let map = pm.with_data(base as usize, PAGES).unwrap();
        assert_eq!((map.count(), map.get(7)), (2, false));
        // SAFETY: the mapping is this test's and no longer used.
        unsafe { libc::munmap(base, PAGES * PAGE_SIZE) };
    }

    #[test]
    fn memfd_extents() {
        use std::os::fd::AsFd;
        // SAFETY: a NUL-terminated literal name; the new fd is owned by `f` below.
        let fd = unsafe { libc::memfd_create(c"pagemap-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd is new and owned by nobody else.
        let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.set_len(32 * PAGE_SIZE as u64).unwrap();
        for page in [1u64, 2, 20] {
            f.write_all_at(&[9], page * PAGE_SIZE as u64).unwrap();
        }
        let all = memfd_with_data(f.as_fd(), 0, 32).unwrap();
        assert_eq!(all.count(), 3);
        assert!(all.get(1) && all.get(2) && all.get(20));
        // A window: pages 2..22 of the file.
        let part = memfd_with_data(f.as_fd(), 2, 20).unwrap();
        assert_eq!(part.count(), 2);
        assert!(part.get(0) && part.get(18));
    }
}

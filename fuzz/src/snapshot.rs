//! Snapshot files: `Snapshot::open` (header, trailer, sections, page index) and checked page
//! reads, on a file built from the input in a memfd.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use migration::snapshot::Snapshot;
use migration::stream::{MAGIC, SNAPSHOT_VERSION};
use migration::PAGE_SIZE;

use crate::bytes::{frame, sections, Bytes};

/// Where the snapshot files of this thread are written (a memfd: no disk, no clean-up).
fn memfd() -> &'static (File, PathBuf) {
    thread_local! {
        static FILE: &'static (File, PathBuf) = Box::leak(Box::new(make_memfd()));
    }
    FILE.with(|f| *f)
}

fn make_memfd() -> (File, PathBuf) {
    // SAFETY: creates a new descriptor from a NUL-terminated name; nothing else owns it.
    let fd = unsafe { libc::memfd_create(c"tern-fuzz-snapshot".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and is owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    (file, path)
}

/// The file layout from `snapshot.rs`: header, stored pages from offset 4096, sections,
/// trailer. Input: flags (bit 0: a version u32 follows, else version 2; bit 1: the trailer's
/// section offset u64 follows, else the right one), a page count (below 17), one fill byte per
/// page, then sections for [`sections`].
pub fn build(data: &[u8]) -> Vec<u8> {
    let mut b = Bytes::new(data);
    let flags = b.u8();
    let version = if flags & 1 != 0 {
        b.u32()
    } else {
        SNAPSHOT_VERSION
    };
    let pages = usize::from(b.u8() % 17);
    let fills = b.take(pages).to_vec();
    let sections_at = (flags & 2 != 0).then(|| b.u64());
    let mut file = Vec::with_capacity(PAGE_SIZE * (pages + 2));
    file.extend_from_slice(MAGIC);
    file.extend_from_slice(&version.to_le_bytes());
    file.resize(PAGE_SIZE, 0);
    for p in 0..pages {
        file.extend(std::iter::repeat_n(
            fills.get(p).copied().unwrap_or(0),
            PAGE_SIZE,
        ));
    }
    let at = file.len() as u64;
    for (kind, payload) in sections(b.rest()) {
        frame(&mut file, kind, &payload);
    }
    file.extend_from_slice(b"TERNSNAP");
    file.extend_from_slice(&sections_at.unwrap_or(at).to_le_bytes());
    file
}

pub fn run(data: &[u8]) {
    let _ = open(data);
}

/// Opens the snapshot built from `data` and reads every stored page: how many read back
/// checked, for the tests of the seeds.
pub fn open(data: &[u8]) -> Result<usize, String> {
    let bytes = build(data);
    let (file, path) = memfd();
    file.set_len(0).expect("truncating the memfd");
    file.write_all_at(&bytes, 0).expect("writing the memfd");
    let snap = Snapshot::open(path).map_err(|e| e.to_string())?;
    let mut page = vec![0u8; PAGE_SIZE];
    let stored: Vec<u64> = snap.stored().collect();
    assert_eq!(stored.len(), snap.stored_pages());
    let mut good = 0;
    for gpa in stored {
        // A page that fails its checksum is an error, never garbage: both are fine here.
        if matches!(snap.read_page(gpa, &mut page), Ok(true)) {
            good += 1;
        }
    }
    // Not stored: zeros.
    if snap.read_page(u64::MAX, &mut page).is_ok() {
        assert!(page.iter().all(|&b| b == 0));
    }
    Ok(good)
}

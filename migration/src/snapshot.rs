//! Snapshot files (`file:` endpoints): the guest paused once and written whole, in a layout that
//! lets a restore read any page at its offset without replaying anything (what a lazy restore
//! needs; QEMU's mapped-ram and Firecracker's memory file serve the same purpose).
//!
//! ```text
//! 0           header: "TERNMIG\0" | version 2 | flags 0
//! 4096        the pages that hold data, 4 KiB each, in guest-physical order (zero pages are not
//!             stored: a restore maps them as zeros)
//! after them  stream sections (kind | length | payload | crc32, as in stream.rs): configuration,
//!             vCPU, clock, irqchip, PIT, device state, the page index (gpa, crc32 of each stored
//!             page, in file order; in chunks), end
//! last 16     trailer: "TERNSNAP" | offset of the first section (u64 LE)
//! ```
//!
//! Sections carry their own checksums; every page is checked against the index when it is read.
//! The file is written under a temporary name and renamed when complete.

use std::fs::File;
use std::io::{BufReader, BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::error::MigrationError;
use crate::outgoing::{is_zero, send_state};
use crate::progress::{MigrationState, StatusCell};
use crate::state::{ClockState, DeviceStates, EndRecord, IoapicState, PicState, PitState};
use crate::stream::{Section, StreamError, StreamReader, StreamWriter, SNAPSHOT_VERSION};
use crate::{MigratableVm, VmConfigRecord, VmState, PAGE_SIZE};

const RAM_OFFSET: u64 = 4096;
const TRAILER_MAGIC: &[u8; 8] = b"TERNSNAP";
const TRAILER: u64 = 16;
/// One page-index entry: the page's guest address (u64) and its crc32.
const INDEX_ENTRY: usize = 12;
/// Index entries per page-index section (well under the section limit).
const INDEX_CHUNK: usize = 256 * 1024;

/// "stream truncated in {where}".
fn broken(place: impl Into<String>) -> MigrationError {
    MigrationError::Stream(StreamError::Truncated(place.into()))
}

/// Writes the paused guest to `path`; the guest stays paused (the caller ends the source).
pub fn write(
    vm: &dyn MigratableVm,
    path: &Path,
    status: &StatusCell,
) -> Result<(), MigrationError> {
    let start = Instant::now();
    let tmp = PathBuf::from(format!("{}.partial", path.display()));
    let file = File::create(&tmp).map_err(|source| MigrationError::Connect {
        endpoint: format!("file:{}", path.display()),
        source,
    })?;
    let result = (|| {
        let mut w = StreamWriter::new(BufWriter::with_capacity(1 << 20, file));
        w.header_version(SNAPSHOT_VERSION)?;
        w.get_mut()
            .seek(SeekFrom::Start(RAM_OFFSET))
            .map_err(StreamError::Write)?;
        let state = vm.save_state()?;
        let mut index: Vec<u8> = Vec::new();
        let (mut stored, mut zero) = (0u64, 0u64);
        let mut page = vec![0u8; PAGE_SIZE];
        for r in vm.ram_regions() {
            let populated = vm.populated_pages(&r)?;
            zero += (r.pages() - populated.count()) as u64;
            for p in populated.iter() {
                let gpa = r.gpa + (p * PAGE_SIZE) as u64;
                vm.read_ram(gpa, &mut page)?;
                if is_zero(&page) {
                    zero += 1;
                    continue;
                }
                w.get_mut().write_all(&page).map_err(StreamError::Write)?;
                index.extend_from_slice(&gpa.to_le_bytes());
                index.extend_from_slice(&crc32fast::hash(&page).to_le_bytes());
                stored += 1;
            }
            status.update(|s| {
                s.pages_full = stored;
                s.pages_zero = zero;
            });
        }
        let sections_at = RAM_OFFSET + stored * PAGE_SIZE as u64;
        w.record(Section::Config, &vm.config())?;
        send_state(&mut w, &state)?;
        for chunk in index.chunks(INDEX_CHUNK * INDEX_ENTRY) {
            w.section(Section::PageIndex, chunk)?;
        }
        w.record(Section::End, &EndRecord::default())?;
        let mut trailer = TRAILER_MAGIC.to_vec();
        trailer.extend_from_slice(&sections_at.to_le_bytes());
        w.get_mut()
            .write_all(&trailer)
            .map_err(StreamError::Write)?;
        w.flush()?;
        let f = w.get_mut().get_ref();
        f.sync_all().map_err(StreamError::Write)?;
        let bytes = f.metadata().map_err(StreamError::Write)?.len();
        let secs = start.elapsed().as_secs_f64();
        status.update(|s| {
            s.state = MigrationState::Completed;
            s.bytes = bytes;
            s.total_ms = secs * 1e3;
            s.throughput_mbps = bytes as f64 / secs.max(1e-9) / 1e6;
            s.remaining_bytes = 0;
        });
        Ok(())
    })();
    match result {
        Ok(()) => std::fs::rename(&tmp, path).map_err(|e| {
            MigrationError::Stream(StreamError::Write(std::io::Error::new(
                e.kind(),
                format!("renaming the finished snapshot into place: {e}"),
            )))
        }),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// A snapshot opened for restore: configuration and device state read and checked; pages are
/// read (and checked) on demand.
pub struct Snapshot {
    file: File,
    pub config: VmConfigRecord,
    /// Taken by the restore (once).
    pub state: Option<VmState>,
    /// (gpa, crc32) of each stored page; page k sits at RAM_OFFSET + k * 4096.
    index: Vec<(u64, u32)>,
}

#[derive(Debug, thiserror::Error)]
pub enum PageError {
    #[error("reading snapshot page {gpa:#x}: {source}")]
    Read { gpa: u64, source: std::io::Error },
    #[error("checksum mismatch in snapshot page {gpa:#x}: the snapshot is corrupted")]
    Checksum { gpa: u64 },
}

impl Snapshot {
    pub fn open(path: &Path) -> Result<Snapshot, MigrationError> {
        let file = File::open(path).map_err(|source| MigrationError::Connect {
            endpoint: format!("file:{}", path.display()),
            source,
        })?;
        let len = file
            .metadata()
            .map_err(|e| broken(format!("the snapshot ({e})")))?
            .len();
        let mut head = StreamReader::new(BufReader::new(&file));
        match head.header_version()? {
            SNAPSHOT_VERSION => {}
            1 => {
                return Err(MigrationError::Rejected(
                    "this snapshot was written by an older tern (stream version 1, replayed \
                     page by page); this tern reads snapshots of version 2 only: take it again"
                        .into(),
                ))
            }
            v => return Err(StreamError::Version(v).into()),
        }
        if len < RAM_OFFSET + TRAILER {
            return Err(broken("the snapshot (shorter than its header and trailer)"));
        }
        let mut trailer = [0u8; TRAILER as usize];
        file.read_exact_at(&mut trailer, len - TRAILER)
            .map_err(|e| broken(format!("the snapshot's trailer ({e})")))?;
        if &trailer[..8] != TRAILER_MAGIC {
            return Err(broken(
                "the snapshot: its trailer is missing (cut short, or not written to the end)",
            ));
        }
        let sections_at = u64::from_le_bytes(trailer[8..16].try_into().unwrap_or([0; 8]));
        let stored_bytes = sections_at
            .checked_sub(RAM_OFFSET)
            .filter(|b| b % PAGE_SIZE as u64 == 0 && sections_at <= len - TRAILER)
            .ok_or_else(|| broken("the snapshot: its trailer points outside the file"))?;
        let stored = stored_bytes / PAGE_SIZE as u64;
        // The index (INDEX_ENTRY bytes a stored page) lies between the sections' start and the
        // trailer: a trailer claiming more pages than that space can index is refused before
        // anything is sized from it (a sparse file can claim terabytes of pages).
        let index_room = len - TRAILER - sections_at;
        if stored
            .checked_mul(INDEX_ENTRY as u64)
            .is_none_or(|b| b > index_room)
        {
            return Err(broken(format!(
                "the snapshot: its trailer claims {stored} stored pages, but only {index_room} \
                 bytes follow them for sections (their index alone needs {INDEX_ENTRY} bytes a \
                 page)"
            )));
        }
        let mut f = &file;
        f.seek(SeekFrom::Start(sections_at))
            .map_err(|e| broken(format!("the snapshot's sections ({e})")))?;
        let mut r = StreamReader::new(BufReader::new(f));
        let config: VmConfigRecord = r.read_section()?.expect(Section::Config)?.decode()?;
        let vcpus = r.read_section()?.expect(Section::Vcpus)?.decode()?;
        let clock: ClockState = r.read_section()?.expect(Section::Clock)?.decode()?;
        let (pic_master, pic_slave, ioapic): (PicState, PicState, IoapicState) =
            r.read_section()?.expect(Section::Irqchip)?.decode()?;
        let pit: PitState = r.read_section()?.expect(Section::Pit)?.decode()?;
        let devices: DeviceStates = r.read_section()?.expect(Section::Devices)?.decode()?;
        let ram_pages = config
            .ram
            .iter()
            .try_fold(0u64, |n, &(_, size)| n.checked_add(size / PAGE_SIZE as u64));
        if ram_pages.is_none_or(|n| stored > n) {
            return Err(broken(format!(
                "the snapshot: its trailer claims {stored} stored pages, more than its guest RAM \
                 holds"
            )));
        }
        // Bounded by the file and by guest RAM (above), so this fits a usize and memory.
        let stored = usize::try_from(stored)
            .map_err(|_| broken("the snapshot: more stored pages than this host can index"))?;
        let mut index = Vec::with_capacity(stored.min(INDEX_CHUNK));
        loop {
            let f = r.read_section()?;
            match f.kind {
                Section::PageIndex if f.payload.len() % INDEX_ENTRY == 0 => {
                    for e in f.payload.chunks_exact(INDEX_ENTRY) {
                        let gpa = u64::from_le_bytes(e[..8].try_into().unwrap_or([0; 8]));
                        let crc = u32::from_le_bytes(e[8..].try_into().unwrap_or([0; 4]));
                        index.push((gpa, crc));
                    }
                }
                Section::End => break,
                other => {
                    return Err(StreamError::Unexpected {
                        got: other.name(),
                        expected: "page index or end",
                    }
                    .into())
                }
            }
        }
        if index.len() != stored {
            return Err(broken(format!(
                "the snapshot's page index: {} pages stored but {} indexed",
                stored,
                index.len()
            )));
        }
        // In order, page-aligned and inside the configured RAM: binary search relies on it.
        let in_ram = |gpa: u64| {
            config
                .ram
                .iter()
                .any(|&(base, size)| gpa >= base && gpa - base < size)
        };
        let ordered = index.windows(2).all(|w| w[0].0 < w[1].0);
        if !ordered
            || index
                .iter()
                .any(|(g, _)| g % PAGE_SIZE as u64 != 0 || !in_ram(*g))
        {
            return Err(MigrationError::Stream(StreamError::Decode {
                section: Section::PageIndex.name(),
                msg: "pages out of order, unaligned or outside guest RAM".into(),
            }));
        }
        Ok(Snapshot {
            file,
            config,
            state: Some(VmState {
                vcpus,
                clock,
                pic_master,
                pic_slave,
                ioapic,
                pit,
                devices,
            }),
            index,
        })
    }

    /// How many pages hold data (the rest of RAM is zero).
    pub fn stored_pages(&self) -> usize {
        self.index.len()
    }

    /// The guest addresses of the stored pages, in order.
    pub fn stored(&self) -> impl Iterator<Item = u64> + '_ {
        self.index.iter().map(|(g, _)| *g)
    }

    /// Fills `page` with guest page `gpa`, checked; false (and zeros) for a page not stored.
    pub fn read_page(&self, gpa: u64, page: &mut [u8]) -> Result<bool, PageError> {
        let Ok(k) = self.index.binary_search_by_key(&gpa, |(g, _)| *g) else {
            page.fill(0);
            return Ok(false);
        };
        let at = RAM_OFFSET + (k * PAGE_SIZE) as u64;
        self.file
            .read_exact_at(page, at)
            .map_err(|source| PageError::Read { gpa, source })?;
        if crc32fast::hash(page) != self.index[k].1 {
            return Err(PageError::Checksum { gpa });
        }
        Ok(true)
    }
}

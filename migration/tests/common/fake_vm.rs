//! A `MigratableVm` without KVM: RAM in anonymous mappings (so postcopy's userfaultfd works on
//! it), dirty pages from a script, counters for what the migration asked of it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use migration::destination::DestinationVm;
use migration::postcopy::Listener;
use migration::progress::StatusCell;
use migration::state::{ClockState, Regs, VcpuState};
use migration::{
    DirtyBitmap, MigratableVm, RamRegion, VmConfigRecord, VmResult, VmSideError, VmState, PAGE_SIZE,
};

/// The guest RAM layout the tests use: two regions with a hole between them (like RAM below and
/// above the PCI hole), so page runs and region lookups are exercised across a gap.
pub const LAYOUT: [(u64, u64); 2] = [
    (0, 256 * PAGE_SIZE as u64),
    (1 << 32, 64 * PAGE_SIZE as u64),
];

/// One region's bytes: a private anonymous mapping, unmapped on drop.
struct Mem {
    base: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; every access copies through raw
// pointers (no references into it), and concurrent copies to the same bytes only race on values,
// which the tests never rely on (the migration itself never reads and writes a page at once).
unsafe impl Send for Mem {}
// SAFETY: as above.
unsafe impl Sync for Mem {}

impl Mem {
    fn new(len: usize) -> Mem {
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap of {len} bytes failed");
        Mem {
            base: p.cast(),
            len,
        }
    }

    fn read(&self, off: usize, buf: &mut [u8]) {
        assert!(off + buf.len() <= self.len);
        // SAFETY: in bounds (checked above) of a live mapping; `buf` is distinct memory. On a
        // postcopy destination a missing page blocks here until it is placed, like a vCPU.
        unsafe { std::ptr::copy_nonoverlapping(self.base.add(off), buf.as_mut_ptr(), buf.len()) }
    }

    fn write(&self, off: usize, data: &[u8]) {
        assert!(off + data.len() <= self.len);
        // SAFETY: in bounds (checked above) of a live mapping; `data` is distinct memory.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.base.add(off), data.len()) }
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `new`; nothing uses it after drop.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// Pages (global index over all regions) a "guest" dirties before one `fetch_dirty` call.
pub type DirtySet = Vec<usize>;

#[derive(Default)]
struct Script {
    next: VecDeque<DirtySet>,
    /// Used once `next` runs out; `None`: a quiet guest.
    then_forever: Option<DirtySet>,
}

/// What the migration asked of the fake VM.
#[derive(Default)]
pub struct Counters {
    pub pauses: AtomicU64,
    pub resumes: AtomicU64,
    pub fetches: AtomicU64,
    pub reads: AtomicU64,
    pub writes: AtomicU64,
}

fn n(c: &AtomicU64) -> u64 {
    c.load(Ordering::SeqCst)
}

pub struct FakeVm {
    regions: Vec<(RamRegion, Mem)>,
    script: Mutex<Script>,
    populated: Mutex<Vec<DirtyBitmap>>,
    dirty_log: AtomicBool,
    version: AtomicU64,
    pub counters: Counters,
    state: VmState,
    restored: Mutex<Option<VmState>>,
    /// The destination cannot load the state: `restore_state` fails with this.
    pub refuse_restore: Option<String>,
    /// As a [`DestinationVm`]: its status, and a broken postcopy's parked listener.
    status: StatusCell,
    parked: Mutex<Option<Listener>>,
}

/// A recognisable vCPU and clock state, so the tests can check it arrived whole.
pub fn marker_state() -> VmState {
    VmState {
        vcpus: vec![VcpuState {
            id: 0,
            regs: Regs {
                rip: 0xfff0,
                rflags: 2,
                ..Default::default()
            },
            lapic: vec![7; 1024],
            msrs: vec![(0x4b56_4d02, 0x1234)],
            ..Default::default()
        }],
        clock: ClockState {
            clock_ns: 123_456_789,
            flags: 2,
        },
        ..Default::default()
    }
}

/// A page's contents for one write: never all zero, different per page and per write.
pub fn pattern(gpa: u64, version: u64) -> Vec<u8> {
    let mut page = vec![0u8; PAGE_SIZE];
    for (i, w) in page.chunks_exact_mut(8).enumerate() {
        let v = ((gpa ^ (version << 44)).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64) | 1;
        w.copy_from_slice(&v.to_le_bytes());
    }
    page
}

impl FakeVm {
    pub fn new(layout: &[(u64, u64)]) -> FakeVm {
        let regions = layout
            .iter()
            .map(|&(gpa, len)| (RamRegion { gpa, len }, Mem::new(len as usize)))
            .collect::<Vec<_>>();
        let populated = regions
            .iter()
            .map(|(r, _)| DirtyBitmap::new(r.pages()))
            .collect();
        FakeVm {
            regions,
            script: Mutex::default(),
            populated: Mutex::new(populated),
            dirty_log: AtomicBool::new(false),
            version: AtomicU64::new(0),
            counters: Counters::default(),
            state: marker_state(),
            restored: Mutex::new(None),
            refuse_restore: None,
            status: StatusCell::default(),
            parked: Mutex::new(None),
        }
    }

    /// The destination's VM: the layout the stream's configuration names, all zero.
    pub fn from_record(record: &VmConfigRecord) -> FakeVm {
        FakeVm::new(&record.ram)
    }

    pub fn total_pages(&self) -> usize {
        self.regions.iter().map(|(r, _)| r.pages()).sum()
    }

    /// (region index, page in region) of a global page index.
    fn locate(&self, mut page: usize) -> (usize, usize) {
        for (i, (r, _)) in self.regions.iter().enumerate() {
            if page < r.pages() {
                return (i, page);
            }
            page -= r.pages();
        }
        panic!("page {page} past the end of RAM");
    }

    pub fn gpa_of(&self, page: usize) -> u64 {
        let (ri, p) = self.locate(page);
        self.regions[ri].0.gpa + (p * PAGE_SIZE) as u64
    }

    /// The guest writes `page` (a new pattern, or zeros): it is populated and dirty from now on.
    pub fn guest_write(&self, page: usize, zero: bool) {
        let (ri, p) = self.locate(page);
        let gpa = self.gpa_of(page);
        let data = if zero {
            vec![0u8; PAGE_SIZE]
        } else {
            pattern(gpa, self.version.fetch_add(1, Ordering::SeqCst))
        };
        self.regions[ri].1.write(p * PAGE_SIZE, &data);
        self.populated.lock().unwrap()[ri].set(p);
    }

    /// Dirty sets for the next `fetch_dirty` calls, in order, then `forever` on every later call.
    pub fn script(&self, sets: Vec<DirtySet>, forever: Option<DirtySet>) {
        let mut s = self.script.lock().unwrap();
        s.next = sets.into();
        s.then_forever = forever;
    }

    /// Bitmaps (one per region) with the given global pages set.
    pub fn bitmaps(&self, pages: &[usize]) -> Vec<DirtyBitmap> {
        let mut maps: Vec<DirtyBitmap> = self
            .regions
            .iter()
            .map(|(r, _)| DirtyBitmap::new(r.pages()))
            .collect();
        for &page in pages {
            let (ri, p) = self.locate(page);
            maps[ri].set(p);
        }
        maps
    }

    /// Every byte of guest RAM, region after region (blocks on pages postcopy has not placed).
    pub fn ram(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (r, m) in &self.regions {
            let mut buf = vec![0u8; r.len as usize];
            m.read(0, &mut buf);
            out.extend_from_slice(&buf);
        }
        out
    }

    pub fn paused(&self) -> bool {
        n(&self.counters.pauses) > n(&self.counters.resumes)
    }

    pub fn dirty_logging(&self) -> bool {
        self.dirty_log.load(Ordering::SeqCst)
    }

    pub fn restored(&self) -> Option<VmState> {
        self.restored.lock().unwrap().clone()
    }

    /// Whether a broken postcopy left its listener here.
    pub fn parked(&self) -> bool {
        self.parked.lock().unwrap().is_some()
    }

    pub fn count(&self, c: impl Fn(&Counters) -> &AtomicU64) -> u64 {
        n(c(&self.counters))
    }

    fn find(&self, gpa: u64, len: usize) -> VmResult<(&Mem, usize)> {
        self.regions
            .iter()
            .find(|(r, _)| gpa >= r.gpa && gpa + len as u64 <= r.gpa + r.len)
            .map(|(r, m)| (m, (gpa - r.gpa) as usize))
            .ok_or_else(|| VmSideError(format!("{gpa:#x}+{len} is not guest RAM")))
    }
}

impl MigratableVm for FakeVm {
    fn config(&self) -> VmConfigRecord {
        VmConfigRecord {
            ram: self.regions.iter().map(|(r, _)| (r.gpa, r.len)).collect(),
            memory_size: self.regions.iter().map(|(r, _)| r.len).sum(),
            mergeable: false,
            vcpus: 1,
            pv_features: 0,
            cpuid: Vec::new(),
            balloon: None,
            shared: false,
            thp: false,
            serial2: false,
            testdev: false,
        }
    }

    fn ram_regions(&self) -> Vec<RamRegion> {
        self.regions.iter().map(|(r, _)| *r).collect()
    }

    fn read_ram(&self, gpa: u64, buf: &mut [u8]) -> VmResult<()> {
        let (m, off) = self.find(gpa, buf.len())?;
        self.counters.reads.fetch_add(1, Ordering::SeqCst);
        m.read(off, buf);
        Ok(())
    }

    fn write_ram(&self, gpa: u64, data: &[u8]) -> VmResult<()> {
        let (m, off) = self.find(gpa, data.len())?;
        self.counters.writes.fetch_add(1, Ordering::SeqCst);
        m.write(off, data);
        Ok(())
    }

    fn populated_pages(&self, region: &RamRegion) -> VmResult<DirtyBitmap> {
        let i = self
            .regions
            .iter()
            .position(|(r, _)| r == region)
            .ok_or_else(|| VmSideError(format!("no region {region:?}")))?;
        Ok(self.populated.lock().unwrap()[i].clone())
    }

    fn start_dirty_log(&self) -> VmResult<()> {
        self.dirty_log.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn stop_dirty_log(&self) -> VmResult<()> {
        self.dirty_log.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// The guest writes the next scripted set (none while paused), which is then reported dirty.
    fn fetch_dirty(&self) -> VmResult<Vec<DirtyBitmap>> {
        self.counters.fetches.fetch_add(1, Ordering::SeqCst);
        let set = if self.paused() {
            Vec::new()
        } else {
            let mut s = self.script.lock().unwrap();
            s.next
                .pop_front()
                .or_else(|| s.then_forever.clone())
                .unwrap_or_default()
        };
        for &page in &set {
            self.guest_write(page, false);
        }
        Ok(self.bitmaps(&set))
    }

    fn pause(&self) -> VmResult<()> {
        self.counters.pauses.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn resume(&self) -> VmResult<()> {
        self.counters.resumes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn save_state(&self) -> VmResult<VmState> {
        Ok(self.state.clone())
    }

    fn host_address(&self, gpa: u64) -> Option<u64> {
        let (m, off) = self.find(gpa, 1).ok()?;
        Some(m.base as u64 + off as u64)
    }

    fn restore_state(&self, state: VmState) -> VmResult<()> {
        if let Some(why) = &self.refuse_restore {
            return Err(VmSideError(why.clone()));
        }
        *self.restored.lock().unwrap() = Some(state);
        Ok(())
    }
}

impl DestinationVm for FakeVm {
    fn status(&self) -> StatusCell {
        self.status.clone()
    }

    /// No vCPU threads: every fault is one of the test's own reads.
    fn vcpu_thread_ids(&self) -> Vec<u32> {
        Vec::new()
    }

    fn park_postcopy(&self, listener: Listener) {
        *self.parked.lock().unwrap() = Some(listener);
    }

    fn take_parked(&self) -> Option<Listener> {
        self.parked.lock().unwrap().take()
    }
}

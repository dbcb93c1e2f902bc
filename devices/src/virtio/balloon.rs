//! virtio-balloon (device ID 5): the host sets a target size in pages, the driver gives pages
//! back on the inflate queue (tern discards them) and takes them again on the deflate queue.
//!
//! Discards can be inhibited (postcopy: a discarded page would look missing there and be fetched
//! again). While inhibited, inflated pages are recorded instead; a deflate of a recorded page
//! cancels it (the guest owns that page again), and `release` discards what is left.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;

use super::mmio::{MmioTransportState, VirtioMmio};
use super::{GuestMem, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::state::{RestoreError, Stateful};

pub const DEVICE_ID: u32 = 5;
/// The host may take balloon pages back when the guest runs out of memory.
pub const F_DEFLATE_ON_OOM: u64 = 1 << 2;
const QUEUE_SIZE: u16 = 256;
const INFLATE: usize = 0;
const DEFLATE: usize = 1;
/// Most PFNs one buffer may carry: Linux sends at most 256 (VIRTIO_BALLOON_ARRAY_PFNS_MAX).
const MAX_PFNS: usize = 256;
const MAX_PFN_BYTES: usize = MAX_PFNS * 4;
/// Balloon PFNs are always 4 KiB frames, whatever the guest's page size.
const PFN_SHIFT: u32 = 12;
const PAGE: u64 = 1 << PFN_SHIFT;

/// Why guest RAM could not be given back.
#[derive(Debug, thiserror::Error)]
pub enum DiscardError {
    #[error("{gpa:#x}+{len:#x} is not whole pages of one RAM region")]
    NotRam { gpa: u64, len: u64 },
    /// The host refused to drop the pages (madvise).
    #[error("{0}")]
    Host(std::io::Error),
}

/// Gives guest RAM back to the host.
pub trait DiscardRam: Send {
    /// Drops [gpa, gpa + len) (whole 4 KiB pages, all RAM); the next guest read sees zeros.
    fn discard(&self, gpa: u64, len: u64) -> Result<(), DiscardError>;
    /// Whether [gpa, gpa + len) is guest RAM.
    fn is_ram(&self, gpa: u64, len: u64) -> bool;
}

/// The balloon's own state, as it crosses in a migration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonState {
    /// Target size the host asked for (config `num_pages`).
    pub target_pages: u32,
    /// Size the driver reports (config `actual`).
    pub actual_pages: u32,
    /// Inflated while discards were inhibited, not deflated since: discard on release.
    pub deferred: Vec<u64>,
    pub stats: BalloonStats,
}

/// The balloon behind its MMIO transport, as it crosses in a migration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonDeviceState {
    pub transport: MmioTransportState,
    pub balloon: BalloonState,
}

impl Stateful for VirtioMmio<Balloon> {
    type State = BalloonDeviceState;

    fn save(&self) -> BalloonDeviceState {
        BalloonDeviceState {
            transport: self.save_transport(),
            balloon: self.device().save(),
        }
    }

    fn restore(&mut self, s: &BalloonDeviceState) -> Result<(), RestoreError> {
        self.restore_transport(&s.transport)?;
        self.device_mut().restore(&s.balloon);
        Ok(())
    }
}

/// Counters since the device was created (they travel with the VM).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStats {
    pub inflated_pages: u64,
    pub deflated_pages: u64,
    /// Pages given back to the host right away.
    pub discarded_pages: u64,
    /// Pages whose discard was deferred, then applied at a release.
    pub applied_after_inhibit: u64,
    /// Deferred pages the guest took back before the release.
    pub cancelled_by_deflate: u64,
    /// PFNs outside guest RAM (ignored).
    pub invalid_pfns: u64,
    pub discard_errors: u64,
    /// Buffers of more than 256 PFNs (refused whole).
    #[serde(default)]
    pub oversized_buffers: u64,
}

pub struct Balloon {
    features: u64,
    target_pages: u32,
    actual_pages: u32,
    inhibited: bool,
    deferred: BTreeSet<u64>,
    stats: BalloonStats,
    ram: Box<dyn DiscardRam>,
}

impl Balloon {
    pub fn new(target_pages: u32, deflate_on_oom: bool, ram: Box<dyn DiscardRam>) -> Self {
        let mut features = VIRTIO_F_VERSION_1;
        if deflate_on_oom {
            features |= F_DEFLATE_ON_OOM;
        }
        Balloon {
            features,
            target_pages,
            actual_pages: 0,
            inhibited: false,
            deferred: BTreeSet::new(),
            stats: BalloonStats::default(),
            ram,
        }
    }

    /// Sets the target (the transport must then signal a config change).
    pub fn set_target(&mut self, pages: u32) {
        self.target_pages = pages;
    }

    pub fn target_pages(&self) -> u32 {
        self.target_pages
    }

    pub fn actual_pages(&self) -> u32 {
        self.actual_pages
    }

    pub fn deflate_on_oom(&self) -> bool {
        self.features & F_DEFLATE_ON_OOM != 0
    }

    pub fn stats(&self) -> &BalloonStats {
        &self.stats
    }

    pub fn inhibited(&self) -> bool {
        self.inhibited
    }

    pub fn deferred_pages(&self) -> usize {
        self.deferred.len()
    }

    /// From now on inflated pages are recorded, not discarded.
    pub fn inhibit(&mut self) {
        self.inhibited = true;
    }

    /// Discards again, and discards every page still recorded; returns how many.
    pub fn release(&mut self) -> u64 {
        self.inhibited = false;
        let pages: Vec<u64> = std::mem::take(&mut self.deferred).into_iter().collect();
        let n = self.discard_runs(&pages);
        self.stats.applied_after_inhibit += n;
        n
    }

    pub fn save(&self) -> BalloonState {
        BalloonState {
            target_pages: self.target_pages,
            actual_pages: self.actual_pages,
            deferred: self.deferred.iter().copied().collect(),
            stats: self.stats.clone(),
        }
    }

    pub fn restore(&mut self, s: &BalloonState) {
        self.target_pages = s.target_pages;
        self.actual_pages = s.actual_pages;
        self.deferred = s.deferred.iter().copied().collect();
        self.stats = s.stats.clone();
    }

    /// Discards sorted PFNs in contiguous runs; returns how many pages were discarded.
    fn discard_runs(&mut self, pfns: &[u64]) -> u64 {
        let mut done = 0;
        let mut i = 0;
        while i < pfns.len() {
            let mut j = i + 1;
            while j < pfns.len() && pfns[j] == pfns[j - 1] + 1 {
                j += 1;
            }
            let (gpa, len) = (pfns[i] << PFN_SHIFT, (j - i) as u64 * PAGE);
            match self.ram.discard(gpa, len) {
                Ok(()) => done += (j - i) as u64,
                Err(e) => {
                    self.stats.discard_errors += 1;
                    log::warn!("balloon: discarding {gpa:#x}+{len:#x}: {e}");
                }
            }
            i = j;
        }
        done
    }

    fn inflate(&mut self, mut pfns: Vec<u64>) {
        self.stats.inflated_pages += pfns.len() as u64;
        if self.inhibited {
            self.deferred.extend(pfns);
            return;
        }
        pfns.sort_unstable();
        pfns.dedup();
        let n = self.discard_runs(&pfns);
        self.stats.discarded_pages += n;
    }

    fn deflate(&mut self, pfns: Vec<u64>) {
        self.stats.deflated_pages += pfns.len() as u64;
        for p in pfns {
            if self.deferred.remove(&p) {
                self.stats.cancelled_by_deflate += 1;
            }
        }
    }

    /// The PFNs in one chain's readable buffers (little-endian u32 each), RAM ones only. A chain
    /// larger than Linux ever sends is refused whole, from its descriptors' lengths, before
    /// anything is read; what is read goes through one fixed-size buffer.
    fn chain_pfns(
        &mut self,
        chain: virtio_queue::DescriptorChain<&GuestMem>,
        mem: &GuestMem,
    ) -> Vec<u64> {
        let mut bufs = Vec::new();
        let (mut bytes, mut descriptors) = (0u64, 0usize);
        // Every descriptor counts (an indirect table may hold 65535, writable ones included).
        for desc in chain {
            descriptors += 1;
            if !desc.is_write_only() {
                bytes = bytes.saturating_add(u64::from(desc.len()));
                bufs.push((desc.addr(), desc.len() as usize));
            }
            if bytes > MAX_PFN_BYTES as u64 || descriptors > MAX_PFNS {
                self.stats.oversized_buffers += 1;
                log::warn!("balloon: a buffer of more than {MAX_PFNS} PFNs refused");
                return Vec::new();
            }
        }
        let mut pfns = Vec::with_capacity(bytes as usize / 4);
        let mut raw = [0u8; MAX_PFN_BYTES];
        for (addr, len) in bufs {
            // `bytes` bounds every length by the buffer's size.
            let raw = &mut raw[..len - len % 4];
            if let Err(e) = mem.read_slice(raw, addr) {
                log::warn!("balloon: unreadable PFN buffer at {:#x}: {e}", addr.0);
                continue;
            }
            for b in raw.chunks_exact(4) {
                let pfn = u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                if self.ram.is_ram(pfn << PFN_SHIFT, PAGE) {
                    pfns.push(pfn);
                } else {
                    self.stats.invalid_pfns += 1;
                }
            }
        }
        pfns
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 8];
        config[..4].copy_from_slice(&self.target_pages.to_le_bytes());
        config[4..].copy_from_slice(&self.actual_pages.to_le_bytes());
        data.fill(0);
        let start = (offset as usize).min(config.len());
        let end = (start + data.len()).min(config.len());
        data[..end - start].copy_from_slice(&config[start..end]);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (bytes 4..8) is the driver's to write.
        if offset == 4 && data.len() == 4 {
            self.actual_pages = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        } else {
            log::debug!(
                "balloon: ignored {}-byte config write at {offset}",
                data.len()
            );
        }
    }

    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMem) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let pfns = self.chain_pfns(chain, mem);
            match index {
                INFLATE => self.inflate(pfns),
                DEFLATE => self.deflate(pfns),
                _ => {}
            }
            if let Err(e) = queue.add_used(mem, head, 0) {
                log::warn!("balloon: add_used: {e}");
                break;
            }
            used = true;
        }
        used
    }

    fn reset(&mut self) {
        // A reset driver owns all of its memory again: nothing recorded may be discarded later.
        self.actual_pages = 0;
        self.deferred.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Vec<(u64, u64)>>>);
    impl DiscardRam for Log {
        fn discard(&self, gpa: u64, len: u64) -> Result<(), DiscardError> {
            self.0.lock().unwrap().push((gpa, len));
            Ok(())
        }
        fn is_ram(&self, gpa: u64, len: u64) -> bool {
            gpa + len <= 1 << 30
        }
    }

    #[test]
    fn inhibited_inflation_is_recorded_and_a_deflate_cancels_it() {
        let log = Log::default();
        let mut b = Balloon::new(0, true, Box::new(log.clone()));
        b.inflate(vec![0x101, 0x100, 0x102]);
        assert_eq!(*log.0.lock().unwrap(), vec![(0x100_000, 3 * PAGE)]);
        b.inhibit();
        b.inflate(vec![0x200, 0x201, 0x300]);
        b.deflate(vec![0x201]);
        assert_eq!(
            log.0.lock().unwrap().len(),
            1,
            "nothing discarded while inhibited"
        );
        assert_eq!(b.deferred_pages(), 2);
        assert_eq!(b.release(), 2);
        assert_eq!(
            log.0.lock().unwrap()[1..],
            [(0x200_000, PAGE), (0x300_000, PAGE)]
        );
        assert_eq!(b.stats().cancelled_by_deflate, 1);
        assert_eq!(b.stats().applied_after_inhibit, 2);
        assert!(!b.inhibited());
    }

    #[test]
    fn a_reset_forgets_recorded_pages() {
        let log = Log::default();
        let mut b = Balloon::new(0, false, Box::new(log.clone()));
        b.inhibit();
        b.inflate(vec![7]);
        b.reset();
        assert_eq!(b.release(), 0);
        assert!(log.0.lock().unwrap().is_empty());
    }

    /// An inflate queue in `mem` with one chain of `bufs` (address, length) readable buffers.
    fn inflate_queue(mem: &GuestMem, bufs: &[(u64, u32)]) -> Queue {
        use vm_memory::GuestAddress;
        let (desc, avail, used) = (0x1000u64, 0x3000u64, 0x4000u64);
        for (i, &(addr, len)) in bufs.iter().enumerate() {
            let next = i + 1 < bufs.len();
            let d = desc + 16 * i as u64;
            mem.write_obj(addr, GuestAddress(d)).unwrap();
            mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            mem.write_obj(u16::from(next), GuestAddress(d + 12))
                .unwrap(); // NEXT
            mem.write_obj((i + 1) as u16, GuestAddress(d + 14)).unwrap();
        }
        mem.write_obj(0u16, GuestAddress(avail + 4)).unwrap(); // ring[0] = head 0
        mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap(); // idx
        let mut q = Queue::new(QUEUE_SIZE).unwrap();
        q.set_size(QUEUE_SIZE);
        q.set_desc_table_address(Some(desc as u32), Some(0));
        q.set_avail_ring_address(Some(avail as u32), Some(0));
        q.set_used_ring_address(Some(used as u32), Some(0));
        q.set_ready(true);
        q
    }

    /// Inflates one chain of `bufs` whose PFN array at 0x10000 lists pages 0x100.. (all RAM).
    fn inflate(bufs: &[(u64, u32)]) -> (Balloon, Log, u16) {
        use vm_memory::GuestAddress;
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        for i in 0..(1u32 << 18) {
            mem.write_obj(0x100 + i % 0x800, GuestAddress(0x10000 + 4 * u64::from(i)))
                .unwrap();
        }
        let log = Log::default();
        let mut b = Balloon::new(0, false, Box::new(log.clone()));
        let mut q = inflate_queue(&mem, bufs);
        assert!(b.process_queue(INFLATE, &mut q, &mem), "buffer returned");
        let used_idx: u16 = mem.read_obj(GuestAddress(0x4002)).unwrap();
        (b, log, used_idx)
    }

    #[test]
    fn linux_sized_buffers_inflate() {
        let (b, log, used) = inflate(&[(0x10000, 256 * 4)]);
        assert_eq!(used, 1);
        assert_eq!(b.stats().inflated_pages, 256);
        assert_eq!(*log.0.lock().unwrap(), vec![(0x100_000, 256 * PAGE)]);
        let (b, _, _) = inflate(&[(0x10000, 100 * 4), (0x10000 + 400, 156 * 4)]);
        assert_eq!(b.stats().inflated_pages, 256);
    }

    #[test]
    fn oversized_buffers_are_refused_before_anything_is_read() {
        // 1 MiB of PFNs in one descriptor (once read whole and inflated), two descriptors
        // of 200 PFNs each, and a 4 GiB length (once a 4 GiB allocation).
        for bufs in [
            vec![(0x10000, 1 << 20)],
            vec![(0x10000, 800), (0x10000, 800)],
            vec![(0x10000, u32::MAX)],
            vec![(1 << 40, u32::MAX)],
        ] {
            let (b, log, used) = inflate(&bufs);
            assert_eq!(used, 1, "{bufs:x?}: the buffer still goes back");
            assert_eq!(b.stats().inflated_pages, 0, "{bufs:x?}");
            assert_eq!(b.stats().oversized_buffers, 1, "{bufs:x?}");
            assert!(log.0.lock().unwrap().is_empty(), "{bufs:x?}");
        }
    }

    #[test]
    fn config_reads_are_clipped_to_the_eight_bytes() {
        let mut b = Balloon::new(0x1234, false, Box::new(Log::default()));
        b.write_config(4, &7u32.to_le_bytes());
        let mut d = [0u8; 4];
        b.read_config(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1234);
        b.read_config(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 7);
        b.read_config(6, &mut d);
        assert_eq!(d, [0, 0, 0, 0]);
        b.read_config(100, &mut d);
        assert_eq!(d, [0; 4]);
    }
}

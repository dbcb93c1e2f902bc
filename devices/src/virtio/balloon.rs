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

use super::{GuestMem, VirtioDevice, VIRTIO_F_VERSION_1};

pub const DEVICE_ID: u32 = 5;
/// The host may take balloon pages back when the guest runs out of memory.
pub const F_DEFLATE_ON_OOM: u64 = 1 << 2;
const QUEUE_SIZE: u16 = 256;
const INFLATE: usize = 0;
const DEFLATE: usize = 1;
/// Balloon PFNs are always 4 KiB frames, whatever the guest's page size.
const PFN_SHIFT: u32 = 12;
const PAGE: u64 = 1 << PFN_SHIFT;

/// Gives guest RAM back to the host.
pub trait DiscardRam: Send {
    /// Drops [gpa, gpa + len) (whole 4 KiB pages, all RAM); the next guest read sees zeros.
    fn discard(&self, gpa: u64, len: u64) -> Result<(), String>;
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

    /// The PFNs in one chain's readable buffers (little-endian u32 each), RAM ones only.
    fn chain_pfns(
        &mut self,
        chain: virtio_queue::DescriptorChain<&GuestMem>,
        mem: &GuestMem,
    ) -> Vec<u64> {
        let mut pfns = Vec::new();
        for desc in chain.readable() {
            let count = desc.len() as usize / 4;
            let mut raw = vec![0u8; count * 4];
            if let Err(e) = mem.read_slice(&mut raw, desc.addr()) {
                log::warn!(
                    "balloon: unreadable PFN buffer at {:#x}: {e}",
                    desc.addr().0
                );
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
        fn discard(&self, gpa: u64, len: u64) -> Result<(), String> {
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

//! tern's live migration. The VMM implements [`MigratableVm`]; this crate drives precopy over a
//! [`transport`] with the versioned, framed, checksummed stream in [`stream`]. Snapshots are the same
//! stream written to a file. The source runs [`outgoing::migrate`]; the destination runs
//! [`destination::receive`], given a closure that builds the VM.

pub mod bitmap;
pub mod channels;
pub mod destination;
pub mod error;
pub mod fdpass;
pub mod identity;
pub mod incoming;
pub mod lifecycle;
pub mod local;
pub mod outgoing;
pub mod pacing;
mod pass;
pub mod peer;
pub mod postcopy;
pub mod progress;
pub mod snapshot;
pub mod state;
pub mod stream;
pub mod transport;
mod unix_probe;

pub use bitmap::DirtyBitmap;
pub use identity::MigrationId;
pub use state::{VmConfigRecord, VmState};

static THREAD_START: std::sync::OnceLock<fn(&'static str)> = std::sync::OnceLock::new();

/// Lets the VMM act first in every thread this crate starts (tern installs its seccomp filter
/// there), by the thread's name.
pub fn set_thread_start_hook(hook: fn(&'static str)) {
    let _ = THREAD_START.set(hook);
}

pub(crate) fn thread_started(name: &'static str) {
    if let Some(hook) = THREAD_START.get() {
        hook(name);
    }
}

/// Guest pages are 4 KiB everywhere in tern.
pub const PAGE_SIZE: usize = 4096;

/// A guest RAM region as the migration sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRegion {
    pub gpa: u64,
    pub len: u64,
}

impl RamRegion {
    pub fn pages(&self) -> usize {
        (self.len / PAGE_SIZE as u64) as usize
    }
}

/// The userfaultfd layer's observer (tern's async page faults hang off it).
pub use uffd::FaultObserver;

/// An error from the VMM side of the seam, as text: the migration only reports it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct VmSideError(pub String);

pub type VmResult<T> = Result<T, VmSideError>;

/// What the migration needs from a VM. Implemented by the VMM; nothing here knows KVM.
pub trait MigratableVm: Send + Sync {
    /// The configuration the destination needs to build an identical VM.
    fn config(&self) -> VmConfigRecord;
    fn ram_regions(&self) -> Vec<RamRegion>;
    /// Copies guest RAM at `gpa` into `buf` (within one region).
    fn read_ram(&self, gpa: u64, buf: &mut [u8]) -> VmResult<()>;
    /// Writes guest RAM at `gpa` (destination side).
    fn write_ram(&self, gpa: u64, data: &[u8]) -> VmResult<()>;
    /// Hint: [gpa, gpa+len) is about to be written; populate it in one go if that is cheaper
    /// than a fault per page (it is on this machine: ~3 µs vs ~20 µs a page).
    fn prepare_ram(&self, _gpa: u64, _len: u64) {}
    /// Which pages of `region` have ever been populated; the rest are zero and need not be read.
    fn populated_pages(&self, region: &RamRegion) -> VmResult<DirtyBitmap>;
    /// [`MigratableVm::populated_pages`] of pages `first..first + count` of `region` only
    /// (bit 0 = page `first`).
    fn populated_pages_in(
        &self,
        region: &RamRegion,
        first: usize,
        count: usize,
    ) -> VmResult<DirtyBitmap> {
        let all = self.populated_pages(region)?;
        let mut out = DirtyBitmap::new(count);
        for p in 0..count {
            if all.get(first + p) {
                out.set(p);
            }
        }
        Ok(out)
    }
    fn start_dirty_log(&self) -> VmResult<()>;
    fn stop_dirty_log(&self) -> VmResult<()>;
    /// Pages written since the last call (by the guest or by the VMM itself), per region, cleared.
    /// With manual re-arming ([`MigratableVm::rearm_dirty`]) a page's next write is logged only
    /// once it was re-armed.
    fn fetch_dirty(&self) -> VmResult<Vec<DirtyBitmap>>;
    /// Called just before pages `first..first + count` of region `region` (index in
    /// [`MigratableVm::ram_regions`]; `first` a multiple of 64) are read for sending: the pages set
    /// in `bits` (bit 0 = page `first`) must log their next write from now on. Nothing to do for a
    /// VM whose [`MigratableVm::fetch_dirty`] re-arms everything itself.
    fn rearm_dirty(
        &self,
        _region: usize,
        _first: usize,
        _count: usize,
        _bits: &[u64],
    ) -> VmResult<()> {
        Ok(())
    }
    fn pause(&self) -> VmResult<()>;
    fn resume(&self) -> VmResult<()>;
    fn save_state(&self) -> VmResult<VmState>;
    /// Host address of guest physical `gpa` (userfaultfd works on host addresses).
    fn host_address(&self, gpa: u64) -> Option<u64>;
    /// Who wants to hear about faults on missing pages (tern-owned async PF), if anyone.
    fn fault_observer(&self) -> Option<std::sync::Arc<dyn FaultObserver>> {
        None
    }
    fn restore_state(&self, state: VmState) -> VmResult<()>;
    /// Postcopy: stop giving guest pages back to the host (balloon inflation is recorded
    /// instead), or start again and apply what was recorded; returns how many pages that
    /// discarded. A discarded page would look missing on the destination and be fetched again.
    fn inhibit_discards(&self, _on: bool) -> u64 {
        0
    }
    /// The memfds behind guest RAM, one per region of [`MigratableVm::ram_regions`]; empty when
    /// RAM is private (a local migration needs them).
    fn shared_memory_fds(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        Vec::new()
    }
}

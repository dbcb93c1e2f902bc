//! tern's one userfaultfd layer, used by lazy memory and snapshot restore (`vmm`) and by the
//! postcopy destination (`migration`): registering guest RAM, one fault loop that resolves each
//! fault to its guest page, skips pages placed meanwhile (per-page state) and tells the
//! [`FaultObserver`] (tern's async page faults), and a pluggable [`PageFetcher`] that gets a
//! missing page: from a file at once, or by asking the migration source for it.

pub mod pagestate;
pub mod sys;

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub use pagestate::{PageState, PageStates};
pub use sys::{Fault, Placed, Userfaultfd, NEEDED_RANGE_IOCTLS, UFFD_FEATURE_THREAD_ID};

/// Guest pages are 4 KiB.
pub const PAGE: u64 = 4096;

/// Told about every fault and every placed page of lazily filled guest RAM (lazy memory,
/// postcopy): tern's async page faults hang off this.
pub trait FaultObserver: Send + Sync {
    /// A thread faulted on guest page `gpa` (tern may start an async page fault here).
    fn fault(&self, tid: u32, gpa: u64);
    /// Guest page `gpa` is now present.
    fn placed(&self, gpa: u64);
    /// PAGE_NOT_PRESENT events this observer delivered so far.
    fn async_faults(&self) -> u64 {
        0
    }
}

/// One region of guest RAM as userfaultfd sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamSpan {
    /// Guest physical address of its first byte.
    pub gpa: u64,
    /// Host virtual address of its first byte.
    pub hva: u64,
    /// Length in bytes (whole pages).
    pub len: u64,
    /// Index of its first page among all of guest RAM's pages.
    pub first_page: usize,
}

/// A guest page, located: where the guest and tern see it and its index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestPage {
    pub gpa: u64,
    pub hva: u64,
    pub index: usize,
}

/// Guest RAM's regions, with lookups both ways.
#[derive(Debug, Clone, Default)]
pub struct GuestRam {
    spans: Vec<RamSpan>,
    pages: usize,
}

impl GuestRam {
    /// Regions from (guest physical address, host virtual address, length), in page order.
    pub fn new(regions: impl IntoIterator<Item = (u64, u64, u64)>) -> Self {
        let mut ram = GuestRam::default();
        for (gpa, hva, len) in regions {
            ram.spans.push(RamSpan {
                gpa,
                hva,
                len,
                first_page: ram.pages,
            });
            ram.pages += (len / PAGE) as usize;
        }
        ram
    }

    pub fn spans(&self) -> &[RamSpan] {
        &self.spans
    }

    /// All of guest RAM's pages.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// The page holding host address `hva`, if it is guest RAM.
    pub fn page_at_hva(&self, hva: u64) -> Option<GuestPage> {
        let s = self
            .spans
            .iter()
            .find(|s| hva >= s.hva && hva - s.hva < s.len)?;
        let offset = (hva - s.hva) & !(PAGE - 1);
        Some(GuestPage {
            gpa: s.gpa + offset,
            hva: s.hva + offset,
            index: s.first_page + (offset / PAGE) as usize,
        })
    }

    /// The page holding guest physical address `gpa`, if it is guest RAM.
    pub fn page_at_gpa(&self, gpa: u64) -> Option<GuestPage> {
        let s = self
            .spans
            .iter()
            .find(|s| gpa >= s.gpa && gpa - s.gpa < s.len)?;
        let offset = (gpa - s.gpa) & !(PAGE - 1);
        Some(GuestPage {
            gpa: s.gpa + offset,
            hva: s.hva + offset,
            index: s.first_page + (offset / PAGE) as usize,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("userfaultfd: {0}")]
    Open(io::Error),
    #[error("userfaultfd lacks {0}")]
    Missing(&'static str),
    #[error("UFFDIO_REGISTER: {0}")]
    Register(io::Error),
}

/// Opens a userfaultfd (faults carry the faulting thread's id) and registers all of `ram` for
/// missing-page faults, with the ioctls the fault loop needs on it.
pub fn register(ram: &GuestRam) -> Result<Userfaultfd, RegisterError> {
    let uffd = Userfaultfd::new(UFFD_FEATURE_THREAD_ID).map_err(RegisterError::Open)?;
    if uffd.features & UFFD_FEATURE_THREAD_ID == 0 {
        return Err(RegisterError::Missing("UFFD_FEATURE_THREAD_ID"));
    }
    for s in ram.spans() {
        let ioctls = uffd
            .register(s.hva, s.len)
            .map_err(RegisterError::Register)?;
        if ioctls & NEEDED_RANGE_IOCTLS != NEEDED_RANGE_IOCTLS {
            return Err(RegisterError::Missing(
                "UFFDIO_COPY/ZEROPAGE/WAKE on anonymous memory",
            ));
        }
    }
    Ok(uffd)
}

/// One fault, resolved to its guest page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestFault {
    pub page: GuestPage,
    /// The faulting thread.
    pub tid: u32,
}

/// Why a fetch did not get its page.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Faults can no longer be served: the loop ends.
    #[error("{0}")]
    Stop(String),
    /// This page could not be had now (its state says so); the loop serves other faults.
    #[error("{0}")]
    Page(String),
}

/// The pluggable part of the fault loop: how a missing page is had.
pub trait PageFetcher: Send {
    /// A thread faulted on a page that is not here (before the observer hears of it).
    fn fault(&mut self, _fault: &GuestFault) {}
    /// The first fault on the page (its state just went Missing -> Requested): place it now
    /// ([`FaultLoop::place`]) or ask for it (it is placed elsewhere later).
    fn fetch(&mut self, lp: &FaultLoop, fault: &GuestFault) -> Result<(), FetchError>;
    /// The page was placed before this fault was served; the loop woke the thread.
    fn raced(&mut self, _fault: &GuestFault) {}
    /// Work to do while no fault waits; true while more is left (the loop then only polls).
    fn idle(&mut self, _lp: &FaultLoop) -> Result<bool, FetchError> {
        Ok(false)
    }
    /// Faults are not (or no longer) served: why. The loop ends after a `Stop`.
    fn failed(&mut self, why: &str);
}

/// The fault loop and what it shares with the threads that place pages.
pub struct FaultLoop {
    pub uffd: Arc<Userfaultfd>,
    pub ram: GuestRam,
    /// Per-page state: a page is fetched once, a fault on a Received page only wakes.
    pub states: Arc<PageStates>,
    pub observer: Option<Arc<dyn FaultObserver>>,
    /// Set to end the loop (checked at least every `wait_ms`).
    pub stop: Arc<AtomicBool>,
    /// How long one wait for faults lasts when there is no idle work.
    pub wait_ms: i32,
}

impl FaultLoop {
    /// Serves faults until `stop` is set or the fetcher says `Stop`.
    pub fn run(&self, fetcher: &mut dyn PageFetcher) {
        let mut faults: Vec<Fault> = Vec::new();
        // The first look only polls: idle work (a background pass) may be waiting already.
        let mut busy = true;
        while !self.stop.load(Ordering::SeqCst) {
            // Faults first; with idle work left, only look, do not wait.
            let wait_ms = if busy { 0 } else { self.wait_ms };
            if let Err(e) = self.uffd.wait_faults(wait_ms, &mut faults) {
                fetcher.failed(&format!("userfaultfd read failed: {e}"));
                return;
            }
            for f in &faults {
                if let Err(e) = self.serve(fetcher, f) {
                    fetcher.failed(&e.to_string());
                    if let FetchError::Stop(_) = e {
                        return;
                    }
                }
            }
            busy = match fetcher.idle(self) {
                Ok(more) => more,
                Err(e) => {
                    fetcher.failed(&e.to_string());
                    if let FetchError::Stop(_) = e {
                        return;
                    }
                    false
                }
            };
        }
    }

    fn serve(&self, fetcher: &mut dyn PageFetcher, f: &Fault) -> Result<(), FetchError> {
        let Some(page) = self.ram.page_at_hva(f.address) else {
            log::error!("userfaultfd: fault outside guest RAM at {:#x}", f.address);
            return Ok(());
        };
        let fault = GuestFault { page, tid: f.tid };
        // A fault on a page placed already is a waiter that raced the copy.
        if self.states.get(page.index) == PageState::Received {
            let _ = self.uffd.wake(page.hva, PAGE);
            fetcher.raced(&fault);
            return Ok(());
        }
        fetcher.fault(&fault);
        if let Some(o) = &self.observer {
            o.fault(f.tid, page.gpa);
        }
        if self
            .states
            .transition(page.index, PageState::Missing, PageState::Requested)
        {
            fetcher.fetch(self, &fault)?;
        } else if self.states.get(page.index) == PageState::Received {
            // Placed between the fault and now: the copy already woke it, but be sure.
            let _ = self.uffd.wake(page.hva, PAGE);
            fetcher.raced(&fault);
        }
        Ok(())
    }

    /// Places `page` (None: zeros) and marks it Received; false when it was there already.
    /// The observer is not told: the caller does, after its own bookkeeping.
    pub fn place(&self, page: &GuestPage, data: Option<&[u8]>) -> io::Result<bool> {
        place(&self.uffd, &self.states, page, data)
    }
}

/// Places `page` (None: zeros) atomically and marks it Received; false when another thread
/// placed it first (its waiters are woken either way).
pub fn place(
    uffd: &Userfaultfd,
    states: &PageStates,
    page: &GuestPage,
    data: Option<&[u8]>,
) -> io::Result<bool> {
    match data {
        Some(d) => uffd.copy(page.hva, d)?,
        None => uffd.zeropage(page.hva, PAGE)?,
    };
    Ok(states.receive(page.index))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_found_by_either_address() {
        let ram = GuestRam::new([(0, 0x10_0000, 16 * PAGE), (1 << 32, 0x90_0000, 8 * PAGE)]);
        assert_eq!(ram.pages(), 24);
        let p = ram.page_at_hva(0x90_1234).unwrap();
        assert_eq!((p.gpa, p.hva, p.index), ((1 << 32) + 0x1000, 0x90_1000, 17));
        assert_eq!(ram.page_at_gpa((1 << 32) + 0x1fff), Some(p));
        assert_eq!(ram.page_at_gpa(16 * PAGE), None, "past the first span");
        assert_eq!(ram.page_at_hva(0x90_0000 + 8 * PAGE), None);
        assert_eq!(ram.page_at_gpa(u64::MAX), None);
    }
}

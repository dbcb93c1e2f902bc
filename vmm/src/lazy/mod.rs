//! Lazy guest memory: RAM registered with userfaultfd (MISSING), filled on first touch from a
//! [`PageSource`] by a fault thread. Async page faults hang off the [`FaultObserver`] hook.

pub mod source;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use migration::uffd::{Fault, Userfaultfd, NEEDED_RANGE_IOCTLS, UFFD_FEATURE_THREAD_ID};
pub use migration::FaultObserver;
pub use source::{FileSource, PageSource};

use crate::memory::GuestMemory;

pub const PAGE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    #[error("userfaultfd is not usable here: {0} (lazy memory needs it; as root, or with vm.unprivileged_userfaultfd=1)")]
    Open(std::io::Error),
    #[error("userfaultfd lacks a feature tern needs: {0}")]
    Missing(&'static str),
    #[error("registering guest RAM with userfaultfd: {0}")]
    Register(std::io::Error),
    #[error("starting the fault thread: {0}")]
    Thread(std::io::Error),
}

#[derive(Debug, Default)]
pub struct LazyStats {
    pub faults: AtomicU64,
    pub pages: AtomicU64,
    pub fault_to_placed_ns: AtomicU64,
    /// Pages placed ahead of any fault by the background prefault.
    pub prefaulted: AtomicU64,
    /// When the background prefault placed its last page (ns after start; 0: not done).
    pub prefault_done_ns: AtomicU64,
}

/// How a lazy memory behaves beyond serving faults.
#[derive(Default)]
pub struct LazyOptions {
    /// Guest pages to place in the background, in this order, whenever no fault waits (a lazy
    /// restore fills all of RAM this way; plain lazy memory leaves pages missing until touched).
    pub prefault: Vec<u64>,
    /// A page the source cannot supply stops the VM with this callback's message, instead of
    /// being mapped as zeros (snapshot pages are checked: never map garbage).
    pub on_fatal: Option<Box<dyn Fn(String) + Send>>,
}

/// (guest physical, host virtual, length) of one RAM region.
#[derive(Debug, Clone, Copy)]
struct Span {
    gpa: u64,
    hva: u64,
    len: u64,
}

pub struct LazyMemory {
    pub stats: Arc<LazyStats>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Registers all of `mem` and starts the fault thread. Pages already present (what tern loaded)
/// never fault; every other page comes from `source` on first touch.
pub fn start(
    mem: &GuestMemory,
    source: Box<dyn PageSource>,
    observer: Option<Arc<dyn FaultObserver>>,
    options: LazyOptions,
) -> Result<LazyMemory, LazyError> {
    let uffd = Userfaultfd::new(UFFD_FEATURE_THREAD_ID).map_err(LazyError::Open)?;
    if uffd.features & UFFD_FEATURE_THREAD_ID == 0 {
        return Err(LazyError::Missing("UFFD_FEATURE_THREAD_ID"));
    }
    let spans: Vec<Span> = mem
        .iter()
        .map(|r| Span {
            gpa: r.start_addr().0,
            hva: r.as_ptr() as u64,
            len: r.len(),
        })
        .collect();
    for s in &spans {
        let ioctls = uffd.register(s.hva, s.len).map_err(LazyError::Register)?;
        if ioctls & NEEDED_RANGE_IOCTLS != NEEDED_RANGE_IOCTLS {
            return Err(LazyError::Missing(
                "UFFDIO_COPY/ZEROPAGE/WAKE on anonymous memory",
            ));
        }
    }
    let stats = Arc::new(LazyStats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let worker = FaultWorker {
        uffd,
        spans,
        source,
        observer,
        stats: stats.clone(),
        stop: stop.clone(),
        options,
    };
    let thread = std::thread::Builder::new()
        .name("uffd-faults".into())
        .spawn(move || {
            crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::Faults);
            worker.run()
        })
        .map_err(LazyError::Thread)?;
    Ok(LazyMemory {
        stats,
        stop,
        thread: Some(thread),
    })
}

impl Drop for LazyMemory {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct FaultWorker {
    uffd: Userfaultfd,
    spans: Vec<Span>,
    source: Box<dyn PageSource>,
    observer: Option<Arc<dyn FaultObserver>>,
    stats: Arc<LazyStats>,
    stop: Arc<AtomicBool>,
    options: LazyOptions,
}

/// Pages the background prefault places between two looks at the fault queue.
const PREFAULT_BATCH: usize = 32;

impl FaultWorker {
    fn gpa_of(&self, hva: u64) -> Option<(u64, u64)> {
        self.spans
            .iter()
            .find(|s| hva >= s.hva && hva < s.hva + s.len)
            .map(|s| (s.gpa + (hva - s.hva), hva))
    }

    fn hva_of(&self, gpa: u64) -> Option<u64> {
        self.spans
            .iter()
            .find(|s| gpa >= s.gpa && gpa < s.gpa + s.len)
            .map(|s| s.hva + (gpa - s.gpa))
    }

    /// Places guest page `gpa` at `hva` from the source. Err: the source failed and the VM was
    /// told to stop (fatal mode).
    fn place(&mut self, gpa: u64, hva: u64, page: &mut [u8]) -> Result<(), ()> {
        let placed = match self.source.fetch(gpa, page) {
            Ok(true) => self.uffd.copy(hva, page),
            Ok(false) => self.uffd.zeropage(hva, PAGE),
            Err(e) => match &self.options.on_fatal {
                Some(stop_vm) => {
                    stop_vm(format!("lazy memory: {e}"));
                    return Err(());
                }
                None => {
                    log::error!("page source failed for {gpa:#x}: {e}; placing zeros");
                    self.uffd.zeropage(hva, PAGE)
                }
            },
        };
        if let Err(e) = placed {
            log::error!("placing guest page {gpa:#x}: {e}");
        }
        Ok(())
    }

    fn run(mut self) {
        let started = Instant::now();
        let mut faults: Vec<Fault> = Vec::new();
        let mut page = vec![0u8; PAGE as usize];
        let mut done: HashSet<u64> = HashSet::new();
        let prefault = std::mem::take(&mut self.options.prefault);
        let mut next_prefault = 0usize;
        while !self.stop.load(Ordering::SeqCst) {
            // Faults first; with background work left, only look, do not wait.
            let wait_ms = if next_prefault < prefault.len() {
                0
            } else {
                100
            };
            if let Err(e) = self.uffd.wait_faults(wait_ms, &mut faults) {
                log::error!("userfaultfd read failed: {e}");
                return;
            }
            for f in &faults {
                let hva = f.address & !(PAGE - 1);
                let Some((gpa, hva)) = self.gpa_of(hva) else {
                    log::error!("fault outside guest RAM at {:#x}", f.address);
                    continue;
                };
                let start = Instant::now();
                // A fault on a page placed already is a waiter that raced the copy.
                if done.contains(&gpa) {
                    let _ = self.uffd.wake(hva, PAGE);
                    continue;
                }
                self.stats.faults.fetch_add(1, Ordering::Relaxed);
                if let Some(o) = &self.observer {
                    o.fault(f.tid, gpa);
                }
                if self.place(gpa, hva, &mut page).is_err() {
                    return;
                }
                done.insert(gpa);
                self.stats.pages.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .fault_to_placed_ns
                    .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
                if let Some(o) = &self.observer {
                    o.placed(gpa);
                }
            }
            let mut placed = 0;
            while placed < PREFAULT_BATCH && next_prefault < prefault.len() {
                let gpa = prefault[next_prefault];
                next_prefault += 1;
                if done.contains(&gpa) {
                    continue;
                }
                let Some(hva) = self.hva_of(gpa) else {
                    continue;
                };
                if self.place(gpa, hva, &mut page).is_err() {
                    return;
                }
                done.insert(gpa);
                self.stats.prefaulted.fetch_add(1, Ordering::Relaxed);
                placed += 1;
                if next_prefault == prefault.len() {
                    let ns = started.elapsed().as_nanos() as u64;
                    self.stats.prefault_done_ns.store(ns, Ordering::Relaxed);
                    eprintln!(
                        "tern: lazy memory: background pass placed {} pages in {:.1} ms ({} faults served first)",
                        self.stats.prefaulted.load(Ordering::Relaxed),
                        ns as f64 / 1e6,
                        self.stats.faults.load(Ordering::Relaxed)
                    );
                }
            }
        }
    }
}

/// Mean fault-to-placed latency so far.
pub fn mean_latency(stats: &LazyStats) -> Duration {
    let pages = stats.pages.load(Ordering::Relaxed).max(1);
    Duration::from_nanos(stats.fault_to_placed_ns.load(Ordering::Relaxed) / pages)
}

//! Lazy guest memory: RAM registered with userfaultfd (MISSING), filled on first touch from a
//! [`PageSource`] by a fault thread: the `uffd` crate's fault loop with [`FilePages`] as its
//! page fetcher. Async page faults hang off the [`FaultObserver`] hook.

pub mod source;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use uffd::{FaultLoop, FetchError, GuestFault, GuestPage, GuestRam, PageState, PageStates};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

pub use source::{FileSource, PageSource};
pub use uffd::FaultObserver;

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
    let ram = GuestRam::new(
        mem.iter()
            .map(|r| (r.start_addr().0, r.as_ptr() as u64, r.len())),
    );
    let uffd = uffd::register(&ram).map_err(|e| match e {
        uffd::RegisterError::Open(e) => LazyError::Open(e),
        uffd::RegisterError::Missing(what) => LazyError::Missing(what),
        uffd::RegisterError::Register(e) => LazyError::Register(e),
    })?;
    let stats = Arc::new(LazyStats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let faults = FaultLoop {
        uffd: Arc::new(uffd),
        states: Arc::new(PageStates::all_missing(ram.pages())),
        ram,
        observer,
        stop: stop.clone(),
        wait_ms: 100,
    };
    let mut fetcher = FilePages {
        source,
        stats: stats.clone(),
        on_fatal: options.on_fatal,
        prefault: options.prefault,
        next_prefault: 0,
        started: Instant::now(),
        fault_at: Instant::now(),
        page: vec![0u8; PAGE as usize],
        stopped_vm: false,
    };
    let thread = std::thread::Builder::new()
        .name("uffd-faults".into())
        .spawn(move || {
            crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::Faults);
            faults.run(&mut fetcher)
        })
        .map_err(LazyError::Thread)?;
    Ok(LazyMemory {
        stats,
        stop,
        thread: Some(thread),
    })
}

impl LazyMemory {
    /// The background pass placed every page it was given (never, without one).
    pub fn background_done(&self) -> bool {
        self.stats.prefault_done_ns.load(Ordering::SeqCst) != 0
    }
}

impl Drop for LazyMemory {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Lazy memory's page fetcher: a missing page comes from the [`PageSource`] and is placed at
/// once; between faults, the background prefault places pages no fault asked for yet.
struct FilePages {
    source: Box<dyn PageSource>,
    stats: Arc<LazyStats>,
    on_fatal: Option<Box<dyn Fn(String) + Send>>,
    prefault: Vec<u64>,
    next_prefault: usize,
    started: Instant,
    /// When the fault being served was taken (fault-to-placed latency).
    fault_at: Instant,
    page: Vec<u8>,
    /// `on_fatal` was called: the VM stops with that reason, nothing more to report.
    stopped_vm: bool,
}

/// Pages the background prefault places between two looks at the fault queue.
const PREFAULT_BATCH: usize = 32;

impl FilePages {
    /// Places guest page `page` from the source. Err: the source failed and the VM was told to
    /// stop (fatal mode).
    fn place(&mut self, lp: &FaultLoop, page: &GuestPage) -> Result<(), FetchError> {
        let gpa = page.gpa;
        let data = match self.source.fetch(gpa, &mut self.page) {
            Ok(true) => Some(&self.page[..]),
            Ok(false) => None,
            Err(e) => match &self.on_fatal {
                Some(stop_vm) => {
                    let why = format!("lazy memory: {e}");
                    stop_vm(why.clone());
                    self.stopped_vm = true;
                    return Err(FetchError::Stop(why));
                }
                None => {
                    log::error!("page source failed for {gpa:#x}: {e}; placing zeros");
                    None
                }
            },
        };
        if let Err(e) = lp.place(page, data) {
            log::error!("placing guest page {gpa:#x}: {e}");
        }
        Ok(())
    }
}

impl uffd::PageFetcher for FilePages {
    fn fault(&mut self, _fault: &GuestFault) {
        self.fault_at = Instant::now();
        self.stats.faults.fetch_add(1, Ordering::Relaxed);
    }

    fn fetch(&mut self, lp: &FaultLoop, fault: &GuestFault) -> Result<(), FetchError> {
        self.place(lp, &fault.page)?;
        self.stats.pages.fetch_add(1, Ordering::Relaxed);
        self.stats
            .fault_to_placed_ns
            .fetch_add(self.fault_at.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if let Some(o) = &lp.observer {
            o.placed(fault.page.gpa);
        }
        Ok(())
    }

    fn idle(&mut self, lp: &FaultLoop) -> Result<bool, FetchError> {
        let mut placed = 0;
        while placed < PREFAULT_BATCH && self.next_prefault < self.prefault.len() {
            let gpa = self.prefault[self.next_prefault];
            self.next_prefault += 1;
            let Some(page) = lp.ram.page_at_gpa(gpa) else {
                continue;
            };
            // Placed by a fault already (or being placed).
            if !lp
                .states
                .transition(page.index, PageState::Missing, PageState::Requested)
            {
                continue;
            }
            self.place(lp, &page)?;
            self.stats.prefaulted.fetch_add(1, Ordering::Relaxed);
            placed += 1;
        }
        let more = self.next_prefault < self.prefault.len();
        // Done once, however the last pages went (placed here or by faults first).
        let published = self.stats.prefault_done_ns.load(Ordering::SeqCst) != 0;
        if !more && !self.prefault.is_empty() && !published {
            // Never 0: 0 means "not done".
            let ns = (self.started.elapsed().as_nanos() as u64).max(1);
            self.stats.prefault_done_ns.store(ns, Ordering::SeqCst);
            eprintln!(
                "tern: lazy memory: background pass placed {} pages in {:.1} ms ({} faults served first)",
                self.stats.prefaulted.load(Ordering::Relaxed),
                ns as f64 / 1e6,
                self.stats.faults.load(Ordering::Relaxed)
            );
        }
        Ok(more)
    }

    fn failed(&mut self, why: &str) {
        if !self.stopped_vm {
            log::error!("lazy memory: {why}");
        }
    }
}

/// Mean fault-to-placed latency so far.
pub fn mean_latency(stats: &LazyStats) -> Duration {
    let pages = stats.pages.load(Ordering::Relaxed).max(1);
    Duration::from_nanos(stats.fault_to_placed_ns.load(Ordering::Relaxed) / pages)
}

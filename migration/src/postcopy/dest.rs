//! Postcopy, destination side: after the switch the guest runs here while pages still arrive. The
//! destination registers guest RAM with userfaultfd; a fault on a missing page becomes a page
//! request on the return path (never twice: per-page state Missing -> Requested -> Received), and
//! the listen side places pages atomically (UFFDIO_COPY / UFFDIO_ZEROPAGE). The fault loop is the
//! `uffd` crate's; what is postcopy's is [`RequestPages`], the fetcher that asks the source.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use uffd::{
    FaultLoop, FetchError, GuestFault, GuestRam, PageFetcher, PageState, PageStates, Userfaultfd,
    NEEDED_RANGE_IOCTLS, UFFD_FEATURE_THREAD_ID,
};

use super::placer::{log2_bucket, trim, Placer, Tracker};
use crate::stream::{Section, StreamError, StreamWriter};
use crate::{DirtyBitmap, FaultObserver, MigratableVm, RamRegion, PAGE_SIZE};

/// Pages the destination must treat as missing at the switch: runs of (first gpa, page count).
/// It is the sent map masked with the dirty bitmap (sent, then dirtied again: discard), plus
/// what was never sent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiscardRecord {
    pub ranges: Vec<(u64, u64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRequest {
    pub gpa: u64,
}

/// The source's answer to a page request it cannot serve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRefusal {
    pub gpa: u64,
    pub reason: String,
}

/// Runs of set pages in `maps` (one bitmap per region).
pub fn ranges(regions: &[RamRegion], maps: &[DirtyBitmap]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (r, m) in regions.iter().zip(maps) {
        for p in m.iter() {
            let gpa = r.gpa + (p * PAGE_SIZE) as u64;
            match out.last_mut() {
                Some((start, n)) if *start + *n * PAGE_SIZE as u64 == gpa => *n += 1,
                _ => out.push((gpa, 1)),
            }
        }
    }
    out
}

/// Why postcopy cannot listen here: the ADVISE probe, or DISCARD/LISTEN.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("userfaultfd disabled by TERN_TEST_NO_USERFAULTFD")]
    DisabledForTest,
    #[error("userfaultfd: {0}")]
    Open(std::io::Error),
    #[error("mmap for the userfaultfd probe failed")]
    ProbeMap,
    #[error("UFFDIO_REGISTER: {0}")]
    Register(std::io::Error),
    #[error("WAKE/COPY/ZEROPAGE not allowed on anonymous memory")]
    MissingIoctls,
    #[error("UFFDIO_UNREGISTER: {0}")]
    Unregister(std::io::Error),
    #[error("no host mapping for RAM at {0:#x}")]
    NoMapping(u64),
    #[error("discard range {gpa:#x}+{pages} pages is empty or not page-aligned")]
    BadRange { gpa: u64, pages: u64 },
    #[error("discard range {gpa:#x}+{pages} pages is outside guest RAM")]
    OutsideRam { gpa: u64, pages: u64 },
    #[error("MADV_DONTNEED: {0}")]
    Discard(std::io::Error),
    #[error(transparent)]
    Uffd(#[from] uffd::RegisterError),
    #[error("starting the fault thread: {0}")]
    Thread(std::io::Error),
}

/// The ADVISE check: userfaultfd with the API, REGISTER/UNREGISTER and WAKE/COPY/ZEROPAGE on
/// anonymous memory (QEMU's postcopy OS probe, done the same way).
pub fn probe_userfaultfd() -> Result<(), ListenError> {
    if std::env::var_os("TERN_TEST_NO_USERFAULTFD").is_some() {
        return Err(ListenError::DisabledForTest);
    }
    let uffd = Userfaultfd::new(UFFD_FEATURE_THREAD_ID).map_err(ListenError::Open)?;
    let len = PAGE_SIZE;
    // SAFETY: a fresh private anonymous page, unmapped below.
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
    if p == libc::MAP_FAILED {
        return Err(ListenError::ProbeMap);
    }
    let result = uffd
        .register(p as u64, len as u64)
        .map_err(ListenError::Register)
        .and_then(|ioctls| {
            if ioctls & NEEDED_RANGE_IOCTLS != NEEDED_RANGE_IOCTLS {
                return Err(ListenError::MissingIoctls);
            }
            uffd.unregister(p as u64, len as u64)
                .map_err(ListenError::Unregister)
        });
    // SAFETY: unmaps the probe page mapped above.
    unsafe { libc::munmap(p, len) };
    result
}

/// Postcopy figures, like QEMU's blocktime and latency statistics.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PostcopyFigures {
    pub missing_at_switch: u64,
    pub faults: u64,
    pub pages_requested: u64,
    pub pages_pushed: u64,
    pub request_latency_p50_us: f64,
    pub request_latency_p99_us: f64,
    pub request_latency_max_us: f64,
    /// Request latencies, log2 buckets: index i counts latencies in [2^i, 2^(i+1)) µs.
    pub latency_log2_us: Vec<u64>,
    /// Per faulting thread (vCPU threads named vcpuN): faults and total time blocked (µs).
    pub blocked: Vec<(String, u64, f64)>,
    /// vCPU threads' single waits for a page, log2 buckets as `latency_log2_us`.
    pub vcpu_blocked_log2_us: Vec<u64>,
    /// Async page faults: taken by KVM's workers rather than vCPU threads (kvm mode), or
    /// PAGE_NOT_PRESENT injected by tern (tern mode).
    pub async_faults: u64,
}

/// The destination's postcopy machinery.
pub struct Listener {
    uffd: Arc<Userfaultfd>,
    states: Arc<PageStates>,
    ram: GuestRam,
    /// Also holds the vCPU threads' ids (figures name them).
    tracker: Arc<Mutex<Tracker>>,
    observer: Option<Arc<dyn FaultObserver>>,
    missing_at_switch: u64,
    pushed: Arc<AtomicU64>,
    /// Places pages (shared with the preempt channel's reader).
    placer: Placer,
    stop: Arc<AtomicBool>,
    fault_thread: Option<JoinHandle<()>>,
    /// Why the fault thread stopped, if it did: the vCPUs would wait forever, so the
    /// listener must stop the VM and say it.
    fault_error: Arc<Mutex<Option<String>>>,
    /// Shared with the fault thread; recovery swaps the connection inside it.
    return_path: ReturnPath,
}

type ReturnPath = Arc<Mutex<StreamWriter<Box<dyn Write + Send>>>>;

/// Checks one discard run (first gpa, page count) from the stream against guest RAM; returns
/// (hva, byte length, first page index, page count).
fn check_discard(
    ram: &GuestRam,
    gpa: u64,
    n: u64,
) -> Result<(u64, usize, usize, usize), ListenError> {
    let outside = || ListenError::OutsideRam { gpa, pages: n };
    if n == 0 || !gpa.is_multiple_of(PAGE_SIZE as u64) {
        return Err(ListenError::BadRange { gpa, pages: n });
    }
    // Checked: a huge count must not wrap to a short (or empty) length.
    let len = n.checked_mul(PAGE_SIZE as u64).ok_or_else(outside)?;
    let end = gpa.checked_add(len).ok_or_else(outside)?;
    let span = ram
        .spans()
        .iter()
        .find(|s| gpa >= s.gpa && end <= s.gpa + s.len)
        .ok_or_else(outside)?;
    let offset = gpa - span.gpa;
    let first = span.first_page + (offset / PAGE_SIZE as u64) as usize;
    // Within one span, so both fit a usize (the span is mapped).
    Ok((span.hva + offset, len as usize, first, n as usize))
}

impl Listener {
    /// DISCARD and LISTEN: drops the listed pages, registers RAM with userfaultfd (before any
    /// vCPU runs) and starts the fault thread that turns faults into page requests.
    pub fn start(
        vm: &dyn MigratableVm,
        discard: &DiscardRecord,
        return_path: ReturnPath,
        vcpu_tids: Vec<u32>,
    ) -> Result<Listener, ListenError> {
        let mut regions = Vec::new();
        for r in vm.ram_regions() {
            let hva = vm
                .host_address(r.gpa)
                .ok_or(ListenError::NoMapping(r.gpa))?;
            regions.push((r.gpa, hva, r.len));
        }
        let ram = GuestRam::new(regions);
        let states = Arc::new(PageStates::all_received(ram.pages()));
        // Every run is checked before any page is dropped: a bad record leaves RAM untouched.
        let runs = discard
            .ranges
            .iter()
            .map(|&(gpa, n)| check_discard(&ram, gpa, n))
            .collect::<Result<Vec<_>, _>>()?;
        let mut missing = 0u64;
        for (hva, len, first, n) in runs {
            // SAFETY: the range lies inside one live guest mapping (check_discard); dropping
            // pages only makes them read as missing (userfaultfd) from now on.
            if unsafe { libc::madvise(hva as *mut libc::c_void, len, libc::MADV_DONTNEED) } != 0 {
                return Err(ListenError::Discard(std::io::Error::last_os_error()));
            }
            for p in first..first + n {
                if states.transition(p, PageState::Received, PageState::Missing) {
                    missing += 1;
                }
            }
        }
        let uffd = Arc::new(uffd::register(&ram)?);
        let tracker = Arc::new(Mutex::new(Tracker {
            vcpu_tids,
            ..Default::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let fault_error = Arc::new(Mutex::new(None));
        let observer = vm.fault_observer();
        let faults = FaultLoop {
            uffd: uffd.clone(),
            ram: ram.clone(),
            states: states.clone(),
            observer: observer.clone(),
            stop: stop.clone(),
            wait_ms: 50,
        };
        let mut fetcher = RequestPages {
            tracker: tracker.clone(),
            return_path: return_path.clone(),
            fault_error: fault_error.clone(),
        };
        let fault_thread = std::thread::Builder::new()
            .name("postcopy-faults".into())
            .spawn(move || {
                crate::thread_started("postcopy-faults");
                faults.run(&mut fetcher)
            })
            .map_err(ListenError::Thread)?;
        let pushed = Arc::new(AtomicU64::new(0));
        let placer = Placer {
            uffd: uffd.clone(),
            states: states.clone(),
            ram: ram.clone(),
            tracker: tracker.clone(),
            observer: observer.clone(),
            pushed: pushed.clone(),
            place_ns: Arc::new(AtomicU64::new(0)),
            copying: Arc::new(Mutex::new(())),
        };
        Ok(Listener {
            uffd,
            states,
            ram,
            tracker,
            observer,
            missing_at_switch: missing,
            pushed,
            placer,
            stop,
            fault_thread: Some(fault_thread),
            fault_error,
            return_path,
        })
    }

    /// Runs of pages not received yet (Missing or Requested): what a recovering source must send.
    pub fn not_received(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for s in self.ram.spans() {
            let n = (s.len / PAGE_SIZE as u64) as usize;
            for i in 0..n {
                if self.states.get(s.first_page + i) == PageState::Received {
                    continue;
                }
                let page_gpa = s.gpa + (i * PAGE_SIZE) as u64;
                match out.last_mut() {
                    Some((start, k)) if *start + *k * PAGE_SIZE as u64 == page_gpa => *k += 1,
                    _ => out.push((page_gpa, 1)),
                }
            }
        }
        out
    }

    /// Recovery: the new connection's writer replaces the broken one, the fault thread's error
    /// is forgotten, and every page a thread still waits for is requested again on it.
    pub fn reconnect(&self, w: Box<dyn Write + Send>) -> Result<usize, StreamError> {
        let mut rp = self.return_path.lock().unwrap_or_else(|e| e.into_inner());
        *rp = StreamWriter::new(w);
        *self.fault_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let mut resent = 0;
        for s in self.ram.spans() {
            for i in 0..(s.len / PAGE_SIZE as u64) as usize {
                if self.states.get(s.first_page + i) == PageState::Requested {
                    let gpa = s.gpa + (i * PAGE_SIZE) as u64;
                    rp.record(Section::PageRequest, &PageRequest { gpa })?;
                    resent += 1;
                }
            }
        }
        rp.flush()?;
        Ok(resent)
    }

    /// The shared return path (recovery answers on it).
    pub fn return_path(&self) -> ReturnPath {
        self.return_path.clone()
    }

    /// Why the fault thread stopped serving faults, if it did.
    pub fn fault_error(&self) -> Option<String> {
        self.fault_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn complete(&self) -> bool {
        self.states.complete()
    }

    pub fn pages_left(&self) -> usize {
        self.states.pages() - self.states.received()
    }

    /// Places one page that arrived (None: a zero page). Pages already Received are ignored.
    pub fn place(&self, gpa: u64, data: Option<&[u8]>) -> Result<(), StreamError> {
        self.placer.place(gpa, data)
    }

    /// A handle that places pages from another thread (the preempt channel's reader).
    pub fn placer(&self) -> Placer {
        self.placer.clone()
    }

    /// END: stops the fault thread, unregisters RAM and returns the figures.
    pub fn finish(mut self) -> PostcopyFigures {
        self.stop_fault_thread();
        for s in self.ram.spans() {
            if let Err(e) = self.uffd.unregister(s.hva, s.len) {
                log::warn!("UFFDIO_UNREGISTER: {e}");
            }
        }
        self.figures()
    }

    fn stop_fault_thread(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.fault_thread.take() {
            let _ = t.join();
        }
    }

    pub fn figures(&self) -> PostcopyFigures {
        let t = self.tracker.lock().unwrap_or_else(|e| e.into_inner());
        let mut lat = t.latencies_us.clone();
        lat.sort_by(|a, b| a.total_cmp(b));
        let pct = |q: f64| -> f64 {
            if lat.is_empty() {
                return 0.0;
            }
            lat[((lat.len() - 1) as f64 * q).round() as usize]
        };
        let mut hist = vec![0u64; 24];
        for us in &lat {
            hist[log2_bucket(*us)] += 1;
        }
        let hist = trim(hist);
        let mut blocked: Vec<(String, u64, f64)> = t
            .blocked
            .iter()
            .map(|(tid, (n, us))| {
                let name = match t.vcpu_tids.iter().position(|v| v == tid) {
                    Some(i) => format!("vcpu{i}"),
                    None => format!("thread {tid}"),
                };
                (name, *n, *us)
            })
            .collect();
        blocked.sort_by(|a, b| a.0.cmp(&b.0));
        PostcopyFigures {
            missing_at_switch: self.missing_at_switch,
            faults: t.faults,
            pages_requested: lat.len() as u64,
            pages_pushed: self.pushed.load(Ordering::Relaxed),
            request_latency_p50_us: pct(0.5),
            request_latency_p99_us: pct(0.99),
            request_latency_max_us: lat.last().copied().unwrap_or(0.0),
            latency_log2_us: hist,
            blocked,
            vcpu_blocked_log2_us: trim(t.vcpu_waits_log2.clone()),
            // KVM mode: faults its async-PF workers took; tern mode: what tern injected.
            async_faults: t.async_faults + self.observer.as_ref().map_or(0, |o| o.async_faults()),
        }
    }
}

/// A listener dropped without `finish` (the incoming migration failed after DISCARD) stops its
/// fault thread: nothing would read what it records, and each one kept a thread and a
/// userfaultfd alive for the life of the process.
impl Drop for Listener {
    fn drop(&mut self) {
        self.stop_fault_thread();
    }
}

/// Postcopy's page fetcher: a missing page is asked for on the return path (the placer puts it
/// in when it arrives); the figures follow every thread's wait.
struct RequestPages {
    tracker: Arc<Mutex<Tracker>>,
    return_path: ReturnPath,
    fault_error: Arc<Mutex<Option<String>>>,
}

impl RequestPages {
    /// Counts `fault` as a wait on its page (once per thread and page).
    fn wait_starts(&self, fault: &GuestFault) {
        let mut t = self.tracker.lock().unwrap_or_else(|e| e.into_inner());
        let is_vcpu = t.vcpu_tids.contains(&fault.tid);
        let waiters = t.waiters.entry(fault.page.gpa).or_default();
        // A thread kicked out of its wait (tern-mode async PF) faults on the page again:
        // still the same wait.
        if !waiters.iter().any(|(tid, _)| *tid == fault.tid) {
            waiters.push((fault.tid, Instant::now()));
            t.faults += 1;
            if !is_vcpu {
                t.async_faults += 1;
            }
        }
    }
}

impl PageFetcher for RequestPages {
    fn fault(&mut self, fault: &GuestFault) {
        self.wait_starts(fault);
    }

    fn fetch(&mut self, _lp: &FaultLoop, fault: &GuestFault) -> Result<(), FetchError> {
        let gpa = fault.page.gpa;
        self.tracker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .requested_at
            .insert(gpa, Instant::now());
        let mut w = self.return_path.lock().unwrap_or_else(|e| e.into_inner());
        let sent = w
            .record(Section::PageRequest, &PageRequest { gpa })
            .and_then(|_| w.flush());
        drop(w);
        // A request that cannot be sent stays Requested: the listener pauses the VM with the
        // reason, and a recovery sends it again. The loop keeps serving.
        sent.map_err(|e| {
            FetchError::Page(format!("page request for {gpa:#x} could not be sent: {e}"))
        })
    }

    fn raced(&mut self, fault: &GuestFault) {
        // Placed meanwhile: this wait is over as soon as it began.
        self.wait_starts(fault);
        self.tracker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .end_wait(fault.page.gpa, Instant::now());
    }

    /// Records why faults are no longer served (the listener stops the VM with it).
    fn failed(&mut self, why: &str) {
        log::error!("postcopy: {why}");
        *self.fault_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_adjacent_pages() {
        let regions = [
            RamRegion {
                gpa: 0,
                len: 16 * 4096,
            },
            RamRegion {
                gpa: 1 << 32,
                len: 8 * 4096,
            },
        ];
        let mut a = DirtyBitmap::new(16);
        for p in [1, 2, 3, 7] {
            a.set(p);
        }
        let mut b = DirtyBitmap::new(8);
        b.set(0);
        assert_eq!(
            ranges(&regions, &[a, b]),
            vec![(0x1000, 3), (0x7000, 1), (1 << 32, 1)]
        );
    }

    #[test]
    fn discard_runs_are_checked_before_use() {
        let spans = GuestRam::new([(0, 0x10_0000, 16 * 4096), (1 << 32, 0x90_0000, 8 * 4096)]);
        assert_eq!(
            check_discard(&spans, 0x2000, 3).unwrap(),
            (0x10_2000, 3 * 4096, 2, 3)
        );
        assert_eq!(
            check_discard(&spans, (1 << 32) + 0x1000, 7).unwrap(),
            (0x90_1000, 7 * 4096, 17, 7)
        );
        // n * 4096 wraps to 0 for n = 2^52: that once passed the range check and spun.
        let err = check_discard(&spans, 0x1000, 1 << 52).unwrap_err();
        assert!(matches!(err, ListenError::OutsideRam { .. }), "{err}");
        assert!(check_discard(&spans, 0x1000, u64::MAX).is_err());
        assert!(check_discard(&spans, !0xfff, 2).is_err());
        assert!(
            check_discard(&spans, 0xf000, 2).is_err(),
            "past the span's end"
        );
        for (gpa, n, why) in [(0x1800, 1, "unaligned"), (0x1000, 0, "empty")] {
            let err = check_discard(&spans, gpa, n).unwrap_err();
            assert!(matches!(err, ListenError::BadRange { .. }), "{why}: {err}");
        }
    }

    #[test]
    fn probe_finds_userfaultfd_here() {
        // This machine has userfaultfd (docs/machine-kvm.md); the probe must say so.
        if let Err(e) = probe_userfaultfd() {
            panic!("postcopy needs userfaultfd here: {e}");
        }
    }
}

//! The fault loop on real userfaultfd-registered memory: each missing page is fetched once,
//! background work places pages no fault asked for, the observer hears of faults, and a fetcher
//! that stops ends the loop.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use uffd::{
    FaultLoop, FaultObserver, FetchError, GuestFault, GuestRam, PageFetcher, PageStates, PAGE,
};

const PAGES: u64 = 4;
const GPA: u64 = 0x10_0000;

struct Mapping(*mut libc::c_void);

impl Mapping {
    fn new() -> Mapping {
        // SAFETY: a fresh private anonymous mapping, unmapped on drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                (PAGES * PAGE) as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Mapping(p)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `new`; no reader is left.
        unsafe { libc::munmap(self.0, (PAGES * PAGE) as usize) };
    }
}

#[derive(Default)]
struct Observed {
    faults: AtomicU64,
}

impl FaultObserver for Observed {
    fn fault(&self, _tid: u32, _gpa: u64) {
        self.faults.fetch_add(1, Ordering::Relaxed);
    }
    fn placed(&self, _gpa: u64) {}
}

/// Fills page `gpa` with its page number; places page 3 in the background.
struct Pattern {
    fetched: Arc<Mutex<Vec<u64>>>,
    background: Option<u64>,
    stop_at: Option<u64>,
    failures: Arc<Mutex<Vec<String>>>,
}

impl PageFetcher for Pattern {
    fn fetch(&mut self, lp: &FaultLoop, fault: &GuestFault) -> Result<(), FetchError> {
        let n = (fault.page.gpa - GPA) / PAGE;
        if self.stop_at == Some(n) {
            return Err(FetchError::Stop(format!("page {n} is not to be had")));
        }
        self.fetched.lock().unwrap().push(n);
        let data = vec![n as u8 + 1; PAGE as usize];
        lp.place(&fault.page, Some(&data))
            .map_err(|e| FetchError::Stop(e.to_string()))?;
        Ok(())
    }

    fn idle(&mut self, lp: &FaultLoop) -> Result<bool, FetchError> {
        if let Some(n) = self.background.take() {
            let page = lp.ram.page_at_gpa(GPA + n * PAGE).unwrap();
            if lp.states.transition(
                page.index,
                uffd::PageState::Missing,
                uffd::PageState::Requested,
            ) {
                lp.place(&page, Some(&vec![0xee; PAGE as usize])).unwrap();
            }
        }
        Ok(false)
    }

    fn failed(&mut self, why: &str) {
        self.failures.lock().unwrap().push(why.to_string());
    }
}

fn start(map: &Mapping, stop_at: Option<u64>) -> Option<(Arc<FaultLoop>, Pattern)> {
    let ram = GuestRam::new([(GPA, map.0 as u64, PAGES * PAGE)]);
    let Ok(fd) = uffd::register(&ram) else {
        eprintln!("userfaultfd unavailable here; nothing to test");
        return None;
    };
    let lp = Arc::new(FaultLoop {
        uffd: Arc::new(fd),
        states: Arc::new(PageStates::all_missing(ram.pages())),
        ram,
        observer: Some(Arc::new(Observed::default())),
        stop: Arc::new(AtomicBool::new(false)),
        wait_ms: 10,
    });
    let fetcher = Pattern {
        fetched: Arc::default(),
        background: Some(3),
        stop_at,
        failures: Arc::default(),
    };
    Some((lp, fetcher))
}

fn read_byte(base: usize, page: u64) -> u8 {
    // SAFETY: inside the live mapping; blocks until the fault loop places the page.
    unsafe { std::ptr::read_volatile((base + (page * PAGE) as usize + 7) as *const u8) }
}

#[test]
fn each_missing_page_is_fetched_once_and_background_work_fills_the_rest() {
    let map = Mapping::new();
    let Some((lp, mut fetcher)) = start(&map, None) else {
        return;
    };
    let (fetched, failures) = (fetcher.fetched.clone(), fetcher.failures.clone());
    let runner = {
        let lp = lp.clone();
        std::thread::spawn(move || lp.run(&mut fetcher))
    };
    let base = map.0 as usize;
    let reader = std::thread::spawn(move || {
        [0, 1, 2, 0, 1, 3]
            .iter()
            .map(|&p| read_byte(base, p))
            .collect::<Vec<u8>>()
    });
    let got = reader.join().unwrap();
    lp.stop.store(true, Ordering::SeqCst);
    runner.join().unwrap();
    assert_eq!(got, [1, 2, 3, 1, 2, 0xee]);
    let mut f = fetched.lock().unwrap().clone();
    f.sort();
    assert_eq!(
        f,
        [0, 1, 2],
        "each page fetched once; page 3 by the background work"
    );
    assert!(lp.states.complete());
    assert!(failures.lock().unwrap().is_empty());
}

#[test]
fn a_fetcher_that_stops_ends_the_loop_with_its_reason() {
    let map = Mapping::new();
    let Some((lp, mut fetcher)) = start(&map, Some(1)) else {
        return;
    };
    let failures = fetcher.failures.clone();
    fetcher.background = None;
    let runner = {
        let lp = lp.clone();
        std::thread::spawn(move || lp.run(&mut fetcher))
    };
    let base = map.0 as usize;
    // Page 0 is served; the fault on page 1 stops the loop (the reader stays blocked on it
    // until the mapping goes: it is left running, detached).
    assert_eq!(
        std::thread::spawn(move || read_byte(base, 0))
            .join()
            .unwrap(),
        1
    );
    std::thread::spawn(move || read_byte(base, 1));
    runner.join().unwrap();
    assert_eq!(
        failures.lock().unwrap().as_slice(),
        ["page 1 is not to be had"]
    );
    // Unregister so the blocked reader gets a zero page instead of hanging the process.
    for s in lp.ram.spans() {
        lp.uffd.unregister(s.hva, s.len).unwrap();
    }
    std::mem::forget(map);
}

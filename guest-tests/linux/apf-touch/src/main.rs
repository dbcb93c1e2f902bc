//! `apf-touch [mib=N] [touchers=T] [thp=on|off] [go=PATH] [cpu=C] [seed=S]`: drives Linux's own
//! async page fault handler from the host. It maps N MiB (2 MiB-aligned, MADV_HUGEPAGE unless
//! thp=off), fills every page with a pattern of (seed, page, word), prints
//! `apf-touch: filled ...`, and then, once a byte can be read from `go` (a FIFO the host writes
//! to after it made the region's pages missing, e.g. by a postcopy switch), runs T toucher
//! threads that read and check every page (page p belongs to toucher p mod T) beside one compute
//! thread, all pinned to CPU C. Async PF happens only for user-mode faults on pages the guest
//! maps but the host lacks: a toucher that faults waits in Linux's handler
//! (`kvm_async_pf_task_wait_schedule`) while the compute thread runs, and PAGE_READY arrives
//! as the HYP interrupt (vector 0xf3), counted in /proc/interrupts. The last line:
//!
//! `apf-touch: done pages=P bad=B touch_ms=X max_page_us=M compute_during=D compute_alone=A
//! hyp_before=H0 hyp_after=H1` — D and A are compute units per ms while touchers ran and alone
//! just after; exit status 0 when every page verified, 1 otherwise, 2 for bad arguments.

use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;
const HUGE: usize = 2 * MIB;
const PAGE: usize = 4096;
const WORDS: usize = PAGE / 8;

fn pattern(seed: u64, page: u64, word: u64) -> u64 {
    let mut z = seed ^ (page << 12 | word).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z ^ (z >> 31)
}

struct Opts {
    mib: usize,
    touchers: usize,
    thp: bool,
    go: Option<String>,
    cpu: usize,
    seed: u64,
}

fn parse(args: impl Iterator<Item = String>) -> Result<Opts, String> {
    let mut o = Opts {
        mib: 32,
        touchers: 4,
        thp: true,
        go: None,
        cpu: 0,
        seed: 0x7465_726e,
    };
    for a in args {
        let (k, v) = a.split_once('=').ok_or(format!("bad argument {a:?}"))?;
        let num = || v.parse::<u64>().map_err(|_| format!("bad number in {a:?}"));
        match k {
            "mib" => o.mib = num()?.clamp(1, 1 << 16) as usize,
            "touchers" => o.touchers = num()?.clamp(1, 64) as usize,
            "thp" => o.thp = v == "on",
            "go" => o.go = Some(v.to_string()),
            "cpu" => o.cpu = num()?.min(1023) as usize,
            "seed" => o.seed = num()?,
            _ => return Err(format!("unknown argument {a:?}")),
        }
    }
    Ok(o)
}

/// Sum of the `HYP:` line of /proc/interrupts (async-PF page-ready interrupts); 0 without one.
fn hyp_count() -> u64 {
    let text = std::fs::read_to_string("/proc/interrupts").unwrap_or_default();
    text.lines()
        .find(|l| l.trim_start().starts_with("HYP:"))
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .map_while(|w| w.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0)
}

/// Pins the calling thread to `cpu` (so the compute thread can only run when a toucher waits).
fn pin(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET and sched_setaffinity take valid pointers.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// The filled region: base address of `pages` pages.
#[derive(Clone, Copy)]
struct Region {
    base: usize,
    pages: usize,
}

impl Region {
    fn map(mib: usize, thp: bool) -> Result<Region, String> {
        let len = mib * MIB;
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len + HUGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        let base = (map as usize).next_multiple_of(HUGE);
        if thp {
            // SAFETY: [base, base + len) lies inside the mapping; a failing madvise costs speed only.
            unsafe { libc::madvise(base as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
        }
        Ok(Region {
            base,
            pages: len / PAGE,
        })
    }

    fn page(&self, p: usize) -> *mut u64 {
        (self.base + p * PAGE) as *mut u64
    }

    fn fill(&self, seed: u64) {
        for p in 0..self.pages {
            for w in 0..WORDS {
                // SAFETY: p < pages and w < WORDS: inside the mapping.
                unsafe { self.page(p).add(w).write_volatile(pattern(seed, p as u64, w as u64)) };
            }
        }
    }

    /// Checks page `p`; true when every word is right.
    fn check(&self, seed: u64, p: usize) -> bool {
        (0..WORDS).all(|w| {
            // SAFETY: as in fill.
            let v = unsafe { self.page(p).add(w).read_volatile() };
            v == pattern(seed, p as u64, w as u64)
        })
    }
}

/// What one toucher saw.
struct Touched {
    bad: u64,
    max_page_us: u64,
}

fn main() {
    let o = match parse(std::env::args().skip(1)) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("apf-touch: {e}");
            std::process::exit(2);
        }
    };
    let region = match Region::map(o.mib, o.thp) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("apf-touch: {e}");
            std::process::exit(2);
        }
    };
    let t = Instant::now();
    region.fill(o.seed);
    println!(
        "apf-touch: filled mib={} pages={} fill_ms={} hyp={}",
        o.mib,
        region.pages,
        t.elapsed().as_millis(),
        hyp_count()
    );
    if let Some(go) = &o.go {
        // Blocks until the host opens the FIFO for writing and writes.
        let mut b = [0u8; 1];
        if let Err(e) = std::fs::File::open(go).and_then(|mut f| f.read(&mut b)) {
            eprintln!("apf-touch: waiting on {go}: {e}");
            std::process::exit(2);
        }
    }
    pin(o.cpu);
    let hyp_before = hyp_count();
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let compute = {
        let (count, stop, cpu) = (count.clone(), stop.clone(), o.cpu);
        std::thread::spawn(move || {
            pin(cpu);
            let mut x = 1u64;
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..1000 {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                }
                std::hint::black_box(x);
                count.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let t0 = Instant::now();
    let c0 = count.load(Ordering::Relaxed);
    let touchers: Vec<_> = (0..o.touchers)
        .map(|i| {
            let (n, cpu, seed) = (o.touchers, o.cpu, o.seed);
            std::thread::spawn(move || {
                pin(cpu);
                let mut seen = Touched {
                    bad: 0,
                    max_page_us: 0,
                };
                for p in (i..region.pages).step_by(n) {
                    let t = Instant::now();
                    if !region.check(seed, p) {
                        seen.bad += 1;
                    }
                    seen.max_page_us = seen.max_page_us.max(t.elapsed().as_micros() as u64);
                }
                seen
            })
        })
        .collect();
    let (mut bad, mut max_page_us) = (0, 0);
    for h in touchers {
        match h.join() {
            Ok(s) => {
                bad += s.bad;
                max_page_us = max_page_us.max(s.max_page_us);
            }
            Err(_) => bad += 1,
        }
    }
    let (touch, c1) = (t0.elapsed(), count.load(Ordering::Relaxed));
    std::thread::sleep(Duration::from_millis(200));
    let (alone, c2) = (t0.elapsed() - touch, count.load(Ordering::Relaxed));
    stop.store(true, Ordering::Relaxed);
    let _ = compute.join();
    let per_ms = |units: u64, d: Duration| units as f64 / (d.as_secs_f64() * 1e3).max(1e-3);
    println!(
        "apf-touch: done pages={} bad={bad} touch_ms={} max_page_us={max_page_us} \
compute_during={:.1} compute_alone={:.1} hyp_before={hyp_before} hyp_after={}",
        region.pages,
        touch.as_millis(),
        per_ms(c1 - c0, touch),
        per_ms(c2 - c1, alone),
        hyp_count()
    );
    std::process::exit(if bad == 0 { 0 } else { 1 });
}

//! `apf pages=N [lazy=ADDR] [expect_async=0|1] [selftest=1]`: async page faults, the guest side
//! (issue 4). tern serves guest RAM lazily from a file (`--memory ...,lazy-from=FILE`), the host
//! test wrote `apf_pattern(X)` at every qword X of [lazy, lazy + N pages) (default lazy = 64 MiB,
//! N = 64). With async PF enabled (when CPUID offers it), two tasks run at CPL3 with IF = 1:
//! T touches the pages in order and checks every qword; C counts, and runs only while T is
//! parked on a PAGE_NOT_PRESENT, until the PAGE_READY wakes T (`sched.rs`). When T is done:
//!
//! `tern-guest: apf pages=N faults=F async=A readies=R matched=M compute=C compute_during_waits=W`
//!
//! then PASS if every page held the pattern and, with `expect_async=1`, A > 0 and M == A.
//! Without async PF every first touch just blocks the vCPU (A = 0, C = 0).
//!
//! `fill=1` writes the pattern itself first (no lazy file needed): for a migration that should
//! carry the pages from ordinary memory (postcopy benchmarks).
//!
//! `selftest=1` needs no lazy memory: the pages are touched unchecked, then the tasks fake the
//! host's side (`selftest.rs`) to exercise NOT_PRESENT/READY pairs, a READY before its
//! NOT_PRESENT, and a wake-all.

mod sched;
mod selftest;

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::{Env, Suite};
use crate::rt::platform::{MAX_CPUS, USER_STACK_SIZE};
use crate::rt::{apf, cpu, smp, Fail};

pub const SUITE: Suite = Suite { name: "apf", run };

const PAGE: u64 = 4096;
const MAX_PAGES: u64 = 1 << 20;
/// The compute task gives up when T waits longer than this for a page-ready.
const TIMEOUT_S: u64 = 30;

/// What the host's file holds at guest physical address `x` (each u64).
pub fn apf_pattern(x: u64) -> u64 {
    x.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x7465_726E_6170_6621
}

// Set by `run` before the tasks start, read by them.
static LAZY: AtomicU64 = AtomicU64::new(0);
static PAGES: AtomicU64 = AtomicU64::new(0);
static SELFTEST: AtomicBool = AtomicBool::new(false);
static TSC_KHZ: AtomicU64 = AtomicU64::new(0);

// Results of the tasks.
static COMPUTE: AtomicU64 = AtomicU64::new(0);
static PAGES_OK: AtomicU64 = AtomicU64::new(0);
static BAD_ADDR: AtomicU64 = AtomicU64::new(0);
static BAD_GOT: AtomicU64 = AtomicU64::new(0);

fn run(env: &Env) -> Result<(), Fail> {
    let pages = env.arg_u64("pages", 64)?;
    let lazy = env.arg_u64("lazy", 0x400_0000)?;
    let expect_async = env.arg_u64("expect_async", 0)? != 0;
    let selftest = env.arg_u64("selftest", 0)? != 0;
    // Wait this long (after enabling async PF, before touching) so a host can migrate the guest
    // first: then the lazy pages come from postcopy instead of the file.
    let delay_ms = env.arg_u64("delay_ms", 0)?;
    // Keep the VM alive this long after the result (e.g. until a postcopy has ended).
    let hold_ms = env.arg_u64("hold_ms", 0)?;
    let fill = env.arg_u64("fill", 0)? != 0;
    if pages == 0 || pages > MAX_PAGES {
        return Err(crate::fail!("pages={pages} must be in 1..={MAX_PAGES}"));
    }
    let end = lazy + pages * PAGE;
    if !lazy.is_multiple_of(PAGE) || lazy < env.image_end() {
        return Err(crate::fail!(
            "lazy={lazy:#x} must be page aligned and above the image (ends {:#x})",
            env.image_end()
        ));
    }
    if !env.boot.ram_regions().any(|(s, e)| s <= lazy && end <= e) {
        return Err(crate::fail!("[{lazy:#x}, {end:#x}) is not RAM"));
    }
    if fill {
        for x in (lazy..end).step_by(8) {
            // SAFETY: checked above: RAM above the image, identity mapped, user-writable.
            unsafe { core::ptr::write_volatile(x as *mut u64, apf_pattern(x)) };
        }
    }
    LAZY.store(lazy, Ordering::Relaxed);
    PAGES.store(pages, Ordering::Relaxed);
    SELFTEST.store(selftest, Ordering::Relaxed);
    TSC_KHZ.store(
        if env.tsc_khz == 0 {
            3_000_000
        } else {
            env.tsc_khz
        },
        Ordering::Relaxed,
    );

    let features = apf::features();
    let on = apf::offered(features);
    crate::report!(
        "apf cpuid 0x40000001 eax={features:#x}: {}",
        if on {
            "async PF enabled (vector 0xf3)"
        } else {
            "async PF not offered, lazy pages block the vCPU"
        }
    );
    if expect_async && !on {
        return Err(crate::fail!(
            "expect_async=1 but CPUID does not offer async PF"
        ));
    }
    if on {
        apf::enable(features);
    }
    if delay_ms > 0 {
        spin_ms(delay_ms);
        crate::report!("apf: waited {delay_ms} ms, touching now");
    }
    let hook = if selftest {
        Some(selftest::on_fault as fn(u32, bool))
    } else {
        None
    };
    // Stacks: those of CPUs that are not online (in the image's bss). tern does not populate
    // bss, so they are touched here first, with IF = 0 (a lazy page then just blocks): a
    // task's first stack touch would otherwise be an async fault of its own.
    let stack = |i: usize| {
        let top = smp::spare_user_stack(i).ok_or_else(|| {
            crate::fail!(
                "needs 4 spare CPU stacks: run with at most {} vCPUs",
                MAX_CPUS - 4
            )
        })?;
        for page in (top - USER_STACK_SIZE as u64..top).step_by(PAGE as usize) {
            // SAFETY: a stack no CPU uses (spare_user_stack), in the image, identity mapped.
            unsafe { core::ptr::read_volatile(page as *const u64) };
        }
        Ok::<u64, Fail>(top)
    };
    sched::init(&COMPUTE, 0, hook);
    sched::spawn(toucher, true, stack(0)?);
    if selftest {
        sched::spawn(selftest::waiter, true, stack(1)?);
    }
    sched::spawn(compute, false, stack(2)?);
    let t0 = cpu::rdtsc();
    sched::run(stack(3)?);
    let ms = (cpu::rdtsc() - t0) / TSC_KHZ.load(Ordering::Relaxed);
    if on {
        apf::disable();
    }

    let s = sched::stats();
    crate::report!(
        "apf pages={pages} faults={} async={} readies={} matched={} compute={} compute_during_waits={}",
        s.faults,
        s.parked,
        s.readies,
        s.matched,
        COMPUTE.load(Ordering::Relaxed),
        s.compute_during_waits
    );
    let (sleepers, ready_left) = sched::leftovers();
    crate::report!(
        "apf detail: ms={ms} ready_first={} wake_alls={} woken_by_all={} spurious={} stale={} \
         idle_waits={} lost={} left: sleepers={sleepers} readies={ready_left}",
        s.ready_first,
        s.wake_alls,
        s.woken_by_all,
        s.spurious,
        s.stale,
        s.idle_waits,
        apf::lost()
    );
    if apf::lost() != 0 {
        return Err(crate::fail!(
            "{} async-PF events lost (queue full)",
            apf::lost()
        ));
    }
    if s.faults != s.parked + s.ready_first {
        return Err(crate::fail!(
            "faults={} but parked={} + ready_first={}",
            s.faults,
            s.parked,
            s.ready_first
        ));
    }
    if selftest {
        return selftest::check(&s, pages);
    }
    let ok = PAGES_OK.load(Ordering::Relaxed);
    if ok != pages {
        let addr = BAD_ADDR.load(Ordering::Relaxed);
        return Err(crate::fail!(
            "{} of {pages} pages wrong; first at {addr:#x}: {:#018x}, expected {:#018x}",
            pages - ok,
            BAD_GOT.load(Ordering::Relaxed),
            apf_pattern(addr)
        ));
    }
    if expect_async && (s.parked == 0 || s.matched != s.parked) {
        return Err(crate::fail!(
            "expected async page faults: async={} matched={}",
            s.parked,
            s.matched
        ));
    }
    if hold_ms > 0 {
        crate::report!("apf: all checks passed, holding {hold_ms} ms");
        spin_ms(hold_ms);
    }
    Ok(())
}

/// Busy-waits `ms` milliseconds at CPL3 (the TSC rate is known by then).
fn spin_ms(ms: u64) {
    let khz = TSC_KHZ.load(Ordering::Relaxed);
    let t0 = crate::rt::cpu::rdtsc();
    while crate::rt::cpu::rdtsc().wrapping_sub(t0) < ms * khz {
        crate::rt::cpu::pause();
    }
}

/// Task T: reads every qword of the lazy pages in order (checking them unless selftest).
fn toucher(_: usize) {
    let lazy = LAZY.load(Ordering::Relaxed);
    let pages = PAGES.load(Ordering::Relaxed);
    let selftest = SELFTEST.load(Ordering::Relaxed);
    for p in 0..pages {
        let base = lazy + p * PAGE;
        let mut ok = true;
        for q in 0..PAGE / 8 {
            let x = base + 8 * q;
            // SAFETY: `run` checked that [lazy, lazy + pages) is RAM above the image (identity
            // mapped, user-readable); nothing else uses it.
            let got = unsafe { core::ptr::read_volatile(x as *const u64) };
            if !selftest && got != apf_pattern(x) {
                if BAD_ADDR.load(Ordering::Relaxed) == 0 {
                    BAD_ADDR.store(x, Ordering::Relaxed);
                    BAD_GOT.store(got, Ordering::Relaxed);
                }
                ok = false;
            }
        }
        if ok {
            PAGES_OK.fetch_add(1, Ordering::Relaxed);
        }
    }
    if selftest {
        selftest::script(pages);
    }
}

/// Task C: counts; yields nothing (it runs while T is parked). Also the selftest's fake host,
/// and the watchdog for a page-ready that never comes.
fn compute(_: usize) {
    let selftest = SELFTEST.load(Ordering::Relaxed);
    let mut n = 0u64;
    loop {
        n += 1;
        COMPUTE.store(n, Ordering::Relaxed);
        if n.is_multiple_of(4096) {
            if selftest {
                selftest::host_step();
            }
            if n.is_multiple_of(1 << 20) {
                check_timeout();
            }
        }
    }
}

fn check_timeout() {
    let since = sched::WATCH_PARKED_TSC.load(Ordering::Relaxed);
    let limit = TIMEOUT_S * 1000 * TSC_KHZ.load(Ordering::Relaxed);
    if since != 0 && cpu::rdtsc().wrapping_sub(since) > limit {
        crate::rt::finish(Err(crate::fail!(
            "task T parked on token {:#x} for over {TIMEOUT_S} s: no page-ready",
            sched::WATCH_TOKEN.load(Ordering::Relaxed)
        )));
    }
}

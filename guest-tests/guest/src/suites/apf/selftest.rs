//! `apf selftest=1`: exercises the handlers and the scheduler without lazy memory, the guest
//! playing the host's part.
//!
//! A fake PAGE_NOT_PRESENT: the task sets the area's `flags` = 1 and reads a target variable
//! through an alias in an unmapped PML4 slot (slot k maps like slot 0 when present), so the
//! #PF's CR2 is `k << 39 | &target` and the token (CR2's low 32 bits) is the target's address.
//! The fake host (`on_fault`, called by the scheduler for each NOT_PRESENT) maps the alias
//! slots, so the read works once the task is resumed, and notes the parked token; the compute
//! task (`host_step`) answers it later with a page-ready self-IPI carrying the token.
//!
//! Script: task T does `pages` NOT_PRESENT/READY pairs, then sends the READY for a token
//! before faulting on it (the task must just continue), then parks on a wake-all token; task U
//! parked on the other wake-all token at its start. With both parked the host sends ~0, which
//! must wake both.

use core::sync::atomic::{compiler_fence, AtomicU32, AtomicU64, Ordering};

use super::sched::Stats;
use crate::rt::{apf, user, Fail};

const MAGIC: u64 = 0x5e1f_7e57_0000_0000;
/// Alias slots: T uses 1, U uses 2.
const SLOT_T: u64 = 1;
const SLOT_U: u64 = 2;

static TARGETS: [AtomicU64; 4] = [
    AtomicU64::new(MAGIC | 1),
    AtomicU64::new(MAGIC | 2),
    AtomicU64::new(MAGIC | 3),
    AtomicU64::new(MAGIC | 4),
];
static TARGET_READY_FIRST: AtomicU64 = AtomicU64::new(MAGIC | 5);
static TARGET_U: AtomicU64 = AtomicU64::new(MAGIC | 6);
static TARGET_T_ALL: AtomicU64 = AtomicU64::new(MAGIC | 7);

/// Parked tokens the fake host has not answered yet (0 = free).
static REQUESTS: [AtomicU32; 4] = [const { AtomicU32::new(0) }; 4];
/// Reads through an alias that returned the wrong value.
static BAD_READS: AtomicU64 = AtomicU64::new(0);
static U_DONE: AtomicU64 = AtomicU64::new(0);

fn token(target: &AtomicU64) -> u32 {
    target.as_ptr() as u64 as u32
}

fn pml4() -> *mut u64 {
    (user::read_cr(3) & !0xfff) as *mut u64
}

/// Maps (PML4 slot `slot` = slot 0) or unmaps an alias slot, then flushes the TLB.
fn set_alias(slots: &[u64], present: bool) {
    let pml4 = pml4();
    for &slot in slots {
        // SAFETY: the guest's own PML4 (identity mapped, user-writable); slots 1 and 2 are
        // unused by everything else, so only these aliases change.
        unsafe {
            let entry = if present { pml4.read_volatile() } else { 0 };
            pml4.add(slot as usize).write_volatile(entry);
        }
    }
    user::write_cr3(pml4 as u64);
}

/// Reads `target` through its alias in slot `slot`, which is made unmapped first: the #PF is a
/// fake PAGE_NOT_PRESENT, and the read is retried when the scheduler resumes the task.
fn fake_fault(slot: u64, target: &AtomicU64) {
    set_alias(&[slot], false);
    apf::fake_not_present();
    compiler_fence(Ordering::SeqCst);
    let alias = (slot << 39) | target.as_ptr() as u64;
    // SAFETY: the alias is unmapped now: the read faults, the task parks (or continues after an
    // early READY), and by the time it is resumed `on_fault` has mapped the slot like slot 0,
    // so the retried read reads `target`.
    let got = unsafe { core::ptr::read_volatile(alias as *const u64) };
    if got != target.load(Ordering::Relaxed) {
        BAD_READS.fetch_add(1, Ordering::Relaxed);
    }
}

/// The scheduler's hook: the "host" makes the page present and, if the task parked, owes it a
/// page-ready. Runs in the upcall (IF = 0).
pub fn on_fault(token: u32, parked: bool) {
    set_alias(&[SLOT_T, SLOT_U], true);
    if parked {
        match REQUESTS.iter().find(|r| r.load(Ordering::Relaxed) == 0) {
            Some(r) => r.store(token, Ordering::Relaxed),
            None => crate::rt::finish(Err(Fail::from("apf selftest: too many requests"))),
        }
    }
}

/// The fake host's turn (in the compute task, IF = 1): answers one request, or both wake-all
/// tokens at once with ~0. The self-IPI preempts the caller right away.
pub fn host_step() {
    let group = [token(&TARGET_U), token(&TARGET_T_ALL)];
    let pending = |t: u32| REQUESTS.iter().any(|r| r.load(Ordering::Relaxed) == t);
    if group.iter().all(|&t| pending(t)) {
        for r in &REQUESTS {
            if group.contains(&r.load(Ordering::Relaxed)) {
                r.store(0, Ordering::Relaxed);
            }
        }
        apf::send_ready(apf::TOKEN_WAKE_ALL);
        return;
    }
    for r in &REQUESTS {
        let t = r.load(Ordering::Relaxed);
        if t != 0 && !group.contains(&t) {
            r.store(0, Ordering::Relaxed);
            apf::send_ready(t);
            return;
        }
    }
}

/// Task T's part, after the pages.
pub fn script(pages: u64) {
    for i in 0..pages {
        fake_fault(SLOT_T, &TARGETS[(i % 4) as usize]);
    }
    apf::send_ready(token(&TARGET_READY_FIRST));
    fake_fault(SLOT_T, &TARGET_READY_FIRST);
    fake_fault(SLOT_T, &TARGET_T_ALL);
}

/// Task U: parks on its wake-all token at once.
pub fn waiter(_: usize) {
    fake_fault(SLOT_U, &TARGET_U);
    U_DONE.store(1, Ordering::Relaxed);
}

/// The selftest's verdict from the scheduler's counters.
pub fn check(s: &Stats, pages: u64) -> Result<(), Fail> {
    let bad = BAD_READS.load(Ordering::Relaxed);
    let want = [
        ("faults", s.faults, pages + 3),
        ("async", s.parked, pages + 2),
        ("ready_first", s.ready_first, 1),
        ("woken_by_all", s.woken_by_all, 2),
        ("matched", s.matched, pages + 3),
        ("spurious", s.spurious, 0),
        ("stale", s.stale, 0),
        ("bad alias reads", bad, 0),
        ("U done", U_DONE.load(Ordering::Relaxed), 1),
    ];
    for (what, got, expected) in want {
        if got != expected {
            return Err(crate::fail!("selftest: {what}={got}, expected {expected}"));
        }
    }
    if s.compute_during_waits == 0 {
        return Err(Fail::from(
            "selftest: no compute progress while T was parked",
        ));
    }
    Ok(())
}

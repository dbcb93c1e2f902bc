//! `dirty mib=W [static=S] [rounds=N] [verify=0]`: the migration workload. Every round rewrites a
//! W MiB working set with the round's counter mixed into each qword, then verifies it and an S MiB
//! region written once at the start. A page that a migration lost or sent stale fails the check.
//! `verify=0` skips the checks: a guest that only writes (benchmarks of its write rate; with the
//! read-back, precopy can find nothing dirty while the guest reads and converge early).
//! `flush=N` flushes N working-set pages a round through pc-testdev (a guest poking the test
//! device while a migration copies those pages).
//! Prints `dirty round=R checksum=C` about four times a second; with `rounds=N` it ends with PASS
//! after N rounds, otherwise it runs until the VM is stopped.

use super::{Env, Suite};
use crate::rt::{cpu, Fail};

pub const SUITE: Suite = Suite { name: "dirty", run };

const MIB: u64 = 1 << 20;

fn value(addr: u64, round: u64) -> u64 {
    let x = (addr ^ round.rotate_left(32)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^ (x >> 31) ^ round
}

/// Fills `[base, base + qwords*8)` with round `round`'s values.
fn fill(base: u64, qwords: usize, round: u64) {
    let p = base as *mut u64;
    for i in 0..qwords {
        // SAFETY: the caller's range is free RAM above the guest image, identity mapped, user-writable.
        unsafe { core::ptr::write_volatile(p.add(i), value(base + 8 * i as u64, round)) };
    }
}

/// Verifies a range written by `fill`, folding it into `checksum`.
fn verify(base: u64, qwords: usize, round: u64, checksum: &mut u64) -> Result<(), Fail> {
    let p = base as *const u64;
    for i in 0..qwords {
        let addr = base + 8 * i as u64;
        // SAFETY: as in `fill`.
        let got = unsafe { core::ptr::read_volatile(p.add(i)) };
        let want = value(addr, round);
        if got != want {
            return Err(crate::fail!(
                "round {round}: {addr:#x} holds {got:#018x}, expected {want:#018x}"
            ));
        }
        *checksum = checksum.rotate_left(5) ^ got;
    }
    Ok(())
}

/// pc-testdev's flush-page port (`--testdev on`): the VMM makes KVM drop its mapping of a page.
const TESTDEV_FLUSH: u16 = 0xe4;

/// Flushes `count` pages of the `pages`-page range at `base`, a different run each round.
fn flush_pages(base: u64, pages: u64, round: u64, count: u64) {
    for i in 0..count {
        let page = round.wrapping_mul(count).wrapping_add(i) % pages;
        cpu::outl(TESTDEV_FLUSH, (base + page * 4096) as u32);
    }
}

fn run(env: &Env) -> Result<(), Fail> {
    let mib = env.arg_u64("mib", 16)?;
    let static_mib = env.arg_u64("static", 16)?;
    let rounds = env.arg_u64("rounds", 0)?;
    let check = env.arg_u64("verify", 1)? != 0;
    let flush = env.arg_u64("flush", 0)?;
    if mib == 0 {
        return Err(crate::fail!("mib must be > 0"));
    }
    let start = env.free_ram(mib + static_mib)?;
    let work = start;
    let work_q = (mib * MIB / 8) as usize;
    let stat = start + mib * MIB;
    let stat_q = (static_mib * MIB / 8) as usize;
    // The static region carries "round" u64::MAX, which the working set never uses.
    fill(stat, stat_q, u64::MAX);
    let khz = env.tsc_khz;
    let report_every = if khz == 0 { 0 } else { khz * 250 };
    let mut last_report = cpu::rdtsc();
    let mut round = 1u64;
    loop {
        fill(work, work_q, round);
        flush_pages(work, mib * MIB / 4096, round, flush);
        let mut checksum = 0u64;
        if check {
            verify(work, work_q, round, &mut checksum)?;
            verify(stat, stat_q, u64::MAX, &mut checksum)?;
        }
        let now = cpu::rdtsc();
        let due = if report_every == 0 {
            round.is_multiple_of(16)
        } else {
            now.wrapping_sub(last_report) >= report_every
        };
        if due || round == rounds {
            crate::report!("dirty round={round} checksum={checksum:#018x}");
            last_report = now;
        }
        if round == rounds {
            return Ok(());
        }
        round += 1;
    }
}

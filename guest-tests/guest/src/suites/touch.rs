//! `touch mib=N [seed=S] [touches=T]`: random-access reader, the postcopy latency workload (after
//! QEMU's random-access postcopy test). Fills N MiB with a per-page pattern once, then reads one
//! qword of a random page at a time and checks it, forever (or T touches). Prints
//! `touch n=COUNT max_us=M` about four times a second: COUNT is the running total of touches, M
//! the longest single touch since the last line (a page fetched from a migration source shows up
//! there). A page with the wrong content fails the suite.

use super::{Env, Suite};
use crate::rt::{cpu, Fail};

pub const SUITE: Suite = Suite { name: "touch", run };

const PAGE: u64 = 4096;

fn pattern(addr: u64) -> u64 {
    let x = addr.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^ (x >> 29) ^ 0x746f_7563_6800_0000
}

fn run(env: &Env) -> Result<(), Fail> {
    let mib = env.arg_u64("mib", 64)?;
    let mut rng = env.arg_u64("seed", 0x2545_f491_4f6c_dd1d)? | 1;
    let touches = env.arg_u64("touches", 0)?;
    if mib == 0 {
        return Err(crate::fail!("mib must be > 0"));
    }
    let base = env.free_ram(mib)?;
    let pages = mib * (1 << 20) / PAGE;
    for p in 0..pages {
        let addr = base + p * PAGE;
        // SAFETY: free RAM above the guest image, identity mapped, user-writable.
        unsafe { core::ptr::write_volatile(addr as *mut u64, pattern(addr)) };
    }
    crate::report!("touch filled mib={mib} pages={pages}");
    let khz = env.tsc_khz.max(1);
    let report_every = khz * 250;
    let (mut n, mut max_cycles, mut last_report) = (0u64, 0u64, cpu::rdtsc());
    loop {
        // xorshift64
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let addr = base + (rng % pages) * PAGE;
        let t0 = cpu::rdtsc();
        // SAFETY: as above.
        let got = unsafe { core::ptr::read_volatile(addr as *const u64) };
        let dt = cpu::rdtsc().wrapping_sub(t0);
        if got != pattern(addr) {
            return Err(crate::fail!(
                "touch {n}: {addr:#x} holds {got:#018x}, expected {:#018x}",
                pattern(addr)
            ));
        }
        max_cycles = max_cycles.max(dt);
        n += 1;
        let now = cpu::rdtsc();
        let done = touches != 0 && n >= touches;
        if now.wrapping_sub(last_report) >= report_every || done {
            crate::report!("touch n={n} max_us={}", max_cycles * 1000 / khz);
            last_report = now;
            max_cycles = 0;
        }
        if done {
            return Ok(());
        }
    }
}

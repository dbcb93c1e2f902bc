//! `memtest mib=N [seed=S]`: writes a per-qword pattern (a bijective mix of the address and the
//! seed, so aliasing addresses are caught) over N MiB of RAM above the guest image at CPL3, reads
//! it back, and reports a checksum and the bandwidths.

use super::{Env, Suite};
use crate::rt::{cpu, Fail};

pub const SUITE: Suite = Suite {
    name: "memtest",
    run,
};

const MIB: u64 = 1 << 20;
const DEFAULT_SEED: u64 = 0x7465_726e_6d74_7374;

fn pattern(addr: u64, seed: u64) -> u64 {
    let x = (addr ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^ (x >> 29)
}

/// MB/s (10^6 bytes) for `bytes` moved in `cycles` TSC cycles at `khz`.
fn mb_per_s(bytes: u64, cycles: u64, khz: u64) -> u64 {
    (bytes as u128 * khz as u128 / (cycles.max(1) as u128 * 1000)) as u64
}

fn run(env: &Env) -> Result<(), Fail> {
    let mib = env.arg_u64("mib", 64)?;
    let seed = env.arg_u64("seed", DEFAULT_SEED)?;
    if mib == 0 {
        return Err(crate::fail!("mib must be > 0"));
    }
    let start = env.free_ram(mib)?;
    let bytes = mib * MIB;
    let base = start as *mut u64;
    let qwords = (bytes / 8) as usize;

    let t0 = cpu::rdtsc();
    for i in 0..qwords {
        // SAFETY: [start, start + bytes) is RAM (e820) above the image that nothing else uses,
        // identity mapped and user-writable.
        unsafe { core::ptr::write_volatile(base.add(i), pattern(start + 8 * i as u64, seed)) };
    }
    let t1 = cpu::rdtsc();
    let mut checksum = 0u64;
    for i in 0..qwords {
        let addr = start + 8 * i as u64;
        // SAFETY: as above; written by the loop before.
        let got = unsafe { core::ptr::read_volatile(base.add(i)) };
        let want = pattern(addr, seed);
        if got != want {
            return Err(crate::fail!(
                "mismatch at {addr:#x}: read {got:#018x}, expected {want:#018x}"
            ));
        }
        checksum = checksum.rotate_left(1) ^ got;
    }
    let t2 = cpu::rdtsc();

    let khz = env.tsc_khz;
    if khz == 0 {
        crate::report!("memtest mib={mib} checksum={checksum:#018x} write=? MB/s verify=? MB/s (TSC rate unknown)");
    } else {
        crate::report!(
            "memtest mib={mib} checksum={checksum:#018x} write={} MB/s verify={} MB/s",
            mb_per_s(bytes, t1 - t0, khz),
            mb_per_s(bytes, t2 - t1, khz)
        );
    }
    Ok(())
}

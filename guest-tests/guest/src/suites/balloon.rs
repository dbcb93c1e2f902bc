//! `balloon [pool=MIB] [cycles=N] [timeout_s=S]`: a virtio-balloon driver (tern `--balloon`).
//! The device is found where tern's command-line parameter `virtio_mmio.device=4K@ADDR:IRQ`
//! says. The suite polls the target size (config `num_pages`) and follows it with pages from a
//! pool of MIB (default 64) above the image: before inflating, every page is filled with a
//! pattern; after deflating, each page is checked: all zeros (the host discarded it), all
//! pattern (the host kept it) or mixed (wrong). Each time the balloon has gone up and back to
//! empty it reports
//!
//! `tern-guest: balloon cycle=C inflated=P zero=Z kept=K mixed=M`
//!
//! and after N cycles (default 1) it passes if no page was mixed. It fails if the target does
//! not change for S seconds (default 300).

mod virtq;

use super::{Env, Suite};
use crate::rt::{cpu, Fail};
use virtq::{Device, Ring};

pub const SUITE: Suite = Suite {
    name: "balloon",
    run,
};

const DEVICE_ID: u32 = 5;
const PAGE: u64 = 4096;
/// PFNs per inflate/deflate buffer (Linux uses the same batch).
const BATCH: usize = 256;

static mut INFLATE_RING: Ring = Ring::new();
static mut DEFLATE_RING: Ring = Ring::new();
static mut PFNS: [u32; BATCH] = [0; BATCH];

/// What a ballooned page holds before it is given to the host.
fn pattern(addr: u64) -> u64 {
    addr ^ 0x6261_6c6c_6f6f_6e21
}

/// The MMIO window from `virtio_mmio.device=4K@0xd0000000:5`.
fn device_base(env: &Env) -> Result<usize, Fail> {
    let spec = env.boot.arg("virtio_mmio.device").ok_or_else(|| {
        crate::fail!("no virtio_mmio.device= on the command line: start tern with --balloon")
    })?;
    let addr = spec
        .split_once('@')
        .map(|(_, rest)| rest.split(':').next().unwrap_or(rest))
        .and_then(|a| a.strip_prefix("0x"))
        .and_then(|hex| usize::from_str_radix(hex, 16).ok())
        .ok_or_else(|| crate::fail!("cannot parse virtio_mmio.device={spec}"))?;
    Ok(addr)
}

#[derive(Default)]
struct Cycle {
    inflated: u64,
    zero: u64,
    kept: u64,
    mixed: u64,
}

fn run(env: &Env) -> Result<(), Fail> {
    let pool_mib = env.arg_u64("pool", 64)?;
    let cycles = env.arg_u64("cycles", 1)?;
    let timeout_s = env.arg_u64("timeout_s", 300)?;
    let khz = if env.tsc_khz == 0 {
        3_000_000
    } else {
        env.tsc_khz
    };
    let pool = env.free_ram(pool_mib)?;
    let pool_pages = pool_mib * (1 << 20) / PAGE;

    let dev = Device::probe(device_base(env)?, DEVICE_ID)?;
    // SAFETY: the rings are only ever used through these two queues, created once here.
    let (mut inflate, mut deflate) = unsafe {
        (
            dev.setup_queue(0, &mut *core::ptr::addr_of_mut!(INFLATE_RING))?,
            dev.setup_queue(1, &mut *core::ptr::addr_of_mut!(DEFLATE_RING))?,
        )
    };
    dev.driver_ok()?;
    crate::report!("balloon: driver ready, pool {pool_mib} MiB at {pool:#x}");
    // SAFETY: only this suite (one CPU) uses the PFN buffer.
    let pfns = unsafe { &mut *core::ptr::addr_of_mut!(PFNS) };
    let pfns_addr = pfns.as_ptr() as u64;
    let queue_timeout = 60 * 1000 * khz;

    let mut held = 0u64;
    let mut cycle = Cycle::default();
    let mut done = 0;
    let mut last_change = cpu::rdtsc();
    let mut reported_target = u64::MAX;
    while done < cycles {
        let target = u64::from(dev.config_read(0));
        if target != reported_target {
            crate::report!("balloon: target {target} pages, holding {held}");
            reported_target = target;
            last_change = cpu::rdtsc();
        }
        let want = target.min(pool_pages);
        if want > held {
            let n = (want - held).min(BATCH as u64);
            for (i, slot) in pfns.iter_mut().take(n as usize).enumerate() {
                let addr = pool + (held + i as u64) * PAGE;
                for q in (addr..addr + PAGE).step_by(8) {
                    // SAFETY: a pool page above the image (free RAM, identity mapped, user
                    // writable) that the balloon does not hold yet.
                    unsafe { core::ptr::write_volatile(q as *mut u64, pattern(q)) };
                }
                *slot = (addr / PAGE) as u32;
            }
            inflate.send(&dev, pfns_addr, (n * 4) as u32, queue_timeout)?;
            held += n;
            cycle.inflated += n;
            dev.config_write(4, held as u32);
            last_change = cpu::rdtsc();
        } else if want < held {
            let n = (held - want).min(BATCH as u64);
            let first = held - n;
            for (i, slot) in pfns.iter_mut().take(n as usize).enumerate() {
                *slot = ((pool + (first + i as u64) * PAGE) / PAGE) as u32;
            }
            deflate.send(&dev, pfns_addr, (n * 4) as u32, queue_timeout)?;
            for p in first..held {
                match check_page(pool + p * PAGE) {
                    PageIs::Zero => cycle.zero += 1,
                    PageIs::Kept => cycle.kept += 1,
                    PageIs::Mixed => cycle.mixed += 1,
                }
            }
            held = first;
            dev.config_write(4, held as u32);
            last_change = cpu::rdtsc();
            if held == 0 {
                done += 1;
                crate::report!(
                    "balloon cycle={done} inflated={} zero={} kept={} mixed={}",
                    cycle.inflated,
                    cycle.zero,
                    cycle.kept,
                    cycle.mixed
                );
                if cycle.mixed > 0 {
                    return Err(crate::fail!(
                        "{} deflated pages were neither discarded nor intact",
                        cycle.mixed
                    ));
                }
                cycle = Cycle::default();
            }
        } else {
            if cpu::rdtsc().wrapping_sub(last_change) > timeout_s * 1000 * khz {
                return Err(crate::fail!(
                    "balloon: no new target for {timeout_s} s (holding {held} pages)"
                ));
            }
            // Poll about once a millisecond: each config read is an exit to tern.
            let t0 = cpu::rdtsc();
            while cpu::rdtsc().wrapping_sub(t0) < khz {
                cpu::pause();
            }
        }
    }
    Ok(())
}

enum PageIs {
    Zero,
    Kept,
    Mixed,
}

fn check_page(addr: u64) -> PageIs {
    let (mut zero, mut kept) = (true, true);
    for q in (addr..addr + PAGE).step_by(8) {
        // SAFETY: a pool page the balloon just gave back to this guest.
        let v = unsafe { core::ptr::read_volatile(q as *const u64) };
        zero &= v == 0;
        kept &= v == pattern(q);
    }
    match (zero, kept) {
        (true, _) => PageIs::Zero,
        (_, true) => PageIs::Kept,
        _ => PageIs::Mixed,
    }
}

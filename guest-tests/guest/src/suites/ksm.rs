//! `ksm [mib=N] [allocators=K]`: the KSM test's guest allocator (after KVM-autotest's
//! allocator.c), driven by the host over COM2, one command per line, each answered with one line
//! `PASS <command> key=value...` or `FAIL <command> <reason>`:
//!
//! | command | does |
//! |---|---|
//! | `alloc MIB` | reserves the test region (free RAM above the image; also `mib=` at boot) |
//! | `fill VALUE` | writes byte VALUE to every byte of the region (0: zeros, the merge phase) |
//! | `verify VALUE` | checks that every byte is VALUE |
//! | `init KEY` | sets the key of the random series |
//! | `srandom [KEY]` | fills the region with the series of KEY (default: `init`'s): splits merged pages |
//! | `srverify [KEY]` | checks the series |
//! | `info` | region size, allocators, CPUs |
//! | `exit` | answers and ends the suite with PASS |
//!
//! Replies carry `us=` (elapsed guest time, µs) so the host can compute MB/s. With
//! `allocators=K` the region is cut into K equal parts, each worked on by its own allocator;
//! allocator i runs on CPU i mod cpus (time-sliced when K > cpus) and replies aggregate: `us=`
//! is the wall time of the whole command. The series is `series(key, q)` for qword q of the
//! region, independent of guest addresses and of K, so `ksm-alloc` (Linux) produces the same.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::{Env, Suite};
use crate::rt::com2::Com2;
use crate::rt::platform::WAKE_VECTOR;
use crate::rt::{cpu, smp, user, Fail};

pub const SUITE: Suite = Suite { name: "ksm", run };

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
const MAX_ALLOCATORS: usize = 16;
const MAX_RANGES: usize = 8;

/// The random series: a splitmix64 of the key and the qword index.
fn series(key: u64, q: u64) -> u64 {
    let mut z = (key ^ q.wrapping_mul(0x9e37_79b9_7f4a_7c15)).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
enum Op {
    Fill = 1,
    Verify = 2,
    Srandom = 3,
    Srverify = 4,
}

/// The job every CPU works on; written by the BSP before it hands the job out (Release through
/// the mailbox), read by the workers.
struct Job {
    op: AtomicU64,
    arg: AtomicU64,
    allocators: AtomicU64,
    cpus: AtomicU64,
    /// Region pages, and its RAM ranges as (start, pages).
    pages: AtomicU64,
    ranges: [(AtomicU64, AtomicU64); MAX_RANGES],
    nranges: AtomicU64,
    /// Per allocator: 0 or the address of the first mismatch, with what was there.
    bad_addr: [AtomicU64; MAX_ALLOCATORS],
    bad_got: [AtomicU64; MAX_ALLOCATORS],
    /// CPUs that finished; `all_done` turns 1 with the last, which wakes the BSP.
    done: AtomicU64,
    all_done: AtomicU64,
    bsp_apic: AtomicU32,
}

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicU64 = AtomicU64::new(0);
#[allow(clippy::declare_interior_mutable_const)]
const ZERO_PAIR: (AtomicU64, AtomicU64) = (AtomicU64::new(0), AtomicU64::new(0));
static JOB: Job = Job {
    op: ZERO,
    arg: ZERO,
    allocators: ZERO,
    cpus: ZERO,
    pages: ZERO,
    ranges: [ZERO_PAIR; MAX_RANGES],
    nranges: ZERO,
    bad_addr: [ZERO; MAX_ALLOCATORS],
    bad_got: [ZERO; MAX_ALLOCATORS],
    done: ZERO,
    all_done: ZERO,
    bsp_apic: AtomicU32::new(0),
};

/// Works on region pages [p0, p1): `f(address, first qword index, qwords)` per contiguous piece.
/// Returns the first (address, value found) that `f` reports.
fn for_each_piece(
    p0: u64,
    p1: u64,
    mut f: impl FnMut(u64, u64, usize) -> Option<(u64, u64)>,
) -> Option<(u64, u64)> {
    let mut base_page = 0u64;
    for r in JOB
        .ranges
        .iter()
        .take(JOB.nranges.load(Ordering::Acquire) as usize)
    {
        let (start, pages) = (r.0.load(Ordering::Relaxed), r.1.load(Ordering::Relaxed));
        let (lo, hi) = (p0.max(base_page), p1.min(base_page + pages));
        if lo < hi {
            let addr = start + (lo - base_page) * PAGE;
            if let Some(bad) = f(addr, lo * PAGE / 8, ((hi - lo) * PAGE / 8) as usize) {
                return Some(bad);
            }
        }
        base_page += pages;
    }
    None
}

/// One allocator's share of the job.
fn work_allocator(a: usize) {
    let (op, arg) = (
        JOB.op.load(Ordering::Acquire),
        JOB.arg.load(Ordering::Relaxed),
    );
    let (k, pages) = (
        JOB.allocators.load(Ordering::Relaxed),
        JOB.pages.load(Ordering::Relaxed),
    );
    let (p0, p1) = (pages * a as u64 / k, pages * (a as u64 + 1) / k);
    let bad = for_each_piece(p0, p1, |addr, q0, n| {
        // SAFETY: the region is RAM above the guest image that only this job's allocators touch,
        // each its own pages; identity mapped, user-writable, 8-byte aligned.
        let words = unsafe { core::slice::from_raw_parts_mut(addr as *mut u64, n) };
        let byte = (arg as u8) as u64 * 0x0101_0101_0101_0101;
        let at = |i: usize, got: u64| Some((addr + 8 * i as u64, got));
        if op == Op::Fill as u64 {
            // SAFETY: as above (write_bytes becomes `rep stosb`).
            unsafe { core::ptr::write_bytes(addr as *mut u8, arg as u8, n * 8) };
        } else if op == Op::Verify as u64 {
            if let Some(i) = words.iter().position(|&w| w != byte) {
                return at(i, words[i]);
            }
        } else if op == Op::Srandom as u64 {
            for (i, w) in words.iter_mut().enumerate() {
                *w = series(arg, q0 + i as u64);
            }
        } else if op == Op::Srverify as u64 {
            for (i, &w) in words.iter().enumerate() {
                if w != series(arg, q0 + i as u64) {
                    return at(i, w);
                }
            }
        }
        None
    });
    let (addr, got) = bad.unwrap_or((0, 0));
    JOB.bad_got[a].store(got, Ordering::Relaxed);
    JOB.bad_addr[a].store(addr, Ordering::Release);
}

/// A CPU's part of the job: allocators cpu, cpu + cpus, ...
fn work(cpu: usize, _arg: u64) {
    let (k, cpus) = (
        JOB.allocators.load(Ordering::Acquire) as usize,
        JOB.cpus.load(Ordering::Relaxed) as usize,
    );
    for a in (cpu..k).step_by(cpus.max(1)) {
        work_allocator(a);
    }
    if JOB.done.fetch_add(1, Ordering::AcqRel) + 1 == cpus as u64 {
        JOB.all_done.store(1, Ordering::Release);
        if cpu != 0 {
            cpu::send_ipi(JOB.bsp_apic.load(Ordering::Relaxed), 0x4000 | WAKE_VECTOR);
        }
    }
}

struct Allocator {
    /// Region pages (0 until `alloc`).
    pages: u64,
    allocators: usize,
    cpus: usize,
    key: u64,
    tsc_khz: u64,
}

impl Allocator {
    /// Reserves `mib` MiB of free RAM above the guest image.
    fn alloc(&mut self, env: &Env, mib: u64) -> Result<(), Fail> {
        if mib == 0 {
            return Err(Fail::from("mib must be > 0"));
        }
        let want = mib * MIB / PAGE;
        let free_from = env.image_end().next_multiple_of(2 * MIB);
        let (mut got, mut n) = (0u64, 0usize);
        for (s, e) in env.boot.ram_regions() {
            let s = s.max(free_from).next_multiple_of(PAGE);
            let e = e & !(PAGE - 1);
            if s >= e || got == want || n == MAX_RANGES {
                continue;
            }
            let take = ((e - s) / PAGE).min(want - got);
            JOB.ranges[n].0.store(s, Ordering::Relaxed);
            JOB.ranges[n].1.store(take, Ordering::Relaxed);
            got += take;
            n += 1;
        }
        if got < want {
            return Err(crate::fail!(
                "mib={mib} does not fit: {} MiB of RAM free above the guest image",
                got * PAGE / MIB
            ));
        }
        JOB.nranges.store(n as u64, Ordering::Release);
        JOB.pages.store(want, Ordering::Release);
        self.pages = want;
        Ok(())
    }

    /// Runs `op` over the whole region on every allocator; returns the elapsed µs.
    fn run_job(&self, op: Op, arg: u64) -> Result<u64, Fail> {
        if self.pages == 0 {
            return Err(Fail::from("no region: send `alloc MIB` first"));
        }
        let cpus = self.cpus.min(self.allocators);
        JOB.op.store(op as u64, Ordering::Relaxed);
        JOB.arg.store(arg, Ordering::Relaxed);
        JOB.allocators
            .store(self.allocators as u64, Ordering::Relaxed);
        JOB.cpus.store(cpus as u64, Ordering::Relaxed);
        JOB.done.store(0, Ordering::Relaxed);
        JOB.all_done.store(0, Ordering::Release);
        let t0 = cpu::rdtsc();
        for c in 1..cpus {
            smp::run_on(c, work, 0)?;
        }
        work(0, 0);
        while JOB.all_done.load(Ordering::Acquire) == 0 {
            user::wait(JOB.all_done.as_ptr());
        }
        let cycles = cpu::rdtsc() - t0;
        for c in 1..cpus {
            smp::wait_idle(c)?;
        }
        for a in 0..self.allocators {
            let addr = JOB.bad_addr[a].load(Ordering::Acquire);
            if addr != 0 {
                return Err(crate::fail!(
                    "allocator={a} addr={addr:#x} got={:#018x}",
                    JOB.bad_got[a].load(Ordering::Relaxed)
                ));
            }
        }
        // 0 when the TSC rate is unknown (the host then reports no MB/s).
        Ok((cycles * 1000).checked_div(self.tsc_khz).unwrap_or(0))
    }

    fn mib(&self) -> u64 {
        self.pages * PAGE / MIB
    }

    /// Carries out one command line; Ok(reply after "PASS ") or Err(reason after "FAIL cmd ").
    fn command(&mut self, env: &Env, line: &str) -> Result<Fail, Fail> {
        let mut words = line.split_ascii_whitespace();
        let cmd = words.next().unwrap_or("");
        let arg = words.next().map(parse_num).transpose()?;
        if words.next().is_some() {
            return Err(Fail::from("too many arguments"));
        }
        let need = |a: Option<u64>| a.ok_or_else(|| Fail::from("missing argument"));
        let init_key = self.key;
        let (k, mib) = (self.allocators, self.mib());
        match cmd {
            "alloc" => {
                self.alloc(env, need(arg)?)?;
                Ok(crate::fail!(
                    "alloc mib={} pages={} allocators={k} cpus={}",
                    self.mib(),
                    self.pages,
                    self.cpus
                ))
            }
            "fill" | "verify" => {
                let v = need(arg)?;
                if v > 0xff {
                    return Err(crate::fail!("value {v} is not a byte"));
                }
                let op = if cmd == "fill" { Op::Fill } else { Op::Verify };
                let us = self.run_job(op, v)?;
                Ok(crate::fail!(
                    "{cmd} value={v} mib={mib} allocators={k} us={us}"
                ))
            }
            "init" => {
                self.key = need(arg)?;
                Ok(crate::fail!("init key={}", self.key))
            }
            "srandom" | "srverify" => {
                let key = arg.unwrap_or(init_key);
                let op = if cmd == "srandom" {
                    Op::Srandom
                } else {
                    Op::Srverify
                };
                let us = self.run_job(op, key)?;
                Ok(crate::fail!(
                    "{cmd} key={key} mib={mib} allocators={k} us={us}"
                ))
            }
            "info" => Ok(crate::fail!(
                "info mib={mib} allocators={k} cpus={} mem_mib={} tsc_khz={}",
                self.cpus,
                env.boot.memory_size() / MIB,
                self.tsc_khz
            )),
            "exit" => Ok(Fail::from("exit")),
            _ => Err(crate::fail!("unknown command")),
        }
    }
}

fn parse_num(v: &str) -> Result<u64, Fail> {
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    }
    .map_err(|_| crate::fail!("bad number `{v}`"))
}

fn run(env: &Env) -> Result<(), Fail> {
    let allocators = env.arg_u64("allocators", 1)? as usize;
    if !(1..=MAX_ALLOCATORS).contains(&allocators) {
        return Err(crate::fail!(
            "allocators={allocators}: must be 1..={MAX_ALLOCATORS}"
        ));
    }
    JOB.bsp_apic.store(cpu::apic_id(), Ordering::Relaxed);
    let mut alloc = Allocator {
        pages: 0,
        allocators,
        cpus: env.cpus,
        key: 0,
        tsc_khz: env.tsc_khz,
    };
    let mib = env.arg_u64("mib", 0)?;
    if mib > 0 {
        alloc.alloc(env, mib)?;
    }
    let mut com2 = Com2::open()?;
    crate::report!(
        "ksm: ready mib={} allocators={allocators} cpus={}",
        alloc.mib(),
        env.cpus
    );
    loop {
        let (reply, exit) = match com2.read_line() {
            Ok("") => continue,
            Ok(line) => {
                let cmd = line.split_ascii_whitespace().next().unwrap_or("");
                match alloc.command(env, line) {
                    Ok(r) => (crate::fail!("PASS {}", r.as_str()), cmd == "exit"),
                    Err(e) => (crate::fail!("FAIL {cmd} {}", e.as_str()), false),
                }
            }
            Err(e) => (crate::fail!("FAIL input {}", e.as_str()), false),
        };
        com2.write_line(reply.as_str());
        crate::report!("ksm: {}", reply.as_str());
        if exit {
            return Ok(());
        }
    }
}

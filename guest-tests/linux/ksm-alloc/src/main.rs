//! `ksm-alloc [mib=N] [allocators=K] [tty=/dev/ttyS1]`: the KSM test's guest allocator for a
//! Linux guest. It speaks the line protocol of the built-in guest's `ksm` suite (see
//! guest-tests/guest/src/suites/ksm.rs) on COM2, /dev/ttyS1 in raw mode: commands `alloc MIB`,
//! `fill VALUE`, `verify VALUE`, `init KEY`, `srandom [KEY]`, `srverify [KEY]`, `info`, `exit`,
//! each answered `PASS <command> key=value...` or `FAIL <command> <reason>`. The random series
//! is the same function of (key, qword index), so host-side checks do not care which guest ran.
//!
//! The region is anonymous memory mapped 2 MiB-aligned with MADV_HUGEPAGE: first touches of
//! guest user memory are ~5x cheaper with transparent huge pages on this machine's nested KVM.
//! With allocators=K, K threads each own 1/K of the region.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::time::Instant;

const MIB: usize = 1 << 20;
const HUGE: usize = 2 * MIB;
const PAGE: usize = 4096;

fn series(key: u64, q: u64) -> u64 {
    let mut z = (key ^ q.wrapping_mul(0x9e37_79b9_7f4a_7c15)).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// An anonymous, 2 MiB-aligned mapping of whole pages.
struct Region {
    map: *mut libc::c_void,
    map_len: usize,
    words: *mut u64,
    len: usize,
}

// SAFETY: the mapping is plain memory; threads work on disjoint parts (see `parts`).
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Region {
    fn new(mib: usize) -> Result<Region, String> {
        let len = mib.checked_mul(MIB).ok_or("size overflows")?;
        let map_len = len + HUGE;
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(format!(
                "mmap {mib} MiB: {}",
                std::io::Error::last_os_error()
            ));
        }
        let start = (map as usize).next_multiple_of(HUGE);
        // SAFETY: [start, start + len) lies inside the mapping just created. A failing madvise
        // only costs speed (THP off or unsupported).
        unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
        Ok(Region {
            map,
            map_len,
            words: start as *mut u64,
            len,
        })
    }

    /// Allocator i's part of `k`: (first qword index, qwords), page aligned.
    fn part(&self, i: usize, k: usize) -> (usize, usize) {
        let pages = self.len / PAGE;
        let (p0, p1) = (pages * i / k, pages * (i + 1) / k);
        (p0 * PAGE / 8, (p1 - p0) * PAGE / 8)
    }

    /// Allocator `i`'s words.
    ///
    /// # Safety
    /// No two live slices may overlap: callers give each thread its own `i`.
    #[allow(clippy::mut_from_ref)]
    unsafe fn words(&self, i: usize, k: usize) -> (u64, &mut [u64]) {
        let (q0, n) = self.part(i, k);
        // SAFETY: inside the mapping; disjointness is the caller's promise.
        (q0 as u64, unsafe {
            std::slice::from_raw_parts_mut(self.words.add(q0), n)
        })
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`.
        unsafe { libc::munmap(self.map, self.map_len) };
    }
}

#[derive(Clone, Copy)]
enum Op {
    Fill(u8),
    Verify(u8),
    Srandom(u64),
    Srverify(u64),
}

/// Runs `op` on allocator `i`'s part; Err names the first mismatch.
fn work(region: &Region, i: usize, k: usize, op: Op) -> Result<(), String> {
    // SAFETY: each thread of `run_job` passes its own i.
    let (q0, w) = unsafe { region.words(i, k) };
    let bad = |j: usize, got: u64| {
        Err(format!(
            "allocator={i} offset={:#x} got={got:#018x}",
            (q0 as usize + j) * 8
        ))
    };
    match op {
        Op::Fill(v) => w.fill(u64::from_ne_bytes([v; 8])),
        Op::Verify(v) => {
            let want = u64::from_ne_bytes([v; 8]);
            if let Some(j) = w.iter().position(|&x| x != want) {
                return bad(j, w[j]);
            }
        }
        Op::Srandom(key) => {
            for (j, x) in w.iter_mut().enumerate() {
                *x = series(key, q0 + j as u64);
            }
        }
        Op::Srverify(key) => {
            if let Some(j) = (0..w.len()).find(|&j| w[j] != series(key, q0 + j as u64)) {
                return bad(j, w[j]);
            }
        }
    }
    Ok(())
}

/// Runs `op` on every allocator (one thread each); returns the wall time in µs.
fn run_job(region: &Region, k: usize, op: Op) -> Result<u128, String> {
    let t0 = Instant::now();
    let results: Vec<Result<(), String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..k)
            .map(|i| s.spawn(move || work(region, i, k, op)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("allocator thread panicked".into()))
            })
            .collect()
    });
    let us = t0.elapsed().as_micros();
    results.into_iter().collect::<Result<Vec<()>, String>>()?;
    Ok(us)
}

fn parse_num(v: Option<&str>) -> Result<u64, String> {
    let v = v.ok_or("missing argument")?;
    match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => v.parse(),
    }
    .map_err(|_| format!("bad number `{v}`"))
}

struct State {
    region: Option<Region>,
    allocators: usize,
    key: u64,
}

impl State {
    fn command(&mut self, line: &str) -> Result<String, String> {
        let mut w = line.split_ascii_whitespace();
        let cmd = w.next().unwrap_or("");
        let arg = w.next();
        if w.next().is_some() {
            return Err("too many arguments".into());
        }
        let k = self.allocators;
        let mib = self.region.as_ref().map_or(0, |r| r.len / MIB);
        let region = || {
            self.region
                .as_ref()
                .ok_or("no region: send `alloc MIB` first")
        };
        match cmd {
            "alloc" => {
                let n = parse_num(arg)? as usize;
                if n == 0 {
                    return Err("mib must be > 0".into());
                }
                self.region = None;
                self.region = Some(Region::new(n)?);
                Ok(format!(
                    "alloc mib={n} pages={} allocators={k}",
                    n * MIB / PAGE
                ))
            }
            "fill" | "verify" => {
                let v = u8::try_from(parse_num(arg)?).map_err(|_| "value is not a byte")?;
                let op = if cmd == "fill" {
                    Op::Fill(v)
                } else {
                    Op::Verify(v)
                };
                let us = run_job(region()?, k, op)?;
                Ok(format!("{cmd} value={v} mib={mib} allocators={k} us={us}"))
            }
            "init" => {
                self.key = parse_num(arg)?;
                Ok(format!("init key={}", self.key))
            }
            "srandom" | "srverify" => {
                let key = match arg {
                    Some(_) => parse_num(arg)?,
                    None => self.key,
                };
                let op = if cmd == "srandom" {
                    Op::Srandom(key)
                } else {
                    Op::Srverify(key)
                };
                let us = run_job(region()?, k, op)?;
                Ok(format!("{cmd} key={key} mib={mib} allocators={k} us={us}"))
            }
            "info" => Ok(format!("info mib={mib} allocators={k}")),
            "exit" => Ok("exit".into()),
            _ => Err("unknown command".into()),
        }
    }
}

/// Puts the tty in raw mode: no echo (it would send the commands back to the host), no line
/// editing, no CR/LF translation.
fn make_raw(tty: &File) -> std::io::Result<()> {
    // SAFETY: termios is plain data; tcgetattr fills it for an fd we own.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and pointer.
    if unsafe { libc::tcgetattr(tty.as_raw_fd(), &mut t) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: cfmakeraw only edits the struct.
    unsafe { libc::cfmakeraw(&mut t) };
    // SAFETY: valid fd and pointer.
    if unsafe { libc::tcsetattr(tty.as_raw_fd(), libc::TCSANOW, &t) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn main() {
    let mut tty_path = "/dev/ttyS1".to_string();
    let mut state = State {
        region: None,
        allocators: 1,
        key: 0,
    };
    let mut mib = 0u64;
    for a in std::env::args().skip(1) {
        let parsed = match a.split_once('=') {
            Some(("mib", v)) => parse_num(Some(v)).map(|n| mib = n),
            Some(("allocators", v)) => parse_num(Some(v)).and_then(|n| match n {
                1..=64 => {
                    state.allocators = n as usize;
                    Ok(())
                }
                _ => Err("allocators must be 1..=64".into()),
            }),
            Some(("tty", v)) => {
                tty_path = v.to_string();
                Ok(())
            }
            _ => Err(format!("unknown argument `{a}`")),
        };
        if let Err(e) = parsed {
            eprintln!("ksm-alloc: error: {e} (usage: ksm-alloc [mib=N] [allocators=K] [tty=PATH])");
            std::process::exit(2);
        }
    }
    if mib > 0 {
        if let Err(e) = state.command(&format!("alloc {mib}")) {
            eprintln!("ksm-alloc: error: {e}");
            std::process::exit(1);
        }
    }
    let tty = match OpenOptions::new().read(true).write(true).open(&tty_path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("ksm-alloc: error: opening {tty_path}: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = make_raw(&tty) {
        eprintln!("ksm-alloc: warning: raw mode on {tty_path}: {e}");
    }
    let mut out = match tty.try_clone() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("ksm-alloc: error: {e}");
            std::process::exit(1);
        }
    };
    eprintln!("ksm-alloc: ready on {tty_path}");
    for line in BufReader::new(tty).lines() {
        let Ok(line) = line else { break };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let cmd = line
            .split_ascii_whitespace()
            .next()
            .unwrap_or("")
            .to_string();
        let reply = match state.command(line) {
            Ok(r) => format!("PASS {r}\n"),
            Err(e) => format!("FAIL {cmd} {e}\n"),
        };
        if out.write_all(reply.as_bytes()).is_err() {
            break;
        }
        if cmd == "exit" && reply.starts_with("PASS") {
            return;
        }
    }
}

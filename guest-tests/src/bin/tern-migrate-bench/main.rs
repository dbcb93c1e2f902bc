//! Migration benchmarks: `tern-migrate-bench [precopy|postcopy|random|recovery|restore|local|thp|dirty|limits|pcpush]`
//! prints tables (precopy and postcopy by default; the postcopy tables end with the random-access
//! one; `random`, `recovery`, `restore`, `local` and `thp` run only that table).
//! Needs `cargo build --release --workspace` first (it runs the `tern` next to itself). Everything
//! is measured side by side in one run.

mod random;
mod recovery;
mod restore;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use guest_tests::tern_binary;

mod dirty;
mod limits;
mod local;
mod pcpush;
mod thp;

const GIB: usize = 1 << 30;

/// Throughput of a plain 1 GiB copy through a Unix socket between two threads, in MB/s.
fn raw_socket_copy() -> Result<f64> {
    raw_copy(false)
}

/// The same copy, but the reader receives into 1 GiB of fresh (never touched) memory, as a
/// migration destination must.
fn raw_socket_copy_fresh() -> Result<f64> {
    raw_copy(true)
}

fn raw_copy(fresh: bool) -> Result<f64> {
    let (mut a, mut b) = UnixStream::pair()?;
    let reader = std::thread::spawn(move || -> std::io::Result<usize> {
        // calloc of 1 GiB is a fresh anonymous mapping: each page is first touched by recv.
        let mut buf = vec![0u8; if fresh { GIB } else { 1 << 20 }];
        let mut total = 0;
        while total < GIB {
            let at = if fresh { total } else { 0 };
            let end = (at + (1 << 20)).min(buf.len());
            let n = b.read(&mut buf[at..end])?;
            if n == 0 {
                break;
            }
            total += n;
        }
        Ok(total)
    });
    let chunk = vec![0x5au8; 1 << 20];
    let t0 = Instant::now();
    for _ in 0..GIB / chunk.len() {
        a.write_all(&chunk)?;
    }
    let got = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    let secs = t0.elapsed().as_secs_f64();
    if got != GIB {
        bail!("raw copy moved {got} bytes");
    }
    Ok(GIB as f64 / secs / 1e6)
}

struct Tern {
    child: Child,
    /// Every line tern printed so far, stdout (the guest) and stderr interleaved.
    lines: Arc<Mutex<Vec<String>>>,
    /// When each `dirty round=R` report arrived, with R (the dirty suite's progress).
    rounds: Arc<Mutex<Vec<(Instant, u64)>>>,
}

impl Tern {
    /// The first line so far that `matches`, waiting up to `timeout` for one.
    fn wait_line(&self, timeout: Duration, matches: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.find_line(&matches) {
                return Some(l);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn find_line(&self, matches: impl Fn(&str) -> bool) -> Option<String> {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        lines.iter().find(|l| matches(l)).cloned()
    }
}

impl Drop for Tern {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts tern and waits until its stderr (or stdout, for the guest) shows `ready`. Its output
/// keeps being collected (so tern never blocks on a full pipe) for [`Tern::wait_line`].
fn start(args: &[&str], ready: &str) -> Result<Tern> {
    start_env(args, ready, &[])
}

/// [`start`] with environment variables for tern.
fn start_env(args: &[&str], ready: &str, env: &[(&str, &str)]) -> Result<Tern> {
    let mut child = Command::new(tern_binary()?)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting tern")?;
    let out = child.stdout.take().context("stdout")?;
    let err = child.stderr.take().context("stderr")?;
    let lines = Arc::new(Mutex::new(Vec::new()));
    let rounds = Arc::new(Mutex::new(Vec::new()));
    for stream in [Box::new(out) as Box<dyn Read + Send>, Box::new(err)] {
        let (lines, rounds) = (lines.clone(), rounds.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if line.contains("dirty round=") {
                    if let Some(r) = field(&line, "round") {
                        rounds
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push((Instant::now(), r));
                    }
                }
                lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
    }
    let tern = Tern {
        child,
        lines,
        rounds,
    };
    if tern
        .wait_line(Duration::from_secs(300), |l| l.contains(ready))
        .is_none()
    {
        bail!("tern {args:?} never printed `{ready}`");
    }
    Ok(tern)
}

fn remote(sock: &Path, args: &[&str]) -> Result<serde_json::Value> {
    let out = Command::new(tern_binary()?)
        .arg("remote")
        .arg("--api-socket")
        .arg(sock)
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!(
            "tern remote {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Migrates a guest started with `guest_args` once, after its output showed `ready`; returns the
/// source's final figures.
fn migrate_once(
    dir: &Path,
    name: &str,
    guest_args: &[&str],
    ready: &str,
) -> Result<serde_json::Value> {
    let run = migrate_run(dir, name, guest_args, ready, &["--serial", "off"])?;
    Ok(run.status)
}

/// One migration between two live tern processes, both still running after it.
struct Migration {
    status: serde_json::Value,
    src: Tern,
    dst: Tern,
}

/// Starts the source (`guest_args`, until its output shows `ready`) and a destination
/// (`--incoming` plus `dst_args`), migrates once and returns the source's final figures.
fn migrate_run(
    dir: &Path,
    name: &str,
    guest_args: &[&str],
    ready: &str,
    dst_args: &[&str],
) -> Result<Migration> {
    migrate_run_uri(dir, name, guest_args, ready, dst_args, "")
}

/// [`migrate_run`] with `uri_suffix` appended to the source's `migrate unix:PATH` (`,local=on`).
fn migrate_run_uri(
    dir: &Path,
    name: &str,
    guest_args: &[&str],
    ready: &str,
    dst_args: &[&str],
    uri_suffix: &str,
) -> Result<Migration> {
    let sock = dir.join(format!("{name}.sock"));
    let mig = format!("unix:{}", dir.join(format!("{name}.mig")).display());
    let uri = format!("{mig}{uri_suffix}");
    let sock_s = sock.to_string_lossy().into_owned();
    let mut args: Vec<&str> = guest_args.to_vec();
    args.extend_from_slice(&["--api-socket", &sock_s]);
    let src = start(&args, ready)?;
    // A guest that reports progress gets to report it a few times before the switch.
    if ready == "touch n=" {
        let deadline = Instant::now() + Duration::from_secs(30);
        while random::touches(&src).len() < 3 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let mut dargs = vec!["--incoming", mig.as_str()];
    dargs.extend_from_slice(dst_args);
    let dst = start(&dargs, "waiting for an incoming migration")?;
    let status = remote(&sock, &["migrate", &uri])?;
    Ok(Migration { status, src, dst })
}

fn row(what: &str, s: &serde_json::Value) {
    println!(
        "| {what} | {:.1} | {:.1} | {:.0} | {} | {} | {} |",
        s["total_ms"].as_f64().unwrap_or(f64::NAN),
        s["downtime_ms"].as_f64().unwrap_or(f64::NAN),
        s["throughput_mbps"].as_f64().unwrap_or(f64::NAN),
        s["bytes"].as_u64().unwrap_or(0) / 1_000_000,
        s["iteration"].as_u64().unwrap_or(0),
        s["pages_full"].as_u64().unwrap_or(0),
    );
}

fn main() -> Result<()> {
    let what = std::env::args().nth(1);
    let (pre, post) = match what.as_deref() {
        None | Some("all") => (true, true),
        Some("precopy") => (true, false),
        Some("postcopy") => (false, true),
        Some(
            "random" | "recovery" | "restore" | "local" | "thp" | "dirty" | "limits" | "pcpush",
        ) => (false, false),
        Some(other) => bail!(
            "usage: tern-migrate-bench [all|precopy|postcopy|random|recovery|restore|local|thp|dirty|limits|pcpush [ROUNDS]] \
             (got `{other}`)"
        ),
    };
    let dir: PathBuf = std::env::temp_dir().join(format!("tern-mbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = (|| {
        match what.as_deref() {
            Some("random") => return random::random_access_table(&dir),
            Some("recovery") => return recovery::recovery_table(&dir),
            Some("local") => return local::table(&dir),
            Some("thp") => return thp::table(&dir),
            Some("dirty") => return dirty::table(&dir),
            Some("limits") => return limits::table(&dir),
            Some("pcpush") => {
                let rounds = match std::env::args().nth(2) {
                    Some(n) => n.parse().context("ROUNDS must be a number")?,
                    None => 2,
                };
                return pcpush::table(&dir, rounds);
            }
            Some("restore") => return restore::restore_table(&dir),
            _ => {}
        }
        if pre {
            precopy_tables(&dir)?;
        }
        if post {
            if pre {
                println!();
            }
            postcopy_table(&dir)?;
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn precopy_tables(dir: &Path) -> Result<()> {
    let raw = raw_socket_copy()?;
    println!("| raw copy of 1 GiB through a Unix socket | {raw:.0} MB/s |");
    println!("|---|---|");
    println!();
    println!("| workload | total ms | downtime ms | MB/s | MB sent | iterations | full pages |");
    println!("|---|---|---|---|---|---|---|");
    let idle = migrate_once(
        dir,
        "idle1g",
        &[
            "--memory",
            "size=1200M",
            "--cmdline",
            "suite=idle fill=1024",
        ],
        "idle: halting",
    )?;
    row("1 GiB filled, idle", &idle);
    for ws in [64, 256] {
        let cmd = format!("suite=dirty mib={ws} static=16");
        let s = migrate_once(
            dir,
            &format!("dirty{ws}"),
            &["--memory", "size=1G", "--cmdline", &cmd],
            "dirty round=",
        )?;
        row(&format!("dirty working set {ws} MiB (300 ms budget)"), &s);
    }
    let big = migrate_once(
        dir,
        "zero8g",
        &["--memory", "size=8G", "--cmdline", "suite=idle"],
        "idle: halting",
    )?;
    row("8 GiB, mostly untouched", &big);
    let ratio = idle["throughput_mbps"].as_f64().unwrap_or(0.0) / raw;
    println!();
    println!(
        "1 GiB idle migration throughput / raw socket copy: {:.0} %",
        ratio * 100.0
    );
    Ok(())
}

/// Where the `apf` suite's pages start: far above what the background push reaches before the
/// guest touches them (it waits 300 ms after the switch), so its first touches all miss.
const APF_LAZY: u64 = 0x3000_0000;
const APF_PAGES: u64 = 4096;

/// `key=N` from a guest report line.
fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// Faults and blocked µs from the postcopy figures' `blocked` list: (vCPU threads, other threads).
/// The other threads are kernel workers: KVM's async page fault work.
fn blocked(p: &serde_json::Value) -> ((u64, f64), (u64, f64)) {
    let (mut vcpu, mut other) = ((0, 0.0), (0, 0.0));
    for t in p["blocked"].as_array().into_iter().flatten() {
        let n = t[1].as_u64().unwrap_or(0);
        let us = t[2].as_f64().unwrap_or(0.0);
        let sum = if t[0].as_str().is_some_and(|s| s.starts_with("vcpu")) {
            &mut vcpu
        } else {
            &mut other
        };
        sum.0 += n;
        sum.1 += us;
    }
    (vcpu, other)
}

/// The `apf` suite's figures, as the guest printed them on the destination.
struct ApfReport {
    async_pf: u64,
    toucher_ms: u64,
    compute: u64,
    compute_during_waits: u64,
}

fn postcopy_row(what: &str, mode: &str, s: &serde_json::Value, guest: Option<&ApfReport>) {
    let p = &s["postcopy"];
    let ((vf, vus), (of, ous)) = blocked(p);
    let requested = p["pages_requested"].as_u64().unwrap_or(0);
    let latency = if requested == 0 {
        "–".to_string()
    } else {
        format!(
            "{:.0} / {:.0}",
            p["request_latency_p50_us"].as_f64().unwrap_or(f64::NAN),
            p["request_latency_p99_us"].as_f64().unwrap_or(f64::NAN)
        )
    };
    let g = |f: fn(&ApfReport) -> u64| guest.map_or("–".to_string(), |r| f(r).to_string());
    println!(
        "| {what} | {mode} | {:.0} | {:.1} | {} | {requested} / {} | {latency} | {vf} / {:.1} | {of} / {:.1} | {} | {} | {} | {} |",
        s["total_ms"].as_f64().unwrap_or(f64::NAN),
        s["downtime_ms"].as_f64().unwrap_or(f64::NAN),
        p["missing_at_switch"].as_u64().unwrap_or(0),
        p["pages_pushed"].as_u64().unwrap_or(0),
        vus / 1e3,
        ous / 1e3,
        g(|r| r.async_pf),
        g(|r| r.toucher_ms),
        g(|r| r.compute),
        g(|r| r.compute_during_waits),
    );
}

/// A postcopy migration's final figures; fails if it ended without a postcopy phase.
fn postcopy_status(m: &Migration, what: &str) -> Result<serde_json::Value> {
    if m.status["postcopy"].is_null() {
        bail!(
            "{what}: the migration ended without a postcopy phase: {}",
            m.status
        );
    }
    Ok(m.status.clone())
}

/// The `apf` suite through a pure postcopy with async PF `mode` on both sides (the guest fills
/// its pages itself, so the source serves them from ordinary memory). Returns the source's final
/// figures, the guest's report and whether the guest enabled async PF (on the source, before
/// the switch).
fn apf_postcopy(dir: &Path, mode: &str) -> Result<(serde_json::Value, ApfReport, bool)> {
    let cmdline =
        format!("suite=apf pages={APF_PAGES} lazy={APF_LAZY:#x} fill=1 delay_ms=300 hold_ms=60000");
    let m = migrate_run(
        dir,
        &format!("apf-{mode}"),
        &[
            "--memory",
            "size=1G",
            "--async-pf",
            mode,
            "--postcopy",
            "--postcopy-after-iterations",
            "0",
            "--cmdline",
            &cmdline,
        ],
        "tern-guest: apf cpuid",
        // The mode is each process's own option (the guest's async-PF MSRs travel either way).
        &["--postcopy", "--async-pf", mode],
    )?;
    let status = postcopy_status(&m, &format!("apf, async PF {mode}"))?;
    let wait = Duration::from_secs(60);
    let detail = m
        .dst
        .wait_line(wait, |l| l.starts_with("tern-guest: apf detail:"));
    let failed = |t: &Tern| t.find_line(|l| l.starts_with("tern-guest:") && l.contains("FAIL"));
    if let Some(f) = failed(&m.dst).or_else(|| failed(&m.src)) {
        bail!("apf, async PF {mode}: the guest failed: {f}");
    }
    let (Some(report), Some(detail)) = (
        m.dst.find_line(|l| l.starts_with("tern-guest: apf pages=")),
        detail,
    ) else {
        if m.src
            .find_line(|l| l.starts_with("tern-guest: apf pages="))
            .is_some()
        {
            bail!("apf, async PF {mode}: the guest touched its pages before the switch");
        }
        bail!("apf, async PF {mode}: no report from the guest on the destination");
    };
    let get = |line: &str, k: &str| {
        field(line, k).with_context(|| format!("no `{k}=` in the guest's `{line}`"))
    };
    let r = ApfReport {
        async_pf: get(&report, "async")?,
        toucher_ms: get(&detail, "ms")?,
        compute: get(&report, "compute")?,
        compute_during_waits: get(&report, "compute_during_waits")?,
    };
    let enabled = m
        .src
        .find_line(|l| l.contains("async PF enabled"))
        .is_some();
    Ok((status, r, enabled))
}

fn postcopy_table(dir: &Path) -> Result<()> {
    println!(
        "| workload | async PF | total ms | downtime ms | missing at switch | requested / pushed \
         | request p50 / p99 µs | vCPU threads blocked: faults / ms | other threads (KVM async \
         PF workers): faults / ms | guest async PFs | toucher ms | compute | compute during waits |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let idle = migrate_run(
        dir,
        "pc-idle",
        &[
            "--memory",
            "size=1200M",
            "--postcopy",
            "--postcopy-after-iterations",
            "0",
            "--cmdline",
            "suite=idle fill=1024",
        ],
        "idle: halting",
        &["--postcopy", "--serial", "off"],
    )?;
    let s = postcopy_status(&idle, "1 GiB filled, idle")?;
    drop(idle);
    postcopy_row("1 GiB filled, idle, pure postcopy", "unused", &s, None);

    let mut notes = Vec::new();
    for mode in ["off", "kvm", "tern"] {
        let (s, r, enabled) = apf_postcopy(dir, mode)?;
        let what = format!("apf {APF_PAGES} pages (1 GiB), pure postcopy");
        postcopy_row(&what, mode, &s, Some(&r));
        let ((vcpu_faults, _), _) = blocked(&s["postcopy"]);
        if enabled && r.async_pf == 0 {
            notes.push(format!(
                "async PF {mode}: the guest enabled async PF before the switch but got no \
                 PAGE_NOT_PRESENT after it; {vcpu_faults} faults blocked the vCPU thread"
            ));
        }
    }

    let dirty = migrate_run(
        dir,
        "pc-dirty",
        &[
            "--memory",
            "size=1G",
            "--postcopy",
            "--postcopy-after-iterations",
            "1",
            "--downtime-ms",
            "1",
            "--cmdline",
            "suite=dirty mib=256 static=16",
        ],
        "dirty round=",
        &["--postcopy", "--serial", "off"],
    )?;
    let s = postcopy_status(&dirty, "dirty 256 MiB")?;
    drop(dirty);
    postcopy_row(
        "dirty working set 256 MiB, switch after 1 precopy iteration",
        "unused",
        &s,
        None,
    );
    println!();
    for n in notes {
        println!("- {n}");
    }
    println!();
    random::random_access_table(dir)
}

/// The `count` figures in ms of the destination's stderr line containing `needle` (as
/// "N ms ..."), joined with " / "; "–" when the line or its figures are missing.
fn ms_figures(m: &Migration, needle: &str, count: usize) -> String {
    m.dst
        .wait_line(Duration::from_secs(5), |l| l.contains(needle))
        .and_then(|l| {
            let nums: Vec<&str> = l
                .split_whitespace()
                .zip(l.split_whitespace().skip(1))
                .filter(|(_, unit)| unit.starts_with("ms"))
                .map(|(n, _)| n)
                .collect();
            (nums.len() == count).then(|| nums.join(" / "))
        })
        .unwrap_or_else(|| "–".into())
}

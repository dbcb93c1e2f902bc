//! tern's benchmarks: `tern-bench [boot|rss|ksm|linux|all]` prints a table. Build tern first
//! (`cargo build --release`); tern-bench runs the `tern` binary next to itself. `ksm` needs root
//! (it sets ksmd's scan rate, and restores it) and is not part of `all`; neither is `linux`
//! (minutes: it builds or fetches the guest kernel and boots it 7 times).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use guest_tests::{median, number_after, tern_binary};

const RUNS: usize = 10;

fn boot() -> Result<()> {
    let tern = tern_binary()?;
    let (mut ready, mut exit, mut wall) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let t0 = Instant::now();
        let out = Command::new(&tern)
            .args(["--memory", "size=128M"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .output()
            .context("running tern")?;
        wall.push(t0.elapsed().as_secs_f64() * 1e3);
        if !out.status.success() {
            bail!("tern failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let err = String::from_utf8_lossy(&out.stderr);
        for line in err.lines() {
            if let Some(ms) = number_after(line, "guest ready") {
                ready.push(ms);
            }
            if let Some(ms) = number_after(line, "after") {
                exit.push(ms);
            }
        }
    }
    println!("| built-in guest, 128 MiB, 1 vCPU (median of {RUNS}) | ms |");
    println!("|---|---|");
    println!(
        "| tern start -> boot-timer write | {:.2} |",
        median(&mut ready)
    );
    println!(
        "| tern start -> guest exit (hello PASS) | {:.2} |",
        median(&mut exit)
    );
    println!(
        "| process spawn -> process exit (wall) | {:.2} |",
        median(&mut wall)
    );
    Ok(())
}

/// Resident memory that is not guest RAM, for a 128 MiB guest whose RAM is all resident.
fn rss() -> Result<()> {
    let tern = tern_binary()?;
    let guest_kib = 128 * 1024;
    let mut child = Command::new(&tern)
        .args([
            "--memory",
            "size=128M,prefault=on",
            "--cmdline",
            "suite=idle",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running tern")?;
    let stderr = child.stderr.take().context("stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match lines.next() {
            Some(Ok(l)) if l.contains("guest ready") => break,
            Some(Ok(_)) => {}
            _ => bail!("tern ended before the guest was ready"),
        }
        if Instant::now() > deadline {
            bail!("guest not ready in time");
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", child.id()))?;
    let (mut total, mut guest) = (0u64, 0u64);
    let mut current_size = 0u64;
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        match (f.next(), f.next()) {
            (Some("Size:"), Some(v)) => current_size = v.parse()?,
            (Some("Rss:"), Some(v)) => {
                let kib: u64 = v.parse()?;
                total += kib;
                if current_size == guest_kib {
                    guest += kib;
                }
            }
            _ => {}
        }
    }
    // Stop tern as a user would, and check that it stops cleanly.
    Command::new("kill").arg(child.id().to_string()).status()?;
    let status = child.wait()?;
    println!("| 128 MiB guest, RAM prefaulted | KiB |");
    println!("|---|---|");
    println!("| tern total RSS | {total} |");
    println!("| guest RAM RSS | {guest} |");
    println!("| tern overhead (RSS - guest RAM) | {} |", total - guest);
    if !status.success() {
        bail!("tern did not stop cleanly on SIGTERM: {status}");
    }
    Ok(())
}

/// KSM: merge time of 1 GiB of identical (zero) guest pages at stated ksmd scan rates, and the
/// split throughput (the guest writing a random series over the merged pages: copy-on-write
/// breaks), in one guest running the `ksm` suite.
fn ksm() -> Result<()> {
    use guest_tests::ksm::guest::{Guest, GuestState};
    use guest_tests::ksm::host::{self, MIB, PAGE_SIZE};
    use guest_tests::ksm::plan::GUEST_RESERVE_MIB;
    use guest_tests::ksm::sysfs::{KsmSettings, ScanRate, KSM_DIR};

    const REGION_MIB: u64 = 1024;
    let tern = tern_binary()?;
    host::install_stop_handler()?;
    let dir = std::env::temp_dir().join(format!("tern-bench-ksm-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let timeout = Duration::from_secs(300);
    let region_pages = REGION_MIB * MIB / PAGE_SIZE;
    println!("| 1 GiB of zero pages, 1 guest | fill (first touch) MB/s | merge time (s) | merged | split MB/s | split verify MB/s |");
    println!("|---|---|---|---|---|---|");
    for (pages_to_scan, sleep_millisecs) in [(1000, 10), (5000, 10), (20000, 10)] {
        let rate = ScanRate {
            pages_to_scan,
            sleep_millisecs,
        };
        let mut settings = KsmSettings::apply(std::path::Path::new(KSM_DIR), rate)?;
        let mut g = Guest::spawn(
            &tern,
            &dir,
            0,
            REGION_MIB + GUEST_RESERVE_MIB,
            REGION_MIB,
            1,
            1,
            false,
            None,
        )?;
        let mut none = || Ok(());
        let mbps = |r: &guest_tests::ksm::guest::Reply| {
            r.field("us")
                .filter(|&u| u > 0)
                .map_or(0.0, |us| (REGION_MIB * MIB) as f64 / us as f64)
        };
        let fill = g.command("fill 0", timeout, &mut none)?;
        let t0 = Instant::now();
        let mut merged = 0;
        while t0.elapsed() < timeout {
            host::check_stop()?;
            merged = g.merged_pages();
            if merged as f64 >= region_pages as f64 * 0.995 {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let merge_s = t0.elapsed().as_secs_f64();
        g.command("init 7", timeout, &mut none)?;
        let split = g.command("srandom", timeout, &mut none)?;
        let verify = g.command("srverify", timeout, &mut none)?;
        g.stop(GuestState::Stopped("exit".into()));
        settings.restore()?;
        println!(
            "| ksmd {pages_to_scan} pages / {sleep_millisecs} ms ({:.0} pages/s) | {:.0} | {merge_s:.2} | {:.1} % | {:.0} | {:.0} |",
            rate.pages_per_sec(),
            mbps(&fill),
            100.0 * merged as f64 / region_pages as f64,
            mbps(&split),
            mbps(&verify)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// What one Linux boot showed: seconds from spawn to `Run /init` and to the userspace marker,
/// the exit counters tern logged, and the whole run's length.
struct LinuxRun {
    run_init: f64,
    marker: f64,
    /// When the first `tern.run=` program ended (its `tern-linux: run ...` line).
    program_done: f64,
    total_s: f64,
    exits: std::collections::BTreeMap<String, u64>,
    stdout: String,
}

fn linux_boot(
    tern: &std::path::Path,
    kernel: &str,
    initramfs: &str,
    cpus: u8,
    append: Option<&str>,
) -> Result<LinuxRun> {
    let cpus_arg = format!("boot={cpus}");
    let mut args = vec![
        "--kernel",
        kernel,
        "--initramfs",
        initramfs,
        "--cpus",
        &cpus_arg,
        "--log-level",
        "info",
    ];
    if let Some(a) = append {
        args.extend(["--cmdline-append", a]);
    }
    let t0 = Instant::now();
    let mut child = Command::new(tern)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running tern")?;
    let stderr = child.stderr.take().context("stderr")?;
    let err_thread = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let (mut run_init, mut marker, mut program_done) = (f64::NAN, f64::NAN, f64::NAN);
    let mut stdout = String::new();
    for line in BufReader::new(child.stdout.take().context("stdout")?).lines() {
        let line = line?;
        let t = t0.elapsed().as_secs_f64();
        if line.contains("Run /init as init process") {
            run_init = t;
        }
        if line.starts_with("tern-linux: up ") {
            marker = t;
        }
        if line.starts_with("tern-linux: run ") && program_done.is_nan() {
            program_done = t;
        }
        stdout.push_str(&line);
        stdout.push('\n');
    }
    let status = child.wait()?;
    let total_s = t0.elapsed().as_secs_f64();
    let err = err_thread.join().unwrap_or_default();
    if !status.success() || marker.is_nan() {
        bail!(
            "Linux boot failed ({status}):\n{stdout}\n{}",
            err.join("\n")
        );
    }
    // `vcpu N exits: total=.. per_s=.. io=.. ... | syscall assist (all vCPUs): syscalls=.. page_faults=..`
    let mut exits = std::collections::BTreeMap::new();
    for line in err.iter().filter(|l| l.contains(" exits: total=")) {
        for (k, v) in line.split_whitespace().filter_map(|w| w.split_once('=')) {
            if k != "per_s" {
                *exits.entry(k.to_string()).or_insert(0) += v.parse::<u64>().unwrap_or(0);
            }
        }
    }
    Ok(LinuxRun {
        run_init,
        marker,
        program_done,
        total_s,
        exits,
        stdout,
    })
}

/// The minimal Linux guest (resources/build-guest.sh): time to `Run /init` and to the userspace
/// marker (median of 3) with 1 and 2 vCPUs, exits per second and their reasons; then the cost of
/// a system call (the SYSCALL assist) from `dd bs=1` in the guest.
fn linux() -> Result<()> {
    const RUNS: usize = 3;
    let tern = tern_binary()?;
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../resources/build-guest.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("build-guest.sh failed");
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let value = |k: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(str::to_string)
    };
    let (kernel, initramfs) = (
        value("KERNEL=").context("no KERNEL=")?,
        value("INITRAMFS=").context("no INITRAMFS=")?,
    );
    println!("| minimal Linux 6.1, 512 MiB (median of {RUNS}) | Run /init (s) | userspace marker (s) | exits/s | exits by reason | syscalls | page faults |");
    println!("|---|---|---|---|---|---|---|");
    for cpus in [1u8, 2] {
        let runs = (0..RUNS)
            .map(|_| linux_boot(&tern, &kernel, &initramfs, cpus, None))
            .collect::<Result<Vec<_>>>()?;
        let mut init: Vec<f64> = runs.iter().map(|r| r.run_init).collect();
        let mut up: Vec<f64> = runs.iter().map(|r| r.marker).collect();
        // Exit figures of the median run (by marker time).
        let mid = median(&mut up.clone());
        let r = runs.iter().find(|r| r.marker == mid).unwrap_or(&runs[0]);
        let total = r.exits.get("total").copied().unwrap_or(0);
        let share = r
            .exits
            .iter()
            .filter(|(k, v)| !["total", "syscalls", "page_faults"].contains(&k.as_str()) && **v > 0)
            .map(|(k, v)| format!("{k} {:.1}%", 100.0 * *v as f64 / total.max(1) as f64))
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "| {cpus} vCPU{} | {:.1} | {:.1} | {:.0} | {share} | {} | {} |",
            if cpus > 1 { "s" } else { "" },
            median(&mut init),
            median(&mut up),
            total as f64 / r.total_s,
            r.exits.get("syscalls").copied().unwrap_or(0),
            r.exits.get("page_faults").copied().unwrap_or(0),
        );
    }
    // System calls: dd with 1-byte blocks makes one read and one write per byte. Two sizes, so
    // that dd's own start-up (exec, page faults) cancels out of the difference.
    let (small, large) = (200u64, 2000u64);
    let dd = |count: u64| -> Result<(f64, u64)> {
        let run = format!("tern.run=dd,if=/dev/zero,of=/dev/null,bs=1,count={count}");
        let r = linux_boot(&tern, &kernel, &initramfs, 1, Some(&run))?;
        if r.program_done.is_nan() {
            bail!("dd did not run:\n{}", r.stdout);
        }
        let syscalls = r.exits.get("syscalls").copied().unwrap_or(0);
        Ok((r.program_done - r.marker, syscalls))
    };
    let ((t_small, n_small), (t_large, n_large)) = (dd(small)?, dd(large)?);
    let calls = n_large.saturating_sub(n_small).max(1) as f64;
    let secs = t_large - t_small;
    println!();
    println!("| guest `dd bs=1`, count={large} minus count={small} (1 vCPU) | value |");
    println!("|---|---|");
    println!("| system calls completed by the assist (difference) | {calls:.0} |");
    println!("| system calls/s | {:.0} |", calls / secs);
    println!(
        "| µs per system call, guest kernel work included | {:.0} |",
        secs * 1e6 / calls
    );
    println!("| exits to tern per system call | 1 (a KVM_EXIT_DEBUG) |");
    Ok(())
}

fn main() -> Result<()> {
    let what = std::env::args().nth(1).unwrap_or_else(|| "all".into());
    match what.as_str() {
        "boot" => boot(),
        "rss" => rss(),
        "ksm" => ksm(),
        "linux" => linux(),
        "all" => {
            boot()?;
            println!();
            rss()
        }
        other => bail!("unknown benchmark `{other}` (boot, rss, ksm, linux, all)"),
    }
}

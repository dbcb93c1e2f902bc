//! tern's benchmarks: `tern-bench [boot|rss|ksm|all]` prints a table. Build tern first
//! (`cargo build --release`); tern-bench runs the `tern` binary next to itself. `ksm` needs root
//! (it sets ksmd's scan rate, and restores it) and is not part of `all`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use guest_tests::{median, tern_binary};

const RUNS: usize = 10;

/// Parses "... <number> ms ..." after `marker` in a tern stderr line.
fn ms_after(line: &str, marker: &str) -> Option<f64> {
    let rest = line.split(marker).nth(1)?;
    rest.split_whitespace().find_map(|w| w.parse::<f64>().ok())
}

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
            if let Some(ms) = ms_after(line, "guest ready") {
                ready.push(ms);
            }
            if let Some(ms) = ms_after(line, "after") {
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

fn main() -> Result<()> {
    let what = std::env::args().nth(1).unwrap_or_else(|| "all".into());
    match what.as_str() {
        "boot" => boot(),
        "rss" => rss(),
        "ksm" => ksm(),
        "all" => {
            boot()?;
            println!();
            rss()
        }
        other => bail!("unknown benchmark `{other}` (boot, rss, ksm, all)"),
    }
}

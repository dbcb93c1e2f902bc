//! tern's benchmarks: `tern-bench [boot|rss|all]` prints a table. Build tern first
//! (`cargo build --release`); tern-bench runs the `tern` binary next to itself.

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

fn main() -> Result<()> {
    let what = std::env::args().nth(1).unwrap_or_else(|| "all".into());
    match what.as_str() {
        "boot" => boot(),
        "rss" => rss(),
        "all" => {
            boot()?;
            println!();
            rss()
        }
        other => bail!("unknown benchmark `{other}` (boot, rss, all)"),
    }
}

//! `tern-migrate-bench thp`: what `--memory thp=on` changes, beside `thp=off` in the same run:
//! the guest's first-touch write speed, the RSS of a barely touched guest, and precopy of the
//! filled idle 1 GiB guest and of the dirty guest (dirty logging on huge pages).

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use guest_tests::tern_binary;

use super::{field, migrate_run, row, start};

const MODES: [&str; 2] = ["off", "on"];
const REPEATS: usize = 3;

/// The guest's `write=` MB/s over 768 MiB of fresh RAM (`suite=memtest`).
fn memtest_write(thp: &str) -> Result<u64> {
    let out = Command::new(tern_binary()?)
        .args(["--memory", &format!("size=1G,thp={thp}")])
        .args(["--cmdline", "suite=memtest mib=768"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("memtest mib="))
        .context("no memtest report")?;
    field(line, "write").context("no write= in the memtest report")
}

/// RSS in MiB of a 1 GiB guest that touched almost nothing (`suite=idle`).
fn idle_rss_mib(thp: &str) -> Result<u64> {
    let mem = format!("size=1G,thp={thp}");
    let t = start(
        &[
            "--memory",
            &mem,
            "--cmdline",
            "suite=idle",
            "--serial",
            "off",
        ],
        "guest ready",
    )?;
    std::thread::sleep(std::time::Duration::from_millis(300));
    let status = std::fs::read_to_string(format!("/proc/{}/status", t.child.id()))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")?;
    Ok(kib / 1024)
}

pub fn table(dir: &Path) -> Result<()> {
    println!("| thp | guest first-touch write MB/s (768 MiB, {REPEATS} runs) | RSS of an idle 1 GiB guest, MiB |");
    println!("|---|---|---|");
    for thp in MODES {
        let mut w = Vec::new();
        for _ in 0..REPEATS {
            w.push(memtest_write(thp)?.to_string());
        }
        println!("| {thp} | {} | {} |", w.join(", "), idle_rss_mib(thp)?);
    }
    println!();
    println!(
        "| workload | thp | total ms | downtime ms | MB/s | MB sent | iterations | full pages |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for thp in MODES.iter().chain(MODES.iter()) {
        let mem = format!("size=1200M,thp={thp}");
        let m = migrate_run(
            dir,
            &format!("idle-{thp}"),
            &["--memory", &mem, "--cmdline", "suite=idle fill=1024"],
            "idle: halting",
            &["--serial", "off"],
        )?;
        row(&format!("1 GiB filled, idle | {thp}"), &m.status);
    }
    for thp in MODES.iter().chain(MODES.iter()) {
        let mem = format!("size=1G,thp={thp}");
        let m = migrate_run(
            dir,
            &format!("dirty-{thp}"),
            &[
                "--memory",
                &mem,
                "--cmdline",
                "suite=dirty mib=256 static=16",
            ],
            "dirty round=",
            &["--serial", "off"],
        )?;
        row(&format!("dirty working set 256 MiB | {thp}"), &m.status);
    }
    Ok(())
}

//! The random-access postcopy table: latency and blocked time with thousands of page requests.

use std::path::Path;

use anyhow::Result;

use super::{blocked, field, migrate_run_uri, postcopy_status, Tern};

/// The `touch n=` counts a tern's guest printed so far.
pub(super) fn touches(t: &Tern) -> Vec<u64> {
    let lines = t.lines.lock().unwrap_or_else(|e| e.into_inner());
    lines
        .iter()
        .filter_map(|l| field(l.strip_prefix("tern-guest: touch")?, "n"))
        .collect()
}

/// Random reads over 512 MiB of a 1 GiB guest, pure postcopy: thousands of page requests while
/// the background push runs (QEMU's random-access postcopy latency test).
pub(super) fn random_access_table(dir: &Path) -> Result<()> {
    println!(
        "| random access, 512 MiB of 1 GiB, pure postcopy | requested / pushed | request p50 / p99 \
         / max µs | vCPU waits | vCPU blocked ms (mean µs a wait) | vCPU waits, log2 µs buckets \
         from 1 µs | touches/s before | touches/s during postcopy | total ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for preempt in ["off", "on"] {
        random_access_row(dir, preempt)?;
    }
    Ok(())
}

fn random_access_row(dir: &Path, preempt: &str) -> Result<()> {
    // The push on the main connection (channels=0), as this table was first measured: with
    // preempt off, requested pages queue behind it.
    let m = migrate_run_uri(
        dir,
        &format!("pc-random-{preempt}"),
        &[
            "--postcopy-preempt",
            preempt,
            "--memory",
            "size=1G",
            "--postcopy",
            "--postcopy-after-iterations",
            "0",
            "--cmdline",
            "suite=touch mib=512",
        ],
        // Three reports (~0.75 s of touching) before the switch: the rate before postcopy.
        "touch n=",
        &["--postcopy"],
        ",channels=0",
    )?;
    let s = postcopy_status(&m, "random access")?;
    let p = &s["postcopy"];
    let before = touches(&m.src);
    // Reports come every 250 ms of guest time.
    let rate_before = before
        .windows(2)
        .last()
        .map_or(0.0, |w| (w[1].saturating_sub(w[0])) as f64 / 0.25);
    let last_src = before.last().copied().unwrap_or(0);
    let during = touches(&m.dst)
        .into_iter()
        .max()
        .unwrap_or(last_src)
        .saturating_sub(last_src);
    let total_s = s["total_ms"].as_f64().unwrap_or(f64::NAN) / 1e3;
    let ((vf, vus), _) = blocked(p);
    let hist: Vec<String> = p["vcpu_blocked_log2_us"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| v.to_string())
        .collect();
    println!(
        "| preempt channel {preempt} | {} / {} | {:.0} / {:.0} / {:.0} | {vf} | {:.1} ({:.0}) | {} | {:.0} | {:.0} | {:.0} |",
        p["pages_requested"].as_u64().unwrap_or(0),
        p["pages_pushed"].as_u64().unwrap_or(0),
        p["request_latency_p50_us"].as_f64().unwrap_or(f64::NAN),
        p["request_latency_p99_us"].as_f64().unwrap_or(f64::NAN),
        p["request_latency_max_us"].as_f64().unwrap_or(f64::NAN),
        vus / 1e3,
        if vf > 0 { vus / vf as f64 } else { 0.0 },
        hist.join(" "),
        rate_before,
        during as f64 / total_s,
        total_s * 1e3,
    );
    Ok(())
}

//! `tern-migrate-bench local`: a filled idle 1 GiB guest moved by local migration (memory handed
//! over) beside normal precopy of the same guest, with the raw copy limits of the same run.

use std::path::Path;

use anyhow::Result;

use super::{migrate_run_uri, raw_socket_copy, raw_socket_copy_fresh, Migration};

const REPEATS: usize = 3;

/// The destination's own downtime figure (source pause to its resume), from its summary line.
fn destination_downtime(m: &Migration) -> f64 {
    // It prints its summary just after confirming, so it may come a moment after the reply.
    m.dst
        .wait_line(std::time::Duration::from_secs(10), |l| {
            l.contains("migration completed (destination)")
        })
        .and_then(|l| {
            let rest = l.split("downtime ").nth(1)?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(f64::NAN)
}

fn row(what: &str, m: &Migration) {
    let s = &m.status;
    println!(
        "| {what} | {:.1} | {:.1} | {:.1} | {:.2} | {} |",
        s["total_ms"].as_f64().unwrap_or(f64::NAN),
        s["downtime_ms"].as_f64().unwrap_or(f64::NAN),
        destination_downtime(m),
        s["bytes"].as_u64().unwrap_or(0) as f64 / 1e6,
        s["pages_full"].as_u64().unwrap_or(0),
    );
}

pub fn table(dir: &Path) -> Result<()> {
    let reused = raw_socket_copy()?;
    let fresh = raw_socket_copy_fresh()?;
    println!("| raw copy of 1 GiB through a Unix socket | MB/s |");
    println!("|---|---|");
    println!("| into one reused 1 MiB buffer | {reused:.0} |");
    println!("| into 1 GiB of fresh memory | {fresh:.0} |");
    println!();
    println!(
        "| 1 GiB filled, idle guest | total ms | downtime ms (source) | downtime ms \
         (destination) | MB sent | full pages |"
    );
    println!("|---|---|---|---|---|---|");
    let guest = |mem: &'static str| ["--memory", mem, "--cmdline", "suite=idle fill=1024"];
    for i in 0..REPEATS {
        let m = migrate_run_uri(
            dir,
            &format!("local{i}"),
            &guest("size=1200M,shared=on"),
            "idle: halting",
            &["--serial", "off"],
            ",local=on",
        )?;
        row("local=on (shared=on, memfd handed over)", &m);
    }
    for i in 0..REPEATS {
        let m = migrate_run_uri(
            dir,
            &format!("pre{i}"),
            &guest("size=1200M"),
            "idle: halting",
            &["--serial", "off"],
            "",
        )?;
        row("precopy (private RAM)", &m);
    }
    let m = migrate_run_uri(
        dir,
        "preshared",
        &guest("size=1200M,shared=on"),
        "idle: halting",
        &["--serial", "off"],
        "",
    )?;
    row("precopy (shared=on RAM, copied)", &m);
    Ok(())
}

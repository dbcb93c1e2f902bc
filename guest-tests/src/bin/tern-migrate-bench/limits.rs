//! `tern-migrate-bench limits`: the filled idle 1 GiB guest moved every way tern can, beside the
//! raw copy limits of the same run (issue 16): RAM on the main connection, 1/2/4 RAM channels,
//! THP on, local fd passing, pure postcopy; then the dirty guest's write rate (`dirty`).

use std::path::Path;

use anyhow::Result;

use super::{migrate_run_uri, raw_socket_copy, raw_socket_copy_fresh, Migration};

/// The destination's "RAM channels placed ..." figures: populate, receive, checksum ms.
fn placing(m: &Migration) -> String {
    super::ms_figures(m, "RAM channels placed", 3)
}

fn row(what: &str, m: &Migration, fresh: f64) {
    let s = &m.status;
    let mbps = s["throughput_mbps"].as_f64().unwrap_or(f64::NAN);
    // A local migration copies no RAM: no throughput to compare.
    let (mbps, ratio) = if s["bytes"].as_u64().unwrap_or(0) < 1 << 20 {
        ("–".to_string(), "–".to_string())
    } else {
        (
            format!("{mbps:.0}"),
            format!("{:.0} %", mbps / fresh * 100.0),
        )
    };
    println!(
        "| {what} | {:.1} | {:.1} | {mbps} | {ratio} | {} |",
        s["total_ms"].as_f64().unwrap_or(f64::NAN),
        s["downtime_ms"].as_f64().unwrap_or(f64::NAN),
        placing(m),
    );
}

pub fn table(dir: &Path) -> Result<()> {
    let reused = raw_socket_copy()?;
    let fresh = raw_socket_copy_fresh()?;
    println!("| raw copy of 1 GiB through a Unix socket | MB/s |");
    println!("|---|---|");
    println!("| into one reused 1 MiB buffer | {reused:.0} |");
    println!("| into 1 GiB of fresh memory (the limit below) | {fresh:.0} |");
    println!();
    println!(
        "| filled idle 1 GiB guest | total ms | downtime ms | MB/s | of the fresh-memory limit \
         | destination populate / receive / checksum ms (channels, summed) |"
    );
    println!("|---|---|---|---|---|---|");
    let dst = ["--serial", "off", "--log-level", "info"];
    let idle = |mem: &'static str| ["--memory", mem, "--cmdline", "suite=idle fill=1024"];
    let cases: [(&str, &str, &str); 7] = [
        (
            "precopy, RAM on the main connection (channels=0)",
            "size=1200M",
            ",channels=0",
        ),
        ("precopy, 1 channel", "size=1200M", ",channels=1"),
        ("precopy, 2 channels", "size=1200M", ",channels=2"),
        ("precopy, 4 channels", "size=1200M", ",channels=4"),
        (
            "precopy, 1 channel, thp=on",
            "size=1200M,thp=on",
            ",channels=1",
        ),
        (
            "precopy, 4 channels, thp=on",
            "size=1200M,thp=on",
            ",channels=4",
        ),
        (
            "local=on (shared=on, memfd handed over)",
            "size=1200M,shared=on",
            ",local=on",
        ),
    ];
    for (i, (what, mem, suffix)) in cases.iter().enumerate() {
        let m = migrate_run_uri(
            dir,
            &format!("l{i}"),
            &idle(mem),
            "idle: halting",
            &dst,
            suffix,
        )?;
        row(what, &m, fresh);
    }
    let m = migrate_run_uri(
        dir,
        "lpost",
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
        // The push on the main connection (`pcpush` compares it with the channels').
        ",channels=0",
    )?;
    row("pure postcopy (push on the main connection)", &m, fresh);
    println!();
    super::dirty::table(dir)
}

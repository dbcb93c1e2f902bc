//! `tern-migrate-bench pcpush [ROUNDS]`: postcopy's background push against precopy (issue 16),
//! side by side in one run: the filled idle 1 GiB guest moved by precopy over 1 and 2 RAM
//! channels and by pure postcopy with the push on the main connection (channels=0) and on 1 and 2
//! channels, beside the raw copy into fresh memory (the limit). Each round runs every case once,
//! in turn, so the host's changing load hits them all alike.

use std::path::Path;

use anyhow::{bail, Result};

use super::{migrate_run_uri, raw_socket_copy_fresh, Migration};

/// The destination's "postcopy push placed ..." figures: receive (channels: reading runs into the
/// staging buffers, waits for the source included) / place (UFFDIO_COPY/ZEROPAGE and bookkeeping)
/// ms, summed over the threads that placed pushed pages.
fn push_placing(m: &Migration) -> String {
    super::ms_figures(m, "postcopy push placed", 2)
}

struct Case {
    what: &'static str,
    postcopy: bool,
    channels: usize,
}

const CASES: [Case; 5] = [
    Case {
        what: "precopy, 1 channel",
        postcopy: false,
        channels: 1,
    },
    Case {
        what: "precopy, 2 channels",
        postcopy: false,
        channels: 2,
    },
    Case {
        what: "pure postcopy, push on the main connection (channels=0)",
        postcopy: true,
        channels: 0,
    },
    Case {
        what: "pure postcopy, push on 1 channel",
        postcopy: true,
        channels: 1,
    },
    Case {
        what: "pure postcopy, push on 2 channels",
        postcopy: true,
        channels: 2,
    },
];

pub fn table(dir: &Path, rounds: usize) -> Result<()> {
    println!(
        "| round | filled idle 1 GiB guest | total ms | downtime ms | MB/s | of the fresh-memory \
         limit | of precopy, same channels (0: 1 channel) | destination push receive / place ms |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    // MB/s of every case in every round, for the medians at the end.
    let mut all: Vec<Vec<f64>> = vec![Vec::new(); CASES.len()];
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); CASES.len()];
    for round in 1..=rounds {
        let fresh = raw_socket_copy_fresh()?;
        println!("| {round} | raw copy into 1 GiB of fresh memory (the limit) | – | – | {fresh:.0} | 100 % | – | – |");
        let mut precopy = [f64::NAN; 3];
        for (i, c) in CASES.iter().enumerate() {
            let suffix = format!(",channels={}", c.channels);
            let mut src = vec![
                "--memory",
                "size=1200M",
                "--cmdline",
                "suite=idle fill=1024",
            ];
            let mut dst = vec!["--serial", "off", "--log-level", "info"];
            if c.postcopy {
                src.extend(["--postcopy", "--postcopy-after-iterations", "0"]);
                dst.push("--postcopy");
            }
            let m = migrate_run_uri(
                dir,
                &format!("p{round}-{i}"),
                &src,
                "idle: halting",
                &dst,
                &suffix,
            )?;
            let s = &m.status;
            if c.postcopy && s["postcopy"].is_null() {
                bail!("{}: ended without a postcopy phase: {s}", c.what);
            }
            let mbps = s["throughput_mbps"].as_f64().unwrap_or(f64::NAN);
            all[i].push(mbps);
            let of_precopy = if c.postcopy {
                let r = mbps / precopy[c.channels.max(1)];
                ratios[i].push(r);
                format!("{:.0} %", r * 100.0)
            } else {
                precopy[c.channels] = mbps;
                "–".into()
            };
            let placing = if c.postcopy {
                push_placing(&m)
            } else {
                "–".into()
            };
            println!(
                "| {round} | {} | {:.1} | {:.1} | {mbps:.0} | {:.0} % | {of_precopy} | {placing} |",
                c.what,
                s["total_ms"].as_f64().unwrap_or(f64::NAN),
                s["downtime_ms"].as_f64().unwrap_or(f64::NAN),
                mbps / fresh * 100.0,
            );
        }
    }
    println!();
    println!("| over {rounds} rounds | median MB/s | min–max MB/s | median of the same round's precopy (0: 1 channel) |");
    println!("|---|---|---|---|");
    for (i, c) in CASES.iter().enumerate() {
        let (lo, hi) = all[i]
            .iter()
            .fold((f64::MAX, 0f64), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
        let ratio = if c.postcopy {
            format!("{:.0} %", median(&mut ratios[i]) * 100.0)
        } else {
            "–".into()
        };
        println!(
            "| {} | {:.0} | {lo:.0}–{hi:.0} | {ratio} |",
            c.what,
            median(&mut all[i])
        );
    }
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

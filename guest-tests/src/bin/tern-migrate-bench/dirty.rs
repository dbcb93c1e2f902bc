//! `tern-migrate-bench dirty`: the `dirty mib=256` guest's own write rate (its rounds, each
//! rewriting the 256 MiB working set) before and during a precopy that cannot converge, with
//! each way of fetching dirty pages (`TERN_DIRTY_LOG`), 1 or 2 RAM channels, and the passes
//! back to back or paced (`--precopy-guest-share`).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::{remote, start, start_env, Tern};

const WORKING_SET_MIB: u64 = 256;
const BEFORE: Duration = Duration::from_secs(3);
/// The throttled link: pass 0 (~290 MB) alone takes ~2 s, long enough to count rounds.
const THROTTLE: u64 = 150_000_000;
/// Direct precopy runs this long (its timeout) whatever the pacing, so both count ~20 rounds.
const DIRECT_SECONDS: &str = "6";

/// Rounds a second between `from` and `to`: the rounds completed in that window (reports are
/// ~4 a second) over its length.
fn rounds_per_s(t: &Tern, from: Instant, to: Instant) -> f64 {
    let rounds = t.rounds.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let at_start = rounds.iter().rev().find(|(at, _)| *at <= from);
    let at_end = rounds.iter().rev().find(|(at, _)| *at <= to);
    match (at_start, at_end) {
        (Some((_, a)), Some((_, b))) => b.saturating_sub(*a) as f64 / (to - from).as_secs_f64(),
        _ => f64::NAN,
    }
}

fn mb_s(rounds_per_s: f64) -> f64 {
    rounds_per_s * (WORKING_SET_MIB << 20) as f64 / 1e6
}

struct Row {
    before: f64,
    during: f64,
    status: serde_json::Value,
}

/// One migration of the dirty guest with dirty-log `method`; `throttle` (bytes/s) sends the
/// main connection through a relay that slow, so precopy lasts seconds (one channel only).
fn measure(
    dir: &Path,
    name: &str,
    method: &str,
    channels: usize,
    throttle: Option<u64>,
    share: u8,
) -> Result<Row> {
    let sock = dir.join(format!("{name}.sock"));
    let mig = format!("unix:{}", dir.join(format!("{name}.mig")).display());
    // Writes only: with its read-back the guest dirties nothing for a while each round, and a
    // precopy that waits for nothing dirty would end there.
    let cmd = format!("suite=dirty mib={WORKING_SET_MIB} static=16 verify=0");
    let sock_s = sock.to_string_lossy().into_owned();
    let src = start_env(
        &[
            "--memory",
            "size=1G",
            "--cmdline",
            &cmd,
            // Never converged (something is always dirty): a precopy of exactly this many passes
            // through the relay, of DIRECT_SECONDS otherwise.
            "--downtime-ms",
            "0",
            "--max-iterations",
            if throttle.is_some() { "4" } else { "100000" },
            "--timeout",
            if throttle.is_some() {
                "120"
            } else {
                DIRECT_SECONDS
            },
            "--precopy-guest-share",
            &share.to_string(),
            "--api-socket",
            &sock_s,
        ],
        "dirty round=",
        &[("TERN_DIRTY_LOG", method)],
    )?;
    let dst = start(
        &["--incoming", &mig, "--serial", "off"],
        "waiting for an incoming migration",
    )?;
    let relay = dir.join(format!("{name}.relay"));
    let _proxy = match throttle {
        // The main connection and the RAM channel, each throttled.
        Some(rate) => Some(guest_tests::relay::Proxy::start_each(
            &relay,
            &dir.join(format!("{name}.mig")),
            vec![guest_tests::relay::Plan::ThrottleForward(rate); 2],
        )?),
        None => None,
    };
    let target = match throttle {
        Some(_) => format!("unix:{}", relay.display()),
        None => mig.clone(),
    };
    std::thread::sleep(BEFORE);
    let t0 = Instant::now();
    let status = remote(
        &sock,
        &["migrate", &format!("{target},channels={channels}")],
    )?;
    let t1 = Instant::now();
    drop(dst);
    if status["state"] != "completed" {
        bail!("{name}: the migration did not complete: {status}");
    }
    Ok(Row {
        before: rounds_per_s(&src, t0 - BEFORE, t0),
        during: rounds_per_s(&src, t0, t1),
        status,
    })
}

/// A way of fetching dirty pages: `TERN_DIRTY_LOG` and its label.
type Method = (&'static str, &'static str);

const GET: Method = ("get", "KVM_GET_DIRTY_LOG (whole slot re-protected)");
const CLEAR: Method = (
    "clear-initially-set",
    "manual protect, 4 MiB KVM_CLEAR_DIRTY_LOG",
);

pub fn table(dir: &Path) -> Result<()> {
    println!(
        "| dirty log | link | channels | guest share | guest MB/s before (rounds) | during precopy \
         (rounds) | kept | during precopy (dirty log) | precopy ms | paced ms | iterations |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    // Method, throttle, channels, guest share.
    let rows: [(Method, Option<u64>, usize, u8); 8] = [
        (CLEAR, Some(THROTTLE), 1, 0),
        (GET, None, 1, 0),
        (GET, None, 1, 50),
        (CLEAR, None, 1, 0),
        (CLEAR, None, 1, 50),
        (CLEAR, None, 1, 75),
        (CLEAR, None, 2, 0),
        (CLEAR, None, 2, 50),
    ];
    for ((method, label), throttle, channels, share) in rows {
        let link = if throttle.is_some() {
            "relay, 150 MB/s"
        } else {
            "direct"
        };
        let name = format!("d-{method}-{channels}-{share}-{}", throttle.is_some());
        let r = measure(dir, &name, method, channels, throttle, share)?;
        let (before, during) = (mb_s(r.before), mb_s(r.during));
        let num = |k: &str| r.status[k].as_f64().unwrap_or(f64::NAN);
        let pacing = if share == 0 {
            "back to back".to_string()
        } else {
            format!("{share} %")
        };
        println!(
            "| {label} | {link} | {channels} | {pacing} | {before:.0} | {during:.0} | {:.0} % | \
             {:.0} | {:.0} | {:.0} | {} |",
            during / before * 100.0,
            num("dirty_rate_mbps"),
            num("total_ms"),
            num("paced_ms"),
            r.status["iteration"].as_u64().unwrap_or(0),
        );
    }
    Ok(())
}

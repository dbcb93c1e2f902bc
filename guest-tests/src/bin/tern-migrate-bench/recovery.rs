//! Postcopy recovery: the connection is cut in the middle of the push of a 1 GiB guest that reads
//! 512 MiB at random; both sides pause; then the destination listens anew and the source
//! reconnects. Measures the destination's time from the reconnection to the guest running again,
//! the pages still missing and the requests sent again.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use guest_tests::relay::{Plan, Proxy};

use super::{remote, start};

fn wait_state(sock: &Path, want: &str) -> Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let v = remote(sock, &["migrate-status"])?;
        if v["state"] == want {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("never reached {want}: {v}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub(super) fn recovery_table(dir: &Path) -> Result<()> {
    println!(
        "| cut after (MB pushed) | pages missing at the reconnection | requests sent again | \
         reconnection -> guest running (ms) | recovered push to END (ms) |"
    );
    println!("|---|---|---|---|---|");
    for cut_mb in [64u64, 256, 512] {
        let (a, b) = (dir.join("rec-a.sock"), dir.join("rec-b.sock"));
        let (a_s, b_s) = (a.to_string_lossy(), b.to_string_lossy());
        let _src = start(
            &[
                "--memory",
                "size=1G",
                "--postcopy",
                "--postcopy-after-iterations",
                "0",
                "--cmdline",
                "suite=touch mib=512",
                "--api-socket",
                &a_s,
            ],
            "touch n=",
        )?;
        let real = dir.join("rec-mig.sock");
        let mig = format!("unix:{}", real.display());
        let _dst = start(
            &["--incoming", &mig, "--postcopy", "--api-socket", &b_s],
            "waiting for an incoming migration",
        )?;
        let relay = dir.join("rec-relay.sock");
        let _ = std::fs::remove_file(&relay);
        let cut = Proxy::start(&relay, &real, Plan::CutForwardAfter(cut_mb << 20))?;
        // Fails: the relay cuts the stream.
        // The relay carries the first connection only: the push stays on it (no RAM channels).
        let _ = remote(
            &a,
            &[
                "migrate",
                &format!("unix:{},channels=0", cut.path.display()),
            ],
        );
        wait_state(&a, "postcopy-paused")?;
        wait_state(&b, "postcopy-paused")?;
        let rec = format!("unix:{}", dir.join("rec-again.sock").display());
        remote(&b, &["migrate-recover", &rec])?;
        let t0 = Instant::now();
        let done = remote(&a, &["migrate", "--resume", &rec])?;
        let push_ms = t0.elapsed().as_secs_f64() * 1e3;
        if done["state"] != "completed" {
            bail!("recovery did not complete: {done}");
        }
        let d = remote(&b, &["migrate-status"])?;
        println!(
            "| {cut_mb} | {} | {} | {:.1} | {push_ms:.0} |",
            d["recovered_pages"],
            d["recovery_requests_resent"],
            d["recovery_ms"].as_f64().unwrap_or(f64::NAN),
        );
        let _ = remote(&b, &["quit"]);
    }
    Ok(())
}

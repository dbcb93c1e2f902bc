//! Postcopy's background push over the RAM channels (`migrate URI,channels=N` with postcopy):
//! the dirty guest moves by pure postcopy with its push split over two channels and finishes
//! with the checksum of a run that never migrated; a channel cut during the push pauses both
//! sides like a cut main connection, and a recovery finishes the migration without losing a write.

mod common;

use std::time::Duration;

use common::proxy::{Plan, Proxy};
use common::{dirty_round, remote, remote_json, scratch, wait_migration_state, Running};

const WAIT: Duration = Duration::from_secs(180);
const ROUNDS: u64 = 400;

fn guest() -> String {
    format!("suite=dirty mib=64 static=16 rounds={ROUNDS}")
}

/// The pure-postcopy source (after a few rounds) and a postcopy destination logging at info.
fn pair(dir: &std::path::Path) -> (Running, Running, String, String) {
    let sock = |n: &str| dir.join(n).to_string_lossy().into_owned();
    let (a, b) = (sock("a.sock"), sock("b.sock"));
    let src = Running::spawn(&[
        "--memory",
        "size=512M",
        "--cmdline",
        &guest(),
        "--api-socket",
        &a,
        "--postcopy",
        "--postcopy-after-iterations",
        "0",
    ]);
    assert!(
        src.wait_stdout(WAIT, |l| dirty_round(l).is_some_and(|r| r >= 5))
            .is_some(),
        "{}",
        src.describe()
    );
    let dst = Running::spawn(&[
        "--incoming",
        &format!("unix:{}", dir.join("mig.sock").display()),
        "--postcopy",
        "--api-socket",
        &b,
        "--log-level",
        "info",
    ]);
    assert!(dst.wait_stderr(WAIT, "waiting for an incoming migration"));
    (src, dst, a, b)
}

fn assert_same_final_checksum(reference: &mut Running, dst: &mut Running) {
    common::assert_same_final_checksum(reference, dst, ROUNDS, WAIT);
}

#[test]
fn pure_postcopy_pushes_over_two_channels_without_losing_a_write() {
    let dir = scratch("pc-channels");
    // The same workload without migration, alongside: its last round's checksum is the truth.
    let mut reference = Running::spawn(&["--memory", "size=512M", "--cmdline", &guest()]);
    let (src, mut dst, a, _b) = pair(&dir);
    let mig = format!("unix:{},channels=2", dir.join("mig.sock").display());
    let v = remote_json(&a, &["migrate", &mig]);
    assert_eq!(v["state"], "completed", "{v}");
    assert_eq!(v["channels"], 2, "{v}");
    let p = &v["postcopy"];
    // Every page of the 512 MiB guest was missing at the switch and came one way or the other.
    let missing = p["missing_at_switch"].as_u64().unwrap_or(0);
    assert_eq!(missing, 512 << 8, "{v}");
    let (pushed, requested) = (
        p["pages_pushed"].as_u64().unwrap_or(0),
        p["pages_requested"].as_u64().unwrap_or(0),
    );
    assert_eq!(pushed + requested, missing, "{v}");
    // The push went over the channels: the destination placed it from two connections.
    assert!(
        dst.wait_stderr(WAIT, "on 2 connection(s)"),
        "{}",
        dst.describe()
    );
    drop(src);
    assert_same_final_checksum(&mut reference, &mut dst);
}

#[test]
fn channel_cut_during_the_push_pauses_both_sides_and_recovers() {
    let dir = scratch("pc-channel-cut");
    let mut reference = Running::spawn(&["--memory", "size=512M", "--cmdline", &guest()]);
    let (src, mut dst, a, b) = pair(&dir);
    // Connections: the main one, channels 0 and 1, then the preempt channel; channel 1 breaks
    // 8 MiB into its share of the push (~40 MiB of the guest's data).
    let relay = Proxy::start_each(
        &dir.join("relay.sock"),
        &dir.join("mig.sock"),
        vec![Plan::Pass, Plan::Pass, Plan::CutForwardAfter(8 << 20)],
    )
    .expect("relay");
    let o = remote(
        &a,
        &[
            "migrate",
            &format!("unix:{},channels=2", relay.path.display()),
        ],
    );
    assert_ne!(o.code, Some(0), "{}", o.describe());
    // The destination runs the guest: the source holds the pages it lacks, paused.
    let st = wait_migration_state(&a, "postcopy-paused", &src, WAIT);
    assert!(
        st["error"].as_str().unwrap_or("").contains("RAM channel 1"),
        "{st}"
    );
    let st = wait_migration_state(&b, "postcopy-paused", &dst, WAIT);
    // The destination names what it lacks (the source's "with all its memory" is not true here).
    let why = st["error"].as_str().unwrap_or("");
    assert!(
        why.contains("pages are still missing here (they never arrived"),
        "{st}"
    );
    assert!(!why.contains("with all its memory"), "{st}");
    // Recovered over one new connection.
    let rec = dir.join("rec.sock");
    remote_json(&b, &["migrate-recover", &format!("unix:{}", rec.display())]);
    let v = remote_json(
        &a,
        &["migrate", "--resume", &format!("unix:{}", rec.display())],
    );
    assert_eq!(v["state"], "completed", "{v}");
    assert!(v["recovered_pages"].as_u64() > Some(0), "{v}");
    drop(src);
    assert_same_final_checksum(&mut reference, &mut dst);
}

#[test]
fn hybrid_postcopy_keeps_the_channels_for_the_push() {
    let dir = scratch("pc-channels-hybrid");
    let mut reference = Running::spawn(&["--memory", "size=512M", "--cmdline", &guest()]);
    let a = dir.join("a.sock").to_string_lossy().into_owned();
    // One precopy iteration, then the switch (a zero downtime budget never converges while the
    // guest writes).
    let src = Running::spawn(&[
        "--memory",
        "size=512M",
        "--cmdline",
        &guest(),
        "--api-socket",
        &a,
        "--postcopy",
        "--postcopy-after-iterations",
        "1",
        "--downtime-ms",
        "0",
    ]);
    assert!(
        src.wait_stdout(WAIT, |l| dirty_round(l).is_some_and(|r| r >= 5))
            .is_some(),
        "{}",
        src.describe()
    );
    let mig = dir.join("mig.sock");
    let mut dst = Running::spawn(&[
        "--incoming",
        &format!("unix:{}", mig.display()),
        "--postcopy",
        "--log-level",
        "info",
    ]);
    assert!(dst.wait_stderr(WAIT, "waiting for an incoming migration"));
    let v = remote_json(
        &a,
        &["migrate", &format!("unix:{},channels=2", mig.display())],
    );
    assert_eq!(v["state"], "completed", "{v}");
    assert_eq!(v["channels"], 2, "{v}");
    assert!(v["postcopy"]["missing_at_switch"].as_u64() > Some(0), "{v}");
    // The pages dirtied after precopy sent them were pushed over the two channels.
    assert!(
        dst.wait_stderr(WAIT, "on 2 connection(s)"),
        "{}",
        dst.describe()
    );
    drop(src);
    assert_same_final_checksum(&mut reference, &mut dst);
}

#[test]
fn postcopy_bandwidth_holds_over_the_sum_of_the_channels() {
    let dir = scratch("pc-channels-paced");
    let a = dir.join("a.sock").to_string_lossy().into_owned();
    const LIMIT: f64 = (32 << 20) as f64;
    let src = Running::spawn(&[
        "--memory",
        "size=256M",
        "--cmdline",
        "suite=idle fill=96",
        "--api-socket",
        &a,
        "--postcopy",
        "--postcopy-after-iterations",
        "0",
        "--postcopy-bandwidth",
        "32M",
    ]);
    assert!(
        src.wait_stdout(WAIT, |l| l.contains("idle: halting"))
            .is_some(),
        "{}",
        src.describe()
    );
    let mig = dir.join("mig.sock");
    let dst = Running::spawn(&[
        "--incoming",
        &format!("unix:{}", mig.display()),
        "--postcopy",
        "--log-level",
        "info",
    ]);
    assert!(dst.wait_stderr(WAIT, "waiting for an incoming migration"));
    let v = remote_json(
        &a,
        &["migrate", &format!("unix:{},channels=2", mig.display())],
    );
    assert_eq!(v["state"], "completed", "{v}");
    assert!(
        dst.wait_stderr(WAIT, "on 2 connection(s)"),
        "{}",
        dst.describe()
    );
    // ~96 MiB pushed: two channels each held to the limit would take half as long as this.
    let bytes = v["bytes"].as_f64().unwrap_or(0.0);
    assert!(bytes > (90 << 20) as f64, "{v}");
    let ms = v["total_ms"].as_f64().unwrap_or(0.0);
    assert!(
        ms >= 0.9 * bytes / LIMIT * 1e3,
        "{bytes} bytes in {ms} ms: faster than 32 MiB/s\n{v}"
    );
}

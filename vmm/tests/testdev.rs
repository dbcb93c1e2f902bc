//! pc-testdev (`--testdev on`): a guest flushing pages through its port while a migration copies
//! them never kills tern (QEMU's flush takes the page's access away for a moment; any thread
//! copying it then died of SIGSEGV), and the device travels with the guest.

mod common;

use std::time::Duration;

use common::{assert_no_failure, dirty_round, remote_json, scratch, wait_progress, Running};

const WAIT: Duration = Duration::from_secs(120);

#[test]
fn a_guest_flushing_pages_during_a_migration_never_kills_tern() {
    let dir = scratch("testdev-flush");
    let a = dir.join("a.sock").to_string_lossy().into_owned();
    // 512 of the 4096 working-set pages flushed every round, as the sender copies them.
    let mut src = Running::spawn(&[
        "--testdev",
        "on",
        "--memory",
        "size=128M",
        "--cmdline",
        "suite=dirty mib=16 static=8 flush=512",
        "--api-socket",
        &a,
        "--downtime-ms",
        "50",
    ]);
    wait_progress(&src, 2);
    let mig = dir.join("mig.sock");
    let dst = Running::spawn(&["--incoming", &format!("unix:{}", mig.display())]);
    assert!(dst.wait_stderr(WAIT, "waiting for an incoming migration"));
    let v = remote_json(&a, &["migrate", &format!("unix:{}", mig.display())]);
    assert_eq!(v["state"], "completed", "{v}\n{}", src.describe());
    assert_eq!(src.wait_exit(WAIT), Some(0), "{}", src.describe());
    // The destination runs the guest on, flushes and all, and its memory verifies.
    let first = dst
        .wait_stdout(WAIT, |l| dirty_round(l).is_some())
        .and_then(|l| dirty_round(&l))
        .unwrap_or(0);
    wait_progress(&dst, first + 2);
    assert_no_failure(&dst);
}

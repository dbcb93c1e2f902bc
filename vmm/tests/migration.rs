//! Live migration between real tern processes with a running guest.

mod common;

use std::time::Duration;

use common::{assert_no_failure, last_round, remote, remote_json, scratch, wait_progress, Running};

const WAIT: Duration = Duration::from_secs(60);

#[test]
fn dirty_guest_migrates_there_and_back_five_times() {
    let dir = scratch("hops");
    let sock = |n: usize| {
        dir.join(format!("api{n}.sock"))
            .to_string_lossy()
            .into_owned()
    };
    let mig = |n: usize| format!("unix:{}", dir.join(format!("mig{n}.sock")).display());
    let mut current = Running::spawn(&[
        "--memory",
        "size=256M",
        "--cmdline",
        "suite=dirty mib=32",
        "--api-socket",
        &sock(0),
    ]);
    let mut round = wait_progress(&current, 0);
    for hop in 1..=5 {
        let next = Running::spawn(&["--incoming", &mig(hop), "--api-socket", &sock(hop)]);
        assert!(
            next.wait_stderr(WAIT, "waiting for an incoming migration"),
            "{}",
            next.describe()
        );
        let o = remote(&sock(hop - 1), &["migrate", &mig(hop)]);
        assert_eq!(
            o.code,
            Some(0),
            "hop {hop}: {}\nsource:\n{}",
            o.describe(),
            current.describe()
        );
        assert!(o.stdout.contains("\"completed\""), "{}", o.describe());
        assert_eq!(
            current.wait_exit(WAIT),
            Some(0),
            "source of hop {hop}\n{}",
            current.describe()
        );
        assert_no_failure(&current);
        assert!(
            next.wait_stderr(WAIT, "migration completed (destination)"),
            "{}",
            next.describe()
        );
        // The guest continues where it was: rounds go on from the source's last one.
        let r = wait_progress(&next, round);
        assert!(r > round, "hop {hop}: round {r} after {round}");
        round = r;
        assert_no_failure(&next);
        current = next;
    }
    let o = remote(&sock(5), &["quit"]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    assert_eq!(current.wait_exit(WAIT), Some(0), "{}", current.describe());
    assert_no_failure(&current);
}

#[test]
fn snapshot_to_file_and_restore_in_a_new_process() {
    let dir = scratch("snapshot");
    let snap = dir.join("guest.snap");
    let sock = dir.join("api.sock").to_string_lossy().into_owned();
    let mut src = Running::spawn(&[
        "--memory",
        "size=128M",
        "--cmdline",
        "suite=dirty mib=16",
        "--api-socket",
        &sock,
    ]);
    let round = wait_progress(&src, 1);
    let uri = format!("file:{}", snap.display());
    let o = remote(&sock, &["migrate", &uri]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    assert_eq!(src.wait_exit(WAIT), Some(0), "{}", src.describe());
    let restored = Running::spawn(&["--incoming", &uri]);
    let r = wait_progress(&restored, round);
    assert!(r > round);
    assert_no_failure(&restored);
}

#[test]
fn killed_destination_leaves_the_source_running() {
    let dir = scratch("killdst");
    let sock = dir.join("api.sock").to_string_lossy().into_owned();
    let mig = format!("unix:{}", dir.join("mig.sock").display());
    let src = Running::spawn(&[
        "--memory",
        "size=1536M",
        "--cmdline",
        // 1.3 GB in the first pass: still sending when the destination dies, however fast.
        "suite=dirty mib=256 static=1024",
        "--api-socket",
        &sock,
        "--downtime-ms",
        "1",
    ]);
    wait_progress(&src, 0);
    let mut dst = Running::spawn(&["--incoming", &mig]);
    assert!(dst.wait_stderr(WAIT, "waiting for an incoming migration"));
    let o = remote(&sock, &["migrate", "--detach", &mig]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    // Kill the destination while precopy is still sending.
    std::thread::sleep(Duration::from_millis(300));
    let _ = dst.child.kill();
    let _ = dst.wait_exit(WAIT);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let s = remote(&sock, &["migrate-status"]);
        if s.stdout.contains("\"failed\"") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "migration never failed: {}\n--- source\n{}",
            s.describe(),
            src.describe()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = last_round(&src);
    wait_progress(&src, before);
    assert_no_failure(&src);
    let st = remote(&sock, &["status"]);
    assert!(st.stdout.contains("\"running\""), "{}", st.describe());
}

#[test]
fn corrupted_or_truncated_snapshots_are_refused() {
    let dir = scratch("corrupt");
    let snap = dir.join("guest.snap");
    let sock = dir.join("api.sock").to_string_lossy().into_owned();
    let mut src = Running::spawn(&[
        "--memory",
        "size=64M",
        "--cmdline",
        "suite=dirty mib=8",
        "--api-socket",
        &sock,
    ]);
    wait_progress(&src, 0);
    let uri = format!("file:{}", snap.display());
    assert_eq!(remote(&sock, &["migrate", &uri]).code, Some(0));
    assert_eq!(src.wait_exit(WAIT), Some(0));
    let good = std::fs::read(&snap).unwrap();

    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x01;
    let bad = dir.join("flipped.snap");
    std::fs::write(&bad, &flipped).unwrap();
    let o = common::run_tern(&["--incoming", &format!("file:{}", bad.display())], WAIT);
    assert_ne!(o.code, Some(0), "{}", o.describe());
    assert!(
        o.stderr.contains("checksum mismatch in"),
        "{}",
        o.describe()
    );

    let cut = dir.join("cut.snap");
    std::fs::write(&cut, &good[..good.len() * 2 / 3]).unwrap();
    let o = common::run_tern(&["--incoming", &format!("file:{}", cut.display())], WAIT);
    assert_ne!(o.code, Some(0), "{}", o.describe());
    assert!(o.stderr.contains("stream truncated in"), "{}", o.describe());
}

#[test]
fn second_concurrent_migrate_is_refused() {
    let dir = scratch("twice");
    let sock = dir.join("api.sock").to_string_lossy().into_owned();
    let mig = format!("unix:{}", dir.join("mig.sock").display());
    let src = Running::spawn(&[
        "--memory",
        "size=128M",
        "--cmdline",
        "suite=dirty mib=16",
        "--api-socket",
        &sock,
    ]);
    wait_progress(&src, 0);
    // Nobody listens at `mig` yet, so a unix connect fails at once; use a destination that
    // accepts and then stalls: a plain listener that never reads.
    let path = dir.join("mig.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let first = remote(&sock, &["migrate", "--detach", &mig]);
    assert_eq!(first.code, Some(0), "{}", first.describe());
    let second = remote(&sock, &["migrate", "--detach", &mig]);
    assert_ne!(second.code, Some(0), "{}", second.describe());
    assert!(
        second.stderr.contains("already in progress"),
        "{}",
        second.describe()
    );
}

/// A guest that never converges (`--downtime-ms 0`, writes only): precopy waits between its
/// passes (pacing at the default share), the destination keeps the connections through the
/// waits, and the guest goes on verifying its rounds there.
#[test]
fn paced_precopy_of_a_writing_guest_completes() {
    let dir = scratch("paced");
    let a = dir.join("a.sock").to_string_lossy().into_owned();
    let b = dir.join("b.sock").to_string_lossy().into_owned();
    let mig = format!("unix:{}", dir.join("mig.sock").display());
    let mut src = Running::spawn(&[
        "--memory",
        "size=256M",
        "--cmdline",
        "suite=dirty mib=64",
        "--api-socket",
        &a,
        "--downtime-ms",
        "0",
        "--max-iterations",
        "3",
    ]);
    let round = wait_progress(&src, 0);
    let dst = Running::spawn(&["--incoming", &mig, "--api-socket", &b]);
    assert!(dst.wait_stderr(WAIT, "waiting for an incoming migration"));
    let result = remote_json(&a, &["migrate", &format!("{mig},channels=1")]);
    assert_eq!(result["state"], "completed", "{result}");
    // The guest dirtied thousands of pages a pass: each wait is that many faults' worth.
    let paced = result["paced_ms"].as_f64().unwrap_or(0.0);
    assert!(paced > 0.0, "precopy never waited: {result}");
    assert_eq!(src.wait_exit(WAIT), Some(0), "{}", src.describe());
    let r = wait_progress(&dst, round);
    assert!(r > round, "round {r} after {round}");
    assert_no_failure(&dst);
}

//! One owner of the guest at every moment: a lost reply, a broken postcopy, a cancel and a
//! long postcopy never leave the guest running twice, lost, or failed while pages still flow.
//! A fault-injection relay (`common::proxy`) sits between the two tern processes.

mod common;

use std::time::{Duration, Instant};

use common::proxy::{Dir, Plan, Proxy};
use common::{
    dirty_round, last_round, remote, remote_json, scratch, wait_migration_state, wait_socket,
    Running,
};

const WAIT: Duration = Duration::from_secs(120);
/// Short peer timeout for these tests: silence this long means a dead peer.
const PEER_TIMEOUT_MS: &str = "2000";

fn vm_state(sock: &str) -> String {
    remote_json(sock, &["status"])["state"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// Waits until the guest printed a round beyond `after`.
fn wait_round(r: &Running, after: u64) -> bool {
    r.wait_stdout(WAIT, |l| dirty_round(l).is_some_and(|n| n > after))
        .is_some()
}

#[test]
fn lost_resumed_reply_leaves_exactly_one_running_guest() {
    let dir = scratch("own-lost-resumed");
    let a = dir.join("a.sock").to_string_lossy().into_owned();
    let b = dir.join("b.sock").to_string_lossy().into_owned();
    let env = [("TERN_PEER_TIMEOUT_MS", PEER_TIMEOUT_MS)];
    let src = Running::spawn_env(
        &[
            "--memory",
            "size=128M",
            "--cmdline",
            "suite=dirty mib=16",
            "--api-socket",
            &a,
        ],
        &env,
    );
    assert!(wait_round(&src, 0), "{}", src.describe());
    let real = dir.join("mig.sock");
    let dst = Running::spawn_env(
        &[
            "--incoming",
            &format!("unix:{}", real.display()),
            "--api-socket",
            &b,
        ],
        &env,
    );
    assert!(dst.wait_stderr(WAIT, "waiting for an incoming migration"));
    // Everything the destination says (its Resumed, its heartbeats) is lost on the way.
    // (The RAM channels, later connections, pass through untouched.)
    let proxy = Proxy::start_each(
        &dir.join("relay.sock"),
        &real,
        vec![Plan::Swallow(Dir::Back)],
    )
    .expect("relay");
    let o = remote(&a, &["migrate", &format!("unix:{}", proxy.path.display())]);
    assert_ne!(o.code, Some(0), "{}", o.describe());
    // The destination resumed the guest and runs it...
    wait_socket(&b, WAIT);
    let resumed_at = last_round(&dst);
    assert!(wait_round(&dst, resumed_at), "{}", dst.describe());
    assert_eq!(vm_state(&b), "running");
    // ...so the source must not: it is parked, and `resume` is refused.
    let st = wait_migration_state(&a, "postmigrate", &src, WAIT);
    assert!(
        st["error"]
            .as_str()
            .unwrap_or("")
            .contains("did not confirm"),
        "{st}"
    );
    assert_eq!(vm_state(&a), "paused");
    let before = last_round(&src);
    let o = remote(&a, &["resume"]);
    assert_ne!(o.code, Some(0), "{}", o.describe());
    assert!(o.stderr.contains("refused"), "{}", o.describe());
    // A second migration of the parked copy would fork the guest (to a live third process) or,
    // failing (nobody there), turn the state into one that `resume` accepts: both refused.
    let third = dir.join("third.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&third).unwrap();
    for target in [
        format!("unix:{}", third.display()),
        "unix:/nonexistent".into(),
    ] {
        let o = remote(&a, &["migrate", &target]);
        assert_ne!(o.code, Some(0), "{}", o.describe());
        assert!(
            o.stderr.contains("refused in state postmigrate"),
            "{}",
            o.describe()
        );
        let st = remote_json(&a, &["migrate-status"]);
        assert_eq!(st["state"], "postmigrate", "{st}");
    }
    let o = remote(&a, &["resume"]);
    assert!(o.stderr.contains("refused"), "{}", o.describe());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(last_round(&src), before, "the parked source ran its guest");
    assert_eq!(vm_state(&a), "paused");
    assert!(
        src.stderr_text().contains("stays paused here"),
        "{}",
        src.describe()
    );
}

#[test]
fn broken_postcopy_pauses_both_sides_and_refuses_resume() {
    let dir = scratch("own-postcopy-cut");
    let a = dir.join("a.sock").to_string_lossy().into_owned();
    let b = dir.join("b.sock").to_string_lossy().into_owned();
    let src = Running::spawn(&[
        "--memory",
        "size=512M",
        "--cmdline",
        "suite=dirty mib=256",
        "--api-socket",
        &a,
        "--postcopy",
        "--postcopy-after-iterations",
        "0",
    ]);
    assert!(wait_round(&src, 0), "{}", src.describe());
    let real = dir.join("mig.sock");
    let dst = Running::spawn(&[
        "--incoming",
        &format!("unix:{}", real.display()),
        "--postcopy",
        "--api-socket",
        &b,
    ]);
    assert!(dst.wait_stderr(WAIT, "waiting for an incoming migration"));
    // Cut the stream in the middle of the background push (256 MiB of data to move).
    let proxy = Proxy::start(
        &dir.join("relay.sock"),
        &real,
        Plan::CutForwardAfter(64 << 20),
    )
    .expect("relay");
    // The relay carries the first connection only: the push stays on it (no RAM channels).
    let o = remote(
        &a,
        &[
            "migrate",
            &format!("unix:{},channels=0", proxy.path.display()),
        ],
    );
    assert_ne!(o.code, Some(0), "{}", o.describe());
    assert!(proxy.bytes(Dir::Forward) >= 64 << 20);
    let st = wait_migration_state(&a, "postcopy-paused", &src, WAIT);
    assert!(
        st["error"]
            .as_str()
            .unwrap_or("")
            .contains("after the switch"),
        "{st}"
    );
    let dst_st = wait_migration_state(&b, "postcopy-paused", &dst, WAIT);
    assert!(
        dst_st["error"]
            .as_str()
            .unwrap_or("")
            .contains("never arrived"),
        "{dst_st}"
    );
    for sock in [&a, &b] {
        assert_eq!(vm_state(sock), "paused");
        let o = remote(sock, &["resume"]);
        assert_ne!(o.code, Some(0), "{}", o.describe());
        assert!(o.stderr.contains("refused"), "{}", o.describe());
        assert_eq!(vm_state(sock), "paused");
    }
    // Neither side migrates its incomplete copy on (to a third process or to nowhere), and a
    // failed attempt leaves both recoverable.
    let third = dir.join("third.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&third).unwrap();
    for sock in [&a, &b] {
        for target in [
            format!("unix:{}", third.display()),
            "unix:/nonexistent".into(),
        ] {
            let o = remote(sock, &["migrate", &target]);
            assert_ne!(o.code, Some(0), "{}", o.describe());
            assert!(
                o.stderr.contains("refused in state postcopy-paused"),
                "{}",
                o.describe()
            );
        }
        let st = remote_json(sock, &["migrate-status"]);
        assert_eq!(st["state"], "postcopy-paused", "{st}");
    }
    assert_eq!(remote_json(&b, &["migrate-status"])["role"], "destination");
    // The source holds pages the destination's guest needs: a plain quit is refused.
    let o = remote(&a, &["quit"]);
    assert!(o.stderr.contains("quit --force"), "{}", o.describe());
}

#[test]
fn cancel_in_precopy_keeps_the_guest_at_the_source() {
    let dir = scratch("own-cancel");
    let a = dir.join("a.sock").to_string_lossy().into_owned();
    let mut src = Running::spawn(&[
        "--memory",
        "size=1G",
        "--cmdline",
        "suite=dirty mib=32 static=768",
        "--api-socket",
        &a,
    ]);
    assert!(wait_round(&src, 0), "{}", src.describe());
    let mig = dir.join("mig.sock");
    let mut dst = Running::spawn(&["--incoming", &format!("unix:{}", mig.display())]);
    assert!(dst.wait_stderr(WAIT, "waiting for an incoming migration"));
    let o = remote(
        &a,
        &["migrate", "--detach", &format!("unix:{}", mig.display())],
    );
    assert_eq!(o.code, Some(0), "{}", o.describe());
    // Cancel in the middle of the first pass (~800 MB to send).
    let deadline = Instant::now() + WAIT;
    while remote_json(&a, &["migrate-status"])["bytes"].as_u64() < Some(64 << 20) {
        assert!(Instant::now() < deadline, "{}", src.describe());
        std::thread::sleep(Duration::from_millis(20));
    }
    let v = remote_json(&a, &["migrate-cancel"]);
    assert_eq!(v["cancelling"], true, "{v}");
    let st = wait_migration_state(&a, "cancelled", &src, WAIT);
    assert!(
        st["error"].as_str().unwrap_or("").contains("cancelled"),
        "{st}"
    );
    // The destination drops the guest with a clear message, never having run it.
    assert_eq!(dst.wait_exit(WAIT), Some(1), "{}", dst.describe());
    assert!(
        dst.stderr_text().contains("cancelled"),
        "{}",
        dst.describe()
    );
    assert!(
        !dst.stdout_lines().iter().any(|l| dirty_round(l).is_some()),
        "the destination ran the guest\n{}",
        dst.describe()
    );
    // The source runs on and its guest keeps verifying its memory every round.
    assert_eq!(vm_state(&a), "running");
    let now = last_round(&src);
    assert!(wait_round(&src, now + 2), "{}", src.describe());
    assert!(
        !src.stdout_lines().iter().any(|l| l.contains("FAIL")),
        "{}",
        src.describe()
    );
    // Nothing left to cancel.
    let o = remote(&a, &["migrate-cancel"]);
    assert_ne!(o.code, Some(0), "{}", o.describe());
    let _ = remote(&a, &["quit"]);
    assert_eq!(src.wait_exit(WAIT), Some(0), "{}", src.describe());
}

#[test]
fn postcopy_push_longer_than_the_peer_timeout_completes() {
    // An idle guest makes no page requests: before heartbeats, the source read the silent
    // return path as a dead destination once the push outlasted its read timeout.
    let dir = scratch("own-long-push");
    let a = dir.join("a.sock").to_string_lossy().into_owned();
    let env = [("TERN_PEER_TIMEOUT_MS", PEER_TIMEOUT_MS)];
    let mut src = Running::spawn_env(
        &[
            "--memory",
            "size=1G",
            "--cmdline",
            "suite=idle fill=384",
            "--api-socket",
            &a,
            "--postcopy",
            "--postcopy-after-iterations",
            "0",
        ],
        &env,
    );
    assert!(
        src.wait_stdout(WAIT, |l| l.contains("idle: halting"))
            .is_some(),
        "{}",
        src.describe()
    );
    let mig = dir.join("mig.sock");
    let b = dir.join("b.sock").to_string_lossy().into_owned();
    // A slow link: 384 MiB of data at 100 MB/s is a push of about 4 s, twice the peer timeout.
    let proxy = Proxy::start(
        &dir.join("relay.sock"),
        &mig,
        Plan::ThrottleForward(100_000_000),
    )
    .expect("relay");
    let dst = Running::spawn_env(
        &[
            "--incoming",
            &format!("unix:{}", mig.display()),
            "--postcopy",
            "--api-socket",
            &b,
        ],
        &env,
    );
    assert!(dst.wait_stderr(WAIT, "waiting for an incoming migration"));
    // The relay carries the first connection only: the push stays on it (no RAM channels).
    let v = remote_json(
        &a,
        &[
            "migrate",
            &format!("unix:{},channels=0", proxy.path.display()),
        ],
    );
    assert_eq!(v["state"], "completed", "{v}");
    assert_eq!(src.wait_exit(WAIT), Some(0), "{}", src.describe());
    let st = remote_json(&b, &["migrate-status"]);
    assert_eq!(st["state"], "completed", "{st}");
    // The case this test is about: the push outlasted the peer timeout.
    let total = st["total_ms"].as_f64().unwrap_or(0.0);
    let timeout: f64 = PEER_TIMEOUT_MS.parse().unwrap();
    assert!(
        total > timeout,
        "push took {total} ms, not longer than {timeout} ms: {st}"
    );
}

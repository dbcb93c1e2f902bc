//! RAM channels (`migrate URI,channels=N`): the dirty guest moves there and back with 1 and 4
//! channels (and over TCP) and keeps verifying its memory; a channel cut mid-pass leaves the
//! source running.

mod common;

use std::time::Duration;

use common::proxy::{Plan, Proxy};
use common::{dirty_round, remote_json, scratch, Running};

const WAIT: Duration = Duration::from_secs(60);

fn last_round(p: &Running) -> u64 {
    p.stdout_lines()
        .iter()
        .filter_map(|l| dirty_round(l))
        .max()
        .unwrap_or(0)
}

fn assert_no_failure(p: &Running) {
    assert!(
        !p.stdout_lines().iter().any(|l| l.contains("FAIL")),
        "guest reported a failure\n{}",
        p.describe()
    );
}

fn wait_progress(p: &Running, after: u64) -> u64 {
    let line = p.wait_stdout(WAIT, |l| dirty_round(l).is_some_and(|r| r > after));
    assert!(
        line.is_some(),
        "guest made no progress past round {after}\n{}",
        p.describe()
    );
    last_round(p)
}

/// A TCP port nobody listens on right now (the kernel's pick, released at once).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

#[test]
fn dirty_guest_moves_there_and_back_over_one_and_four_channels() {
    let dir = scratch("channels-hops");
    let sock = |n: usize| {
        dir.join(format!("api{n}.sock"))
            .to_string_lossy()
            .into_owned()
    };
    let unix = |n: usize| format!("unix:{}", dir.join(format!("m{n}.sock")).display());
    let mut current = Running::spawn(&[
        "--memory",
        "size=256M",
        "--cmdline",
        "suite=dirty mib=64 static=16",
        "--api-socket",
        &sock(0),
        "--downtime-ms",
        "30",
    ]);
    let mut round = wait_progress(&current, 1);
    let tcp = format!("tcp:127.0.0.1:{}", free_port());
    // A -> B -> A -> B: one channel, four, then four over TCP.
    let hops = [(unix(1), 1), (unix(2), 4), (tcp, 4)];
    for (hop, (uri, channels)) in hops.iter().enumerate() {
        let hop = hop + 1;
        let next = Running::spawn(&["--incoming", uri, "--api-socket", &sock(hop)]);
        assert!(
            next.wait_stderr(WAIT, "waiting for an incoming migration"),
            "{}",
            next.describe()
        );
        let target = format!("{uri},channels={channels}");
        let result = remote_json(&sock(hop - 1), &["migrate", &target]);
        assert_eq!(result["state"], "completed", "hop {hop}: {result}");
        assert_eq!(result["channels"], *channels, "hop {hop}: {result}");
        assert_eq!(current.wait_exit(WAIT), Some(0), "{}", current.describe());
        assert_no_failure(&current);
        assert!(next.wait_stderr(WAIT, "migration completed (destination)"));
        // Every round rewrites and verifies the working set and the static region: two more
        // rounds on the destination mean its memory is the source's.
        let r = wait_progress(&next, last_round(&current).max(round));
        round = wait_progress(&next, r);
        assert_no_failure(&next);
        current = next;
    }
    assert_eq!(common::remote(&sock(hops.len()), &["quit"]).code, Some(0));
    assert_eq!(current.wait_exit(WAIT), Some(0), "{}", current.describe());
    assert_no_failure(&current);
}

#[test]
fn cut_channel_leaves_the_source_running() {
    let dir = scratch("channels-cut");
    let sock = dir.join("a.sock").to_string_lossy().into_owned();
    let real = dir.join("m.sock");
    let mut src = Running::spawn(&[
        "--memory",
        "size=256M",
        "--cmdline",
        "suite=dirty mib=64 static=64",
        "--api-socket",
        &sock,
    ]);
    let round = wait_progress(&src, 1);
    let mut dst = Running::spawn(&["--incoming", &format!("unix:{}", real.display())]);
    assert!(dst.wait_stderr(WAIT, "waiting for an incoming migration"));
    // Connections: the main one, then channels 0 and 1; channel 1 breaks 4 MiB into pass 0
    // (which carries ~130 MiB).
    let relay = dir.join("relay.sock");
    let _proxy = Proxy::start_each(
        &relay,
        &real,
        vec![Plan::Pass, Plan::Pass, Plan::CutForwardAfter(4 << 20)],
    )
    .expect("relay");
    let target = format!("unix:{},channels=2", relay.display());
    let out = common::remote(&sock, &["migrate", &target]);
    assert_ne!(
        out.code,
        Some(0),
        "the migration succeeded: {}",
        out.describe()
    );
    let status = remote_json(&sock, &["migrate-status"]);
    assert_eq!(status["state"], "failed", "{status}");
    let error = status["error"].as_str().unwrap_or_default();
    assert!(error.contains("RAM channel 1"), "{status}");
    // The destination never got the guest: it gives up.
    assert!(
        dst.wait_exit(WAIT).is_some_and(|c| c != 0),
        "{}",
        dst.describe()
    );
    // The guest never stopped being the source's: it keeps verifying its memory here.
    let r = wait_progress(&src, round.max(last_round(&src)));
    wait_progress(&src, r);
    assert_no_failure(&src);
    assert_eq!(common::remote(&sock, &["quit"]).code, Some(0));
    assert_eq!(src.wait_exit(WAIT), Some(0), "{}", src.describe());
}

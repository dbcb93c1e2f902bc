//! Transparent huge pages for guest RAM (`--memory thp=on`): the guest's memory still verifies
//! through dirty-logged precopy (there and back) and through postcopy.

mod common;

use std::time::Duration;

use common::{assert_no_failure, last_round, remote, remote_json, scratch, wait_progress, Running};

const WAIT: Duration = Duration::from_secs(60);

/// Whether this host backs MADV_HUGEPAGE memory with huge pages at all.
fn host_thp() -> bool {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .is_ok_and(|s| !s.contains("[never]"))
}

/// AnonHugePages of a process, in KiB.
fn anon_huge_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("AnonHugePages:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn dirty_guest_on_huge_pages_migrates_there_and_back() {
    let dir = scratch("thp-hops");
    let sock = |n: usize| {
        dir.join(format!("api{n}.sock"))
            .to_string_lossy()
            .into_owned()
    };
    let mig = |n: usize| format!("unix:{}", dir.join(format!("m{n}.sock")).display());
    let mut current = Running::spawn(&[
        "--memory",
        "size=256M,thp=on",
        "--cmdline",
        "suite=dirty mib=64 static=16",
        "--api-socket",
        &sock(0),
        "--downtime-ms",
        "50",
    ]);
    let mut round = wait_progress(&current, 1);
    if host_thp() {
        assert!(
            anon_huge_kib(current.child.id()) > 0,
            "thp=on but no huge pages"
        );
    }
    for hop in 1..=2 {
        let next = Running::spawn(&["--incoming", &mig(hop), "--api-socket", &sock(hop)]);
        assert!(next.wait_stderr(WAIT, "waiting for an incoming migration"));
        let result = remote_json(&sock(hop - 1), &["migrate", &mig(hop)]);
        assert_eq!(result["state"], "completed", "{result}");
        assert_eq!(current.wait_exit(WAIT), Some(0), "{}", current.describe());
        assert_no_failure(&current);
        let source_last = last_round(&current);
        assert!(next.wait_stderr(WAIT, "migration completed (destination)"));
        // Every round rewrites and verifies the working set and the static region.
        let r = wait_progress(&next, source_last.max(round));
        let r = wait_progress(&next, r);
        round = r;
        assert_no_failure(&next);
        // The configuration carried thp: the destination advised its RAM too.
        if host_thp() {
            assert!(
                anon_huge_kib(next.child.id()) > 0,
                "hop {hop}: the destination's RAM has no huge pages\n{}",
                next.describe()
            );
        }
        current = next;
    }
    assert_eq!(remote(&sock(2), &["quit"]).code, Some(0));
    assert_eq!(current.wait_exit(WAIT), Some(0), "{}", current.describe());
    assert_no_failure(&current);
}

#[test]
fn dirty_guest_on_huge_pages_survives_postcopy() {
    let dir = scratch("thp-postcopy");
    let sock = dir.join("a.sock").to_string_lossy().into_owned();
    let dsock = dir.join("b.sock").to_string_lossy().into_owned();
    let mig = format!("unix:{}", dir.join("m.sock").display());
    let mut src = Running::spawn(&[
        "--memory",
        "size=256M,thp=on",
        "--cmdline",
        "suite=dirty mib=64 static=16",
        "--api-socket",
        &sock,
        "--postcopy",
        "--postcopy-after-iterations",
        "1",
        "--downtime-ms",
        "1",
    ]);
    let round = wait_progress(&src, 1);
    let dst = Running::spawn(&["--incoming", &mig, "--postcopy", "--api-socket", &dsock]);
    assert!(dst.wait_stderr(WAIT, "waiting for an incoming migration"));
    // One connection (channels=0): with channels the first pass can be fast enough to
    // converge before the switch this test is about.
    let result = remote_json(&sock, &["migrate", &format!("{mig},channels=0")]);
    assert_eq!(result["state"], "completed", "{result}");
    assert!(!result["postcopy"].is_null(), "no postcopy phase: {result}");
    assert_eq!(src.wait_exit(WAIT), Some(0), "{}", src.describe());
    assert_no_failure(&src);
    let r = wait_progress(&dst, last_round(&src).max(round));
    wait_progress(&dst, r);
    assert_no_failure(&dst);
}

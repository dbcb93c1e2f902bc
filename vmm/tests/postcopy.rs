//! Postcopy between two real tern processes: the switch, the discard list, page requests.

mod common;

use std::time::Duration;

use common::{dirty_round, remote, run_tern, scratch, Running};

const WAIT: Duration = Duration::from_secs(120);
const ROUNDS: u64 = 150;
const GUEST: &str = "suite=dirty mib=256 static=16 rounds=150";

/// The checksum the guest prints for its last round: deterministic for a given workload.
fn final_line(lines: &[String]) -> Option<String> {
    lines
        .iter()
        .find(|l| dirty_round(l) == Some(ROUNDS))
        .cloned()
}

#[test]
fn dirty_guest_survives_an_early_switch_with_the_right_final_checksum() {
    // Reference: the same workload without migration.
    let reference = run_tern(&["--memory", "size=1G", "--cmdline", GUEST], WAIT);
    assert_eq!(reference.code, Some(0), "{}", reference.describe());
    let lines: Vec<String> = reference.stdout.lines().map(String::from).collect();
    let want =
        final_line(&lines).unwrap_or_else(|| panic!("no final round\n{}", reference.describe()));

    let dir = scratch("postcopy");
    let a = dir.join("a.sock").to_string_lossy().into_owned();
    let b = dir.join("b.sock").to_string_lossy().into_owned();
    let mig = format!("unix:{}", dir.join("mig.sock").display());
    let mut src = Running::spawn(&[
        "--memory",
        "size=1G",
        "--cmdline",
        GUEST,
        "--api-socket",
        &a,
        "--postcopy",
        "--downtime-ms",
        "1",
        "--max-iterations",
        "1000",
    ]);
    assert!(
        src.wait_stdout(WAIT, |l| dirty_round(l).is_some())
            .is_some(),
        "{}",
        src.describe()
    );
    let mut dst = Running::spawn(&["--incoming", &mig, "--postcopy", "--api-socket", &b]);
    assert!(
        dst.wait_stderr(WAIT, "waiting for an incoming migration"),
        "{}",
        dst.describe()
    );
    let o = remote(&a, &["migrate", "--detach", &mig]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    let o = remote(&a, &["migrate-start-postcopy"]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    assert_eq!(src.wait_exit(WAIT), Some(0), "source\n{}", src.describe());
    assert!(
        src.stderr_text().contains("postcopy:"),
        "{}",
        src.describe()
    );
    // The guest finishes its rounds on the destination with the reference checksum.
    assert_eq!(
        dst.wait_exit(WAIT),
        Some(0),
        "destination\n{}",
        dst.describe()
    );
    let got = final_line(&dst.stdout_lines()).or_else(|| final_line(&src.stdout_lines()));
    assert_eq!(
        got.as_deref(),
        Some(want.as_str()),
        "{}\n{}",
        src.describe(),
        dst.describe()
    );
    assert!(
        !dst.stdout_lines().iter().any(|l| l.contains("FAIL")),
        "{}",
        dst.describe()
    );
    // Pages dirtied after they were sent were discarded and arrived again.
    let err = dst.stderr_text();
    let summary = err
        .lines()
        .find(|l| l.contains("migration completed (destination)"))
        .unwrap_or_else(|| panic!("no summary\n{err}"));
    let missing: u64 = summary
        .split("postcopy: ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(missing > 0, "{summary}");
}

#[test]
fn no_userfaultfd_on_the_destination_refuses_at_advise() {
    let dir = scratch("postcopy-advise");
    let a = dir.join("a.sock").to_string_lossy().into_owned();
    let mig = format!("unix:{}", dir.join("mig.sock").display());
    let src = Running::spawn(&[
        "--memory",
        "size=256M",
        "--cmdline",
        "suite=dirty mib=32",
        "--api-socket",
        &a,
        "--postcopy",
    ]);
    assert!(
        src.wait_stdout(WAIT, |l| dirty_round(l).is_some())
            .is_some(),
        "{}",
        src.describe()
    );
    let mut dst = Running::spawn_env(
        &["--incoming", &mig, "--postcopy"],
        &[("TERN_TEST_NO_USERFAULTFD", "1")],
    );
    assert!(
        dst.wait_stderr(WAIT, "waiting for an incoming migration"),
        "{}",
        dst.describe()
    );
    let o = remote(&a, &["migrate", &mig]);
    assert_ne!(o.code, Some(0), "{}", o.describe());
    assert!(o.stderr.contains("postcopy advise"), "{}", o.describe());
    assert_ne!(dst.wait_exit(WAIT), Some(0), "{}", dst.describe());
    // The source's guest keeps running.
    let st = remote(&a, &["status"]);
    assert!(st.stdout.contains("\"running\""), "{}", st.describe());
    let before = src
        .stdout_lines()
        .iter()
        .filter_map(|l| dirty_round(l))
        .max()
        .unwrap_or(0);
    assert!(src
        .wait_stdout(WAIT, |l| dirty_round(l).is_some_and(|r| r > before))
        .is_some());
}

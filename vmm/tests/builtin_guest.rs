//! The built-in test guest boots under the real tern binary and reports what it found.

mod common;

use common::{run_tern, GUEST_TIMEOUT};

#[test]
fn hello_with_one_vcpu_reports_count_and_memory() {
    let o = run_tern(
        &["--memory", "size=256M", "--cmdline", "suite=hello"],
        GUEST_TIMEOUT,
    );
    assert_eq!(o.code, Some(0), "{}", o.describe());
    let lines = o.guest_lines();
    assert!(lines.contains(&"vcpus=1"), "{}", o.describe());
    assert!(lines.contains(&"mem=256 MiB"), "{}", o.describe());
    assert_eq!(o.last_guest_line(), "hello PASS", "{}", o.describe());
}

#[test]
fn hello_with_two_vcpus_brings_up_the_second() {
    let o = run_tern(
        &[
            "--cpus",
            "boot=2",
            "--memory",
            "size=512M",
            "--cmdline",
            "suite=hello",
        ],
        GUEST_TIMEOUT,
    );
    assert_eq!(o.code, Some(0), "{}", o.describe());
    let lines = o.guest_lines();
    assert!(lines.contains(&"vcpus=2"), "{}", o.describe());
    assert!(lines.contains(&"mem=512 MiB"), "{}", o.describe());
    assert_eq!(o.last_guest_line(), "hello PASS", "{}", o.describe());
}

#[test]
fn default_run_boots_hello_and_logs_the_boot_timer() {
    let o = run_tern(&[], GUEST_TIMEOUT);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    assert_eq!(o.last_guest_line(), "hello PASS", "{}", o.describe());
    assert!(
        o.stderr.contains("tern: boot-timer: guest ready"),
        "{}",
        o.describe()
    );
}

#[test]
fn memtest_over_256_mib_passes() {
    let o = run_tern(
        &[
            "--memory",
            "size=512M",
            "--cmdline",
            "suite=memtest mib=256",
        ],
        GUEST_TIMEOUT,
    );
    assert_eq!(o.code, Some(0), "{}", o.describe());
    let report = o
        .guest_lines()
        .into_iter()
        .find(|l| l.starts_with("memtest mib=256"))
        .map(str::to_owned);
    let report = report.unwrap_or_else(|| panic!("no memtest report\n{}", o.describe()));
    assert!(report.contains("checksum=0x"), "{report}");
    assert!(report.contains("MB/s"), "{report}");
    assert_eq!(o.last_guest_line(), "memtest PASS", "{}", o.describe());
}

#[test]
fn memtest_larger_than_ram_fails_with_nonzero_exit() {
    let o = run_tern(
        &["--memory", "size=64M", "--cmdline", "suite=memtest mib=128"],
        GUEST_TIMEOUT,
    );
    assert_eq!(o.code, Some(1), "{}", o.describe());
    assert!(
        o.last_guest_line().starts_with("memtest FAIL"),
        "{}",
        o.describe()
    );
}

#[test]
fn unknown_suite_is_a_guest_failure() {
    let o = run_tern(&["--cmdline", "suite=no-such-suite"], GUEST_TIMEOUT);
    assert_eq!(o.code, Some(1), "{}", o.describe());
    assert!(
        o.last_guest_line().starts_with("no-such-suite FAIL"),
        "{}",
        o.describe()
    );
}

#[test]
fn sigterm_stops_tern_cleanly() {
    let mut p = common::Running::spawn(&["--cmdline", "suite=idle", "--cpus", "boot=2"]);
    assert!(
        p.wait_stdout(GUEST_TIMEOUT, |l| l.contains("idle: halting"))
            .is_some(),
        "{}",
        p.describe()
    );
    let pid = p.child.id().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(p.wait_exit(GUEST_TIMEOUT), Some(0), "{}", p.describe());
    assert!(
        p.stderr_text().contains("stopped by SIGTERM"),
        "{}",
        p.describe()
    );
}

#[test]
fn guest_exception_is_reported_and_fails() {
    let o = run_tern(&["--cmdline", "suite=fault"], GUEST_TIMEOUT);
    assert_eq!(o.code, Some(3), "{}", o.describe());
    assert!(
        o.guest_lines()
            .iter()
            .any(|l| l.starts_with("exception vector=14")),
        "{}",
        o.describe()
    );
}

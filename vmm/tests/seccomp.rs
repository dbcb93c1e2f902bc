//! seccomp: a system call outside a thread's filter stops tern with a report naming the thread
//! and the call (`TERN_TEST_SECCOMP_PROBE=<thread>` makes that thread call getppid, which no
//! filter allows, right after installing its filter).

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{remote, run_tern, scratch, tern_path, wait_socket, Running, GUEST_TIMEOUT};

/// 128 + SIGSYS.
const FORBIDDEN: i32 = 159;

fn probed(thread: &str, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(tern_path())
        .args(args)
        .env("TERN_TEST_SECCOMP_PROBE", thread)
        .stdin(Stdio::null())
        .output()
        .expect("spawn tern");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_reported(thread: &str, args: &[&str]) {
    let (code, stderr) = probed(thread, args);
    assert_eq!(code, Some(FORBIDDEN), "{thread}: {stderr}");
    let want = format!(
        "tern: error: seccomp: the {thread} thread made a forbidden system call: getppid (110)"
    );
    assert!(
        stderr.contains(&want),
        "{thread}: wanted `{want}`\n{stderr}"
    );
}

#[test]
fn a_forbidden_call_in_each_thread_is_reported() {
    assert_reported("vCPU", &[]);
    assert_reported("main", &["--cmdline", "suite=idle"]);
    let dir = scratch("seccomp-lazy");
    let image = dir.join("lazy.img");
    std::fs::write(&image, b"").unwrap();
    assert_reported(
        "userfaultfd",
        &[
            "--memory",
            &format!("size=64M,lazy-from={}", image.display()),
        ],
    );
}

#[test]
fn forbidden_calls_in_migration_threads_are_reported() {
    let dir = scratch("seccomp-migration");
    let snap = dir.join("guest.snap");
    let uri = format!("file:{}", snap.display());
    let sock = dir.join("api.sock").to_string_lossy().into_owned();
    let mut src = Running::spawn(&[
        "--memory",
        "size=64M",
        "--cmdline",
        "suite=idle",
        "--api-socket",
        &sock,
    ]);
    wait_socket(&sock, GUEST_TIMEOUT);
    assert_eq!(remote(&sock, &["migrate", &uri]).code, Some(0));
    assert_eq!(src.wait_exit(GUEST_TIMEOUT), Some(0));
    // The destination's stream reader.
    assert_reported("migration reader", &["--incoming", &uri]);

    // The source's migration thread (started from an API client).
    let src = Command::new(tern_path())
        .args([
            "--memory",
            "size=64M",
            "--cmdline",
            "suite=idle",
            "--api-socket",
            &sock,
        ])
        .env("TERN_TEST_SECCOMP_PROBE", "migration")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_socket(&sock, GUEST_TIMEOUT);
    let _ = remote(&sock, &["migrate", &uri]);
    let out = src.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(FORBIDDEN), "{stderr}");
    assert!(
        stderr.contains("seccomp: the migration thread made a forbidden system call: getppid"),
        "{stderr}"
    );
}

#[test]
fn log_mode_lets_the_call_run_and_off_installs_nothing() {
    for mode in ["log", "off"] {
        let (code, stderr) = probed("vCPU", &["--seccomp", mode]);
        assert_eq!(code, Some(0), "{mode}: {stderr}");
        assert!(!stderr.contains("seccomp"), "{mode}: {stderr}");
    }
    let o = run_tern(&["--seccomp", "maybe"], Duration::from_secs(30));
    assert_eq!(o.code, Some(1), "{}", o.describe());
    assert!(
        o.stderr
            .contains("--seccomp: `maybe` is not on, log or off"),
        "{}",
        o.describe()
    );
}

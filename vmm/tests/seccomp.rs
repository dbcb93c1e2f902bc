//! seccomp: a system call outside a thread's filter stops tern with a report naming the thread
//! and the call (`TERN_TEST_SECCOMP_PROBE=<thread>` makes that thread call getppid, which no
//! filter allows, right after installing its filter).

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{remote, run_tern, scratch, tern_path, wait_socket, GUEST_TIMEOUT};

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
    assert_call_reported(thread, "", "getppid (110)", args);
}

/// `call` is the probe's variant (empty: getppid), `named` how the report names it.
fn assert_call_reported(thread: &str, call: &str, named: &str, args: &[&str]) {
    let probe = if call.is_empty() {
        thread.to_string()
    } else {
        format!("{thread}:{call}")
    };
    let (code, stderr) = probed(&probe, args);
    assert_eq!(code, Some(FORBIDDEN), "{probe}: {stderr}");
    let want =
        format!("tern: error: seccomp: the {thread} thread made a forbidden system call: {named}");
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

/// ioctl and socket are allowed with some arguments only (KVM's and userfaultfd's requests,
/// FIONBIO; Unix and IP sockets): other arguments stop tern like any forbidden call. The guest
/// runs and migrates under these rules in every other test.
#[test]
fn ioctls_and_sockets_outside_the_argument_rules_are_reported() {
    assert_call_reported("vCPU", "ioctl", "ioctl (16)", &[]);
    assert_call_reported("main", "ioctl", "ioctl (16)", &["--cmdline", "suite=idle"]);
    assert_call_reported(
        "main",
        "socket",
        "socket (41)",
        &["--cmdline", "suite=idle"],
    );
}

#[test]
fn forbidden_calls_in_migration_threads_are_reported() {
    let dir = scratch("seccomp-migration");
    let snap = dir.join("guest.snap");
    let uri = format!("file:{}", snap.display());
    let spawn_source = |sock: &str, probe: Option<&str>| {
        let mut c = Command::new(tern_path());
        c.args([
            "--memory",
            "size=64M",
            "--cmdline",
            "suite=idle",
            "--api-socket",
            sock,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        if let Some(p) = probe {
            c.env("TERN_TEST_SECCOMP_PROBE", p);
        }
        c.spawn().unwrap()
    };

    // The destination's stream reader (a live migration: snapshots are read without one).
    let mig = dir.join("mig.sock");
    let dst = Command::new(tern_path())
        .args(["--incoming", &format!("unix:{}", mig.display())])
        .env("TERN_TEST_SECCOMP_PROBE", "migration reader")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_socket(&mig.to_string_lossy(), GUEST_TIMEOUT);
    let sock = dir.join("a.sock").to_string_lossy().into_owned();
    let mut src = spawn_source(&sock, None);
    wait_socket(&sock, GUEST_TIMEOUT);
    let _ = remote(&sock, &["migrate", &format!("unix:{}", mig.display())]);
    let out = dst.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(FORBIDDEN), "{stderr}");
    assert!(
        stderr
            .contains("seccomp: the migration reader thread made a forbidden system call: getppid"),
        "{stderr}"
    );
    let _ = src.kill();
    let _ = src.wait();

    // The source's migration thread (started from an API client).
    let sock = dir.join("b.sock").to_string_lossy().into_owned();
    let src = spawn_source(&sock, Some("migration"));
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
            .contains("invalid value 'maybe' for '--seccomp <on|log|off>'"),
        "{}",
        o.describe()
    );
}

/// (name, Seccomp mode) of every thread of process `pid`.
fn thread_filters(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        // A thread may end between the listing and the read: skip it.
        let (Ok(comm), Ok(status)) = (
            std::fs::read_to_string(dir.join("comm")),
            std::fs::read_to_string(dir.join("status")),
        ) else {
            continue;
        };
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .unwrap_or("?")
            .trim()
            .to_string();
        out.push((comm.trim().to_string(), mode));
    }
    out
}

/// While a postcopy destination runs the guest with pages still missing, every one of its
/// threads (heartbeat and preempt channel included) has a seccomp filter (mode 2).
#[test]
fn every_thread_of_a_postcopy_destination_has_a_filter() {
    let dir = scratch("seccomp-postcopy");
    let sock = |n: &str| dir.join(n).to_string_lossy().into_owned();
    let (a, b, mig) = (sock("a.sock"), sock("b.sock"), sock("mig.sock"));
    // 64 MiB of data pushed at 2 MiB/s: the destination stays in postcopy for about 30 s.
    let src = common::Running::spawn(&[
        "--memory",
        "size=128M",
        "--cmdline",
        "suite=idle fill=64",
        "--api-socket",
        &a,
        "--postcopy",
        "--postcopy-after-iterations",
        "0",
        "--postcopy-bandwidth",
        "2M",
    ]);
    assert!(
        src.wait_stdout(GUEST_TIMEOUT, |l| l.contains("idle: halting"))
            .is_some(),
        "{}",
        src.describe()
    );
    let dst = common::Running::spawn(&[
        "--incoming",
        &format!("unix:{mig}"),
        "--postcopy",
        "--api-socket",
        &b,
    ]);
    assert!(dst.wait_stderr(GUEST_TIMEOUT, "waiting for an incoming migration"));
    let mut migrate = Command::new(tern_path())
        .args([
            "remote",
            "--api-socket",
            &a,
            "migrate",
            &format!("unix:{mig}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_socket(&b, GUEST_TIMEOUT);
    let st = common::wait_migration_state(&b, "active", &dst, GUEST_TIMEOUT);
    let deadline = std::time::Instant::now() + GUEST_TIMEOUT;
    let mut st = st;
    while st["phase"] != "RUNNING" {
        assert!(std::time::Instant::now() < deadline, "{st}");
        std::thread::sleep(Duration::from_millis(50));
        st = common::remote_json(&b, &["migrate-status"]);
    }
    let threads = thread_filters(dst.child.id());
    // Still in postcopy when the threads were read: pages were still missing meanwhile.
    let after = common::remote_json(&b, &["migrate-status"]);
    assert_eq!(after["state"], "active", "{after}");
    let _ = migrate.kill();
    let _ = migrate.wait();
    let names: Vec<&str> = threads.iter().map(|(n, _)| n.as_str()).collect();
    for want in [
        "heartbeat",
        "postcopy-preemp",
        "postcopy-listen",
        "postcopy-faults",
    ] {
        assert!(names.contains(&want), "no {want} thread: {threads:?}");
    }
    let unfiltered: Vec<_> = threads.iter().filter(|(_, m)| m != "2").collect();
    assert!(unfiltered.is_empty(), "without a filter: {unfiltered:?}");
}

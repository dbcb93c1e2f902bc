//! The KSM stress test end to end: the real tern (target/<profile>/tern, built with the
//! workspace) driven by the real tern-suite. KSM is real here: these tests change ksmd's settings
//! (tern-suite restores them) and need root and /sys/kernel/mm/ksm; without them they are skipped.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

use serde_json::Value;

/// ksmd is one per host: one run at a time (tern-suite also takes a file lock).
static SERIAL: Mutex<()> = Mutex::new(());

const KNOBS: [&str; 4] = ["run", "pages_to_scan", "sleep_millisecs", "smart_scan"];

fn ksm_settings() -> Vec<String> {
    KNOBS
        .iter()
        .map(|k| std::fs::read_to_string(format!("/sys/kernel/mm/ksm/{k}")).unwrap_or_default())
        .collect()
}

fn ksm_usable() -> bool {
    let run = Path::new("/sys/kernel/mm/ksm/run");
    let ok = run.exists()
        && std::fs::OpenOptions::new().write(true).open(run).is_ok()
        && Path::new("/dev/kvm").exists();
    if !ok {
        eprintln!("skipped: needs /dev/kvm and a writable /sys/kernel/mm/ksm/run (root)");
    }
    ok
}

fn tern_suite(args: &[&str], json: Option<&Path>) -> Output {
    let exe = env!("CARGO_BIN_EXE_tern-suite");
    let tern = Path::new(exe).with_file_name("tern");
    assert!(
        tern.exists(),
        "{} missing: build the workspace first (cargo build --release)",
        tern.display()
    );
    let mut cmd = Command::new(exe);
    cmd.arg("ksm").args(args);
    if let Some(j) = json {
        cmd.arg("--json").arg(j);
    }
    let out = cmd.output().expect("running tern-suite");
    eprintln!(
        "tern-suite {args:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn json_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("tern-ksm-test-{}-{name}.json", std::process::id()))
}

fn read_report(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).expect("tern-suite wrote its JSON report");
    let _ = std::fs::remove_file(path);
    serde_json::from_str(&text).expect("valid JSON")
}

/// Merged percentage of guest `g`'s region at the end of phase row `row`.
fn merged_pct(row: &Value, g: usize) -> f64 {
    let merged = row["merged_pages"][g].as_f64().expect("merged_pages");
    let region = row["region_pages"][g].as_f64().expect("region_pages");
    100.0 * merged / region
}

fn phase<'a>(report: &'a Value, prefix: &str) -> &'a Value {
    report["phases"]
        .as_array()
        .and_then(|p| {
            p.iter()
                .find(|r| r["phase"].as_str().is_some_and(|n| n.starts_with(prefix)))
        })
        .unwrap_or_else(|| panic!("no phase {prefix} in {report}"))
}

/// No tern of this run is left: none has the run's log directory on its command line.
fn assert_no_guest_left(report: &Value) {
    let dir = report["log_dir"].as_str().expect("log_dir");
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        assert!(
            !cmdline.contains(dir),
            "a guest is still running: {cmdline}"
        );
    }
}

#[test]
fn serial_two_small_guests_merge_split_and_verify() {
    let _lock = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !ksm_usable() {
        return;
    }
    let before = ksm_settings();
    let json = json_path("serial");
    let out = tern_suite(&["--vms", "2", "--guest-mem", "64"], Some(&json));
    let report = read_report(&json);
    assert!(out.status.success(), "serial run failed");
    assert_eq!(ksm_settings(), before, "ksm settings restored");
    let p1 = phase(&report, "1");
    for g in 0..2 {
        assert!(
            merged_pct(p1, g) >= 90.0,
            "guest {g}: {:.1} % of its zero pages merged",
            merged_pct(p1, g)
        );
    }
    let p2 = phase(&report, "2");
    assert!(merged_pct(p2, 0) <= 10.0, "guest 0 unmerged by its split");
    assert!(merged_pct(p2, 1) >= 90.0, "guest 1 still merged");
    assert!(p2["split_mbps"].as_f64().is_some_and(|m| m > 0.0));
    let p3 = phase(&report, "3");
    for g in 0..2 {
        assert!(merged_pct(p3, g) <= 10.0, "guest {g} unmerged by its split");
    }
    for row in report["phases"].as_array().expect("phases") {
        assert_eq!(row["result"], "PASS", "{row}");
    }
    assert_no_guest_left(&report);
}

#[test]
fn parallel_four_allocators_in_one_guest() {
    let _lock = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !ksm_usable() {
        return;
    }
    let before = ksm_settings();
    let json = json_path("parallel");
    let out = tern_suite(
        &[
            "--mode",
            "parallel",
            "--allocators",
            "4",
            "--guest-mem",
            "128",
        ],
        Some(&json),
    );
    let report = read_report(&json);
    assert!(out.status.success(), "parallel run failed");
    assert_eq!(ksm_settings(), before, "ksm settings restored");
    assert_eq!(report["plan"]["allocators"], 4);
    assert!(merged_pct(phase(&report, "4a"), 0) >= 90.0);
    assert!(merged_pct(phase(&report, "4b"), 0) <= 10.0);
    assert_no_guest_left(&report);
}

#[test]
fn a_guest_that_disconnects_fails_the_run_and_everything_is_cleaned_up() {
    let _lock = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !ksm_usable() {
        return;
    }
    let before = ksm_settings();
    let json = json_path("kill");
    let out = tern_suite(
        &[
            "--vms",
            "2",
            "--guest-mem",
            "32",
            "--kill-guest-after-phase",
            "1",
        ],
        Some(&json),
    );
    let report = read_report(&json);
    assert_eq!(out.status.code(), Some(1), "a failed run exits 1");
    assert_eq!(
        ksm_settings(),
        before,
        "ksm settings restored after the failure"
    );
    assert_eq!(report["settings_restored"], true);
    let guests = report["guests"].as_array().expect("guests");
    assert!(guests[1]["Failed"].is_string(), "guest 1 FAIL: {report}");
    assert!(
        guests[0]["Stopped"].is_string(),
        "guest 0 stopped: {report}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("guest 1: FAIL"), "{stdout}");
    assert!(stdout.contains("RESULT: FAIL"), "{stdout}");
    assert_no_guest_left(&report);
    let _ = std::fs::remove_dir_all(report["log_dir"].as_str().unwrap_or("/nonexistent"));
}

#[test]
fn bad_arguments_give_one_clear_line_and_status_2() {
    for (args, needle) in [
        (&["--mode", "sideways"][..], "--mode"),
        (&["--overcommit", "zero"][..], "--overcommit"),
        (&["--vms"][..], "--vms needs a value"),
        (&["--guest-mem", "4"][..], "at least"),
        (&["--wat"][..], "unknown option `--wat`"),
    ] {
        let out = tern_suite(args, None);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(
            err.starts_with("tern-suite: error: ") && err.contains(needle),
            "{args:?}: {err}"
        );
    }
}

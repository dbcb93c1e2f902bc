//! A fast subset of kvm-unit-tests (built from the vendored source, cached under target/) under
//! tern: multiboot entry, fw_cfg CPU count, SMP start-up, isa-debug-exit. The full table is
//! `guest-tests/kvm-unit-tests.sh` (BENCHMARKS.md).

mod common;

use std::process::Command;

/// Tests that pass here in a few seconds each (see BENCHMARKS.md for the whole table).
const FAST: &[&str] = &["setjmp", "smptest", "smptest3"];

#[test]
fn fast_subset_passes() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let logs = common::scratch("kut-logs");
    let out = Command::new("bash")
        .arg(root.join("guest-tests/kvm-unit-tests.sh"))
        .args(FAST)
        .env("TERN", common::tern_path())
        .env("KUT_LOG_DIR", &logs)
        .output()
        .expect("run guest-tests/kvm-unit-tests.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = format!(
        "exit {:?}\n{stdout}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{report}");
    for name in FAST {
        let row = stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no row for {name}\n{report}"));
        assert_eq!(
            row.split_whitespace().nth(1),
            Some("PASS"),
            "{name}\n{report}"
        );
    }
    let _ = std::fs::remove_dir_all(&logs);
}

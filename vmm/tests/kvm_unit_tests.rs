//! A fast subset of kvm-unit-tests (built from the vendored source, cached under target/) under
//! tern: the multiboot entry (at 4 MiB, and realmode's at 32 KiB with the BIOS-style 8259s and
//! pc-testdev IRQ lines), fw_cfg's CPU count and SMP start-up, isa-debug-exit, and the
//! instructions tern completes for this host's emulator (clwb/clflushopt, rdpru's #UD). The full
//! table is `guest-tests/kvm-unit-tests.sh` (BENCHMARKS.md).

mod common;

use std::process::Command;

/// Tests that pass here in a few seconds each (see BENCHMARKS.md for the whole table).
const FAST: &[&str] = &[
    "setjmp",
    "smptest3",
    "idt_test",
    "realmode",
    "memory",
    "la57",
    "rdpru",
    "vmexit_cpuid",
];

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

//! Bad input: one clear line on stderr, a non-zero exit, never a panic.

mod common;

use std::time::Duration;

use common::run_tern;

fn assert_clean_error(args: &[&str], expect: &str) {
    let o = run_tern(args, Duration::from_secs(30));
    assert!(
        matches!(o.code, Some(c) if c != 0),
        "{args:?}: {}",
        o.describe()
    );
    let lines: Vec<&str> = o.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{args:?}: expected one line\n{}",
        o.describe()
    );
    assert!(lines[0].starts_with("tern: error: "), "{}", o.describe());
    assert!(
        lines[0].contains(expect),
        "{args:?}: wanted `{expect}`\n{}",
        o.describe()
    );
    assert!(!o.stderr.contains("panicked"), "{}", o.describe());
}

#[test]
fn missing_kernel_file() {
    assert_clean_error(
        &["--kernel", "/no/such/vmlinux"],
        "cannot open kernel /no/such/vmlinux",
    );
}

#[test]
fn kernel_file_that_is_not_a_kernel() {
    let dir = std::env::temp_dir().join(format!("tern-bad-kernel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("notes.txt");
    std::fs::write(&path, b"this is not a kernel image\n".repeat(100)).unwrap();
    let p = path.to_str().unwrap();
    assert_clean_error(&["--kernel", p], "is not a kernel tern can boot");
    // An ELF header with nothing behind it is not loadable either.
    std::fs::write(&path, b"\x7fELF\x02\x01\x01").unwrap();
    assert_clean_error(&["--kernel", p], "cannot load kernel");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn zero_memory() {
    assert_clean_error(&["--memory", "size=0"], "size must be at least 2 MiB");
}

#[test]
fn memory_larger_than_the_host() {
    assert_clean_error(&["--memory", "size=64T"], "larger than this host can back");
    assert_clean_error(&["--memory", "size=99999999999999T"], "not a valid size");
}

#[test]
fn unknown_option() {
    assert_clean_error(&["--frobnicate"], "unexpected argument '--frobnicate'");
    assert_clean_error(&["--memory", "size=1G,colour=blue"], "unknown key `colour`");
}

#[test]
fn zero_vcpus() {
    assert_clean_error(&["--cpus", "boot=0"], "boot must be between 1 and 64");
}

#[test]
fn malformed_command_line() {
    assert_clean_error(
        &["--cmdline", "suite=hello\tx"],
        "invalid kernel command line",
    );
}

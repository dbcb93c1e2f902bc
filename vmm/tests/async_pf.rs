//! Async page faults with lazy guest memory, in kvm, tern and off modes, with the built-in
//! guest's `apf` suite (two tasks: one touching lazy pages, one computing).

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::path::PathBuf;

use common::{apf_pattern, run_tern, scratch, GUEST_TIMEOUT};

const LAZY_BASE: u64 = 0x400_0000;
const PAGES: u64 = 64;

/// A sparse file with the suite's expected contents at [LAZY_BASE, LAZY_BASE + PAGES pages).
fn pattern_file(name: &str) -> PathBuf {
    let path = scratch(name).join("lazy.img");
    let mut f = std::fs::File::create(&path).unwrap();
    f.seek(SeekFrom::Start(LAZY_BASE)).unwrap();
    let mut bytes = Vec::with_capacity((PAGES * 4096) as usize);
    for q in 0..PAGES * 512 {
        bytes.extend_from_slice(&apf_pattern(LAZY_BASE + q * 8).to_le_bytes());
    }
    f.write_all(&bytes).unwrap();
    path
}

/// The built-in guest's zero-filled segment parts (p_memsz beyond p_filesz): (start, length).
fn builtin_guest_bss() -> Vec<(u64, u64)> {
    let elf = std::fs::read(env!("TERN_GUEST_ELF")).unwrap();
    let u64_at = |at: usize| u64::from_le_bytes(elf[at..at + 8].try_into().unwrap());
    let (phoff, phnum) = (
        u64_at(0x20) as usize,
        u16::from_le_bytes([elf[0x38], elf[0x39]]),
    );
    (0..phnum as usize)
        .map(|i| phoff + 56 * i)
        .filter(|&ph| elf[ph] == 1) // PT_LOAD
        .map(|ph| {
            (
                u64_at(ph + 24) + u64_at(ph + 32),
                u64_at(ph + 40) - u64_at(ph + 32),
            )
        })
        .filter(|&(_, len)| len > 0)
        .collect()
}

fn run_apf(mode: &str, expect_async: bool) -> std::collections::HashMap<String, u64> {
    run_apf_with(pattern_file(&format!("apf-{mode}")), mode, expect_async)
}

fn run_apf_with(
    file: PathBuf,
    mode: &str,
    expect_async: bool,
) -> std::collections::HashMap<String, u64> {
    let memory = format!("size=256M,lazy-from={},lazy-delay-us=1000", file.display());
    let cmdline = format!(
        "suite=apf pages={PAGES} expect_async={}",
        expect_async as u8
    );
    let o = run_tern(
        &[
            "--memory",
            &memory,
            "--async-pf",
            mode,
            "--cmdline",
            &cmdline,
        ],
        GUEST_TIMEOUT,
    );
    assert_eq!(o.code, Some(0), "{}", o.describe());
    assert_eq!(o.last_guest_line(), "apf PASS", "{}", o.describe());
    common::report_fields(o.stdout.lines(), "tern-guest: apf pages=")
        .unwrap_or_else(|| panic!("no apf report\n{}", o.describe()))
}

fn assert_async_pairs(f: &std::collections::HashMap<String, u64>) {
    // Async faults happened, each NOT_PRESENT was matched by a READY with its token, and the
    // compute task ran while the toucher waited. (A fault that finds the vCPU at CPL0 or with
    // IF=0 is waited out instead, so not every page need take the async path; contents were
    // checked by the suite, which passed.)
    assert!(f["async"] >= PAGES / 2, "{f:?}");
    assert_eq!(f["faults"], f["async"], "{f:?}");
    assert_eq!(f["matched"], f["async"], "{f:?}");
    assert!(f["readies"] >= f["async"], "{f:?}");
    assert!(f["compute_during_waits"] > 0, "{f:?}");
}

#[test]
fn kvm_mode_pairs_not_present_with_ready() {
    assert_async_pairs(&run_apf("kvm", true));
}

#[test]
fn tern_mode_pairs_not_present_with_ready() {
    assert_async_pairs(&run_apf("tern", true));
}

/// The lazy file is the guest's RAM, except what tern loads: the guest's BSS must be zero
/// whatever the file holds there (it once came from the file: `sleeper table full`).
#[test]
fn guest_bss_is_zero_whatever_the_lazy_file_holds_there() {
    let file = pattern_file("apf-bss");
    let mut f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    let bss = builtin_guest_bss();
    assert!(!bss.is_empty(), "the built-in guest has a BSS");
    for (start, len) in bss {
        assert!(
            start + len <= LAZY_BASE,
            "BSS {start:#x}+{len:#x} overlaps the pattern"
        );
        f.seek(SeekFrom::Start(start)).unwrap();
        f.write_all(&vec![0xa5; len as usize]).unwrap();
    }
    drop(f);
    assert_async_pairs(&run_apf_with(file, "kvm", true));
}

#[test]
fn off_mode_has_no_async_faults_and_right_contents() {
    let f = run_apf("off", false);
    assert_eq!(f["async"], 0, "{f:?}");
    assert_eq!(f["faults"], 0, "{f:?}");
}

#[test]
fn malformed_async_pf_msr_writes_get_gp_in_tern_mode() {
    let o = run_tern(
        &["--async-pf", "tern", "--cmdline", "suite=apfmsr"],
        GUEST_TIMEOUT,
    );
    assert_eq!(o.code, Some(0), "{}", o.describe());
    for case in [
        "en_before_int=gp",
        "int_reserved_bits=gp",
        "en_misaligned_area=gp",
        "en_without_delivery_as_int=gp",
        "en=ok",
        "ack=ok",
    ] {
        assert!(
            o.guest_lines().contains(&format!("apfmsr {case}").as_str()),
            "{case}\n{}",
            o.describe()
        );
    }
}

#[test]
fn bad_lazy_file_is_a_clear_error() {
    let o = run_tern(
        &["--memory", "size=64M,lazy-from=/no/such/image"],
        GUEST_TIMEOUT,
    );
    assert_eq!(o.code, Some(1), "{}", o.describe());
    assert!(
        o.stderr.contains("opening the lazy memory file"),
        "{}",
        o.describe()
    );
}

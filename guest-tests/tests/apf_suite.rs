//! `tern-suite apf` writes its own pattern file: the apf suite runs without hand-made files.

use std::path::Path;
use std::process::Command;

#[test]
fn tern_suite_apf_passes_without_a_hand_made_file() {
    let exe = env!("CARGO_BIN_EXE_tern-suite");
    let tern = Path::new(exe).with_file_name("tern");
    assert!(tern.exists(), "build tern first: {}", tern.display());
    let out = Command::new(exe)
        .args(["apf", "--pages", "16", "--lazy-delay-us", "200"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let text = format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(stdout.contains("tern-guest: apf pages=16"), "{text}");
    assert!(stdout.contains("tern-guest: apf PASS"), "{text}");
    // Bad options: exit 2 with the usage.
    let out = Command::new(exe)
        .args(["apf", "--pages", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage: tern-suite apf"));
}

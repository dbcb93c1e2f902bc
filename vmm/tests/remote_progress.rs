//! `tern remote ... migrate` shows progress on stderr while it waits; stdout keeps only the
//! final JSON result.

mod common;

use std::time::Duration;

use common::proxy::{Plan, Proxy};
use common::{remote, scratch, Running};

const WAIT: Duration = Duration::from_secs(60);

#[test]
fn attached_migrate_prints_progress_lines_on_stderr_only() {
    let dir = scratch("progress");
    let sock = dir.join("api.sock").to_string_lossy().into_owned();
    let mig_path = dir.join("mig.sock");
    let mig = format!("unix:{}", mig_path.display());
    // 1 GiB of data to copy through a link of 200 MB/s (one connection): about 5 s, so
    // several progress lines whatever this host's own speed (RAM channels moved it in 0.4 s).
    let src = Running::spawn(&[
        "--memory",
        "size=1200M",
        "--cmdline",
        "suite=idle fill=1024",
        "--api-socket",
        &sock,
    ]);
    assert!(src
        .wait_stdout(WAIT, |l| l.contains("idle: halting"))
        .is_some());
    let dst = Running::spawn(&["--incoming", &mig, "--serial", "off"]);
    assert!(dst.wait_stderr(WAIT, "waiting for an incoming migration"));
    let proxy = Proxy::start(
        &dir.join("relay.sock"),
        &mig_path,
        Plan::ThrottleForward(200_000_000),
    )
    .expect("relay");
    let slow = format!("unix:{},channels=0", proxy.path.display());
    // Not a terminal here: plain lines, one a second.
    let o = remote(&sock, &["migrate", &slow]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    let progress: Vec<&str> = o
        .stderr
        .lines()
        .filter(|l| l.starts_with("migrate: pass "))
        .collect();
    assert!(!progress.is_empty(), "no progress lines\n{}", o.describe());
    for l in &progress {
        for part in ["MB sent", "MB/s", "remaining", "ETA"] {
            assert!(l.contains(part), "`{l}` lacks {part}");
        }
        assert!(!l.contains('\r'), "plain lines without a terminal: {l:?}");
    }
    // Scripts parse stdout: exactly the JSON result.
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{}", o.describe());
    let v: serde_json::Value = serde_json::from_str(lines[0]).expect("JSON result");
    assert_eq!(v["state"], "completed", "{v}");
}

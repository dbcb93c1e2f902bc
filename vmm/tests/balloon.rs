//! virtio-balloon with the built-in guest's driver (`suite=balloon`): inflation gives pages back
//! to the host; during postcopy it is recorded and applied after END.

mod common;

use std::time::{Duration, Instant};

use common::{remote, remote_json, report_fields, run_tern, scratch, wait_socket, Running};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(120);
const PAGES_16M: u64 = 4096;

/// Polls `status` until `pred` holds for its balloon object; returns that status.
fn wait_balloon(sock: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    wait_socket(sock, WAIT);
    let deadline = Instant::now() + WAIT;
    loop {
        let s = remote_json(sock, &["status"]);
        if pred(&s["balloon"]) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {s}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `balloon cycle=...` report's fields.
fn cycle_report(lines: &[String]) -> Option<std::collections::HashMap<String, u64>> {
    report_fields(
        lines.iter().map(String::as_str),
        "tern-guest: balloon cycle=",
    )
}

#[test]
fn inflated_pages_go_back_to_the_host_and_return_zeroed() {
    balloon_round_trip("balloon", "size=256M");
}

/// Inside a transparent huge page, a 4 KiB discard splits it and the page still comes back zero.
#[test]
fn inflated_pages_return_zeroed_from_thp_guest_ram() {
    balloon_round_trip("balloon-thp", "size=256M,thp=on");
}

/// On a shared memfd MADV_DONTNEED would keep the page (it would come back intact, not zero):
/// discards there must free it from the memfd.
#[test]
fn inflated_pages_return_zeroed_from_shared_guest_ram() {
    balloon_round_trip("balloon-shared", "size=256M,shared=on");
}

fn balloon_round_trip(name: &str, memory: &str) {
    let dir = scratch(name);
    let sock = dir.join("api.sock").to_string_lossy().into_owned();
    let mut vm = Running::spawn(&[
        "--memory",
        memory,
        "--balloon",
        "size=16M,deflate-on-oom=on",
        "--api-socket",
        &sock,
        "--cmdline",
        "suite=balloon",
    ]);
    // The boot-time target is inflated without any command.
    let s = wait_balloon(&sock, "inflation to 16M", |b| {
        b["actual_bytes"] == 16u64 << 20
    });
    let b = &s["balloon"];
    assert_eq!(b["stats"]["discarded_pages"], PAGES_16M, "{s}");
    assert_eq!(b["deflate_on_oom"], true, "{s}");
    assert_eq!(b["discards_inhibited"], false, "{s}");
    remote_json(&sock, &["balloon", "0"]);
    assert_eq!(vm.wait_exit(WAIT), Some(0), "{}", vm.describe());
    let r = cycle_report(&vm.stdout_lines()).unwrap_or_else(|| panic!("{}", vm.describe()));
    assert_eq!(
        (r["inflated"], r["zero"], r["kept"], r["mixed"]),
        (PAGES_16M, PAGES_16M, 0, 0),
        "{}",
        vm.describe()
    );
}

#[test]
fn balloon_commands_fail_clearly() {
    let dir = scratch("balloon-bad");
    let sock = dir.join("api.sock").to_string_lossy().into_owned();
    let _vm = Running::spawn(&[
        "--memory",
        "size=64M",
        "--api-socket",
        &sock,
        "--cmdline",
        "suite=idle",
    ]);
    wait_socket(&sock, WAIT);
    let o = remote(&sock, &["balloon", "16M"]);
    assert_ne!(o.code, Some(0));
    assert!(o.stderr.contains("has no balloon"), "{}", o.describe());
    let o = remote(&sock, &["balloon", "lots"]);
    assert_ne!(o.code, Some(0));
    assert!(o.stderr.contains("not a size"), "{}", o.describe());
    let o = run_tern(&["--balloon", "size=12345"], WAIT);
    assert_eq!(o.code, Some(1), "{}", o.describe());
    assert!(o.stderr.contains("4 KiB pages"), "{}", o.describe());
}

#[test]
fn balloon_inflation_during_postcopy_is_deferred_and_applied_after_end() {
    use std::io::{Seek, SeekFrom, Write};
    let dir = scratch("balloon-postcopy");
    // The source's RAM is lazy: 512 pages of data at 128 MiB, each 20 ms to read, keep the
    // postcopy push busy for about 10 s (far from the balloon's pool at 4..68 MiB).
    let image = dir.join("lazy.img");
    let mut f = std::fs::File::create(&image).unwrap();
    f.seek(SeekFrom::Start(128 << 20)).unwrap();
    f.write_all(&vec![0x5au8; 512 * 4096]).unwrap();
    drop(f);
    let memory = format!(
        "size=256M,lazy-from={},lazy-delay-us=20000",
        image.display()
    );
    let a = dir.join("a.sock").to_string_lossy().into_owned();
    let b = dir.join("b.sock").to_string_lossy().into_owned();
    let mig = format!("unix:{}", dir.join("mig.sock").display());
    let mut src = Running::spawn(&[
        "--memory",
        &memory,
        "--balloon",
        "size=0",
        "--api-socket",
        &a,
        "--postcopy",
        "--postcopy-after-iterations",
        "0",
        "--cmdline",
        "suite=balloon",
    ]);
    let mut dst = Running::spawn(&["--incoming", &mig, "--postcopy", "--api-socket", &b]);
    assert!(
        dst.wait_stderr(WAIT, "waiting for an incoming migration"),
        "{}",
        dst.describe()
    );
    assert!(
        src.wait_stdout(WAIT, |l| l.contains("balloon: target 0 pages"))
            .is_some(),
        "{}",
        src.describe()
    );
    remote_json(&a, &["migrate", "--detach", &mig]);
    // The destination's API socket opens once it has the VM (after the switch).
    wait_socket(&b, WAIT);
    let deadline = Instant::now() + WAIT;
    while remote_json(&b, &["migrate-status"])["phase"] != "RUNNING" {
        assert!(Instant::now() < deadline, "{}", dst.describe());
        std::thread::sleep(Duration::from_millis(20));
    }

    // During postcopy: the guest inflates, nothing is discarded yet.
    remote_json(&b, &["balloon", "16M"]);
    let s = wait_balloon(&b, "inflation on the destination", |b| {
        b["actual_bytes"] == 16u64 << 20
    });
    let phase = remote_json(&b, &["migrate-status"])["phase"].clone();
    assert_eq!(
        phase, "RUNNING",
        "postcopy ended too early for this test: {s}"
    );
    let bal = &s["balloon"];
    assert_eq!(bal["discards_inhibited"], true, "{s}");
    assert_eq!(bal["deferred_pages"], PAGES_16M, "{s}");
    assert_eq!(bal["stats"]["discarded_pages"], 0, "{s}");

    // After END: applied.
    assert_eq!(src.wait_exit(WAIT), Some(0), "{}", src.describe());
    let deadline = Instant::now() + WAIT;
    let status = loop {
        let m = remote_json(&b, &["migrate-status"]);
        if m["phase"] == "END" {
            break m;
        }
        assert!(Instant::now() < deadline, "{m}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        status["postcopy"]["balloon_pages_discarded_at_end"], PAGES_16M,
        "{status}"
    );
    let s = remote_json(&b, &["status"]);
    let bal = &s["balloon"];
    assert_eq!(bal["discards_inhibited"], false, "{s}");
    assert_eq!(bal["deferred_pages"], 0, "{s}");
    assert_eq!(bal["stats"]["applied_after_inhibit"], PAGES_16M, "{s}");

    // The guest takes its pages back: every one was discarded (reads zero), none lost data
    // it still needed (the guest never used them while ballooned).
    remote_json(&b, &["balloon", "0"]);
    assert_eq!(dst.wait_exit(WAIT), Some(0), "{}", dst.describe());
    let r = cycle_report(&dst.stdout_lines()).unwrap_or_else(|| panic!("{}", dst.describe()));
    assert_eq!(
        (r["inflated"], r["zero"], r["kept"], r["mixed"]),
        (PAGES_16M, PAGES_16M, 0, 0),
        "{}",
        dst.describe()
    );
}

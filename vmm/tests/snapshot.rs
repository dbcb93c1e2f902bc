//! Snapshot files restored eagerly or lazily (`--restore lazy`: pages from the file on first
//! touch and in the background), checked page by page; old-format snapshots are refused.

mod common;

use std::time::Duration;

use common::{dirty_round, remote, run_tern, scratch, Running};

const WAIT: Duration = Duration::from_secs(120);

/// Snapshots a running dirty guest; returns the file and the last round seen before it.
fn take_snapshot(name: &str) -> (std::path::PathBuf, u64) {
    let dir = scratch(name);
    let snap = dir.join("guest.snap");
    let sock = dir.join("api.sock").to_string_lossy().into_owned();
    let mut src = Running::spawn(&[
        "--memory",
        "size=256M",
        "--cmdline",
        "suite=dirty mib=16 static=64",
        "--api-socket",
        &sock,
    ]);
    assert!(src
        .wait_stdout(WAIT, |l| dirty_round(l).is_some_and(|r| r >= 2))
        .is_some());
    let o = remote(&sock, &["migrate", &format!("file:{}", snap.display())]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    assert_eq!(src.wait_exit(WAIT), Some(0), "{}", src.describe());
    let round = src
        .stdout_lines()
        .iter()
        .filter_map(|l| dirty_round(l))
        .max()
        .unwrap_or(0);
    assert!(
        !dir.join("guest.snap.partial").exists(),
        "the temporary file was left behind"
    );
    (snap, round)
}

#[test]
fn lazy_restore_runs_the_guest_on_with_its_memory_intact() {
    let (snap, round) = take_snapshot("snap-lazy");
    let uri = format!("file:{}", snap.display());
    for mode in ["lazy", "eager"] {
        let r = Running::spawn(&["--incoming", &uri, "--restore", mode]);
        // Every round verifies all 80 MiB of the guest's data: a page served wrong fails it.
        assert!(
            r.wait_stdout(WAIT, |l| dirty_round(l).is_some_and(|n| n > round + 3))
                .is_some(),
            "{mode}\n{}",
            r.describe()
        );
        assert!(
            !r.stdout_lines().iter().any(|l| l.contains("FAIL")),
            "{mode}\n{}",
            r.describe()
        );
        assert!(
            r.stderr_text().contains(&format!(
                "({}",
                if mode == "lazy" { "Lazy" } else { "Eager" }
            )),
            "{}",
            r.describe()
        );
    }
}

#[test]
fn a_corrupted_page_stops_a_lazy_restore_with_a_clear_error() {
    let (snap, _) = take_snapshot("snap-corrupt");
    let mut bytes = std::fs::read(&snap).unwrap();
    // Stored pages start at 4 KiB: corrupt the tenth one.
    bytes[4096 * 10 + 100] ^= 0x40;
    let bad = snap.with_file_name("bad.snap");
    std::fs::write(&bad, &bytes).unwrap();
    let o = run_tern(
        &[
            "--incoming",
            &format!("file:{}", bad.display()),
            "--restore",
            "lazy",
        ],
        WAIT,
    );
    // The background pass reaches it at the latest: the guest must not run on garbage.
    assert_eq!(o.code, Some(2), "{}", o.describe());
    assert!(
        o.stderr.contains("checksum mismatch in snapshot page"),
        "{}",
        o.describe()
    );
    // Eager refuses it before the guest runs.
    let o = run_tern(&["--incoming", &format!("file:{}", bad.display())], WAIT);
    assert_eq!(o.code, Some(1), "{}", o.describe());
    assert!(o.stderr.contains("checksum mismatch"), "{}", o.describe());
}

#[test]
fn an_old_format_snapshot_is_refused_clearly() {
    let dir = scratch("snap-old");
    let old = dir.join("old.snap");
    let mut v1 = b"TERNMIG\0".to_vec();
    v1.extend_from_slice(&1u32.to_le_bytes());
    v1.extend_from_slice(&0u32.to_le_bytes());
    v1.extend_from_slice(&[0u8; 64]);
    std::fs::write(&old, &v1).unwrap();
    let o = run_tern(&["--incoming", &format!("file:{}", old.display())], WAIT);
    assert_eq!(o.code, Some(1), "{}", o.describe());
    assert!(o.stderr.contains("older tern"), "{}", o.describe());
    let o = run_tern(&["--restore", "lazy"], WAIT);
    assert_ne!(
        o.code,
        Some(0),
        "--restore without --incoming: {}",
        o.describe()
    );
}

/// COM2 input a client sent that still waits behind the UART's 64-byte FIFO travels with the
/// snapshot: 50 commands queued while the guest is paused are all answered after the restore.
#[test]
fn com2_input_waiting_behind_the_fifo_survives_a_snapshot() {
    use std::io::Write;
    const COMMANDS: usize = 50;
    let dir = scratch("snap-com2");
    let snap = dir.join("guest.snap");
    let sock = dir.join("api.sock").to_string_lossy().into_owned();
    let com2 = |n: &str| format!("socket={}", dir.join(n).display());
    let mut src = Running::spawn(&[
        "--memory",
        "size=64M",
        "--cmdline",
        "suite=ksm",
        "--serial2",
        &com2("a.com2"),
        "--api-socket",
        &sock,
    ]);
    assert!(
        src.wait_stdout(WAIT, |l| l.contains("ksm: ready"))
            .is_some(),
        "{}",
        src.describe()
    );
    let o = remote(&sock, &["pause"]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    let mut client = std::os::unix::net::UnixStream::connect(dir.join("a.com2")).unwrap();
    client.write_all(&b"info\n".repeat(COMMANDS)).unwrap();
    // tern reads its client at once (the paused guest reads nothing): 64 bytes fill the FIFO,
    // the other 186 wait behind it.
    std::thread::sleep(Duration::from_millis(500));
    let o = remote(&sock, &["migrate", &format!("file:{}", snap.display())]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    assert_eq!(src.wait_exit(WAIT), Some(0), "{}", src.describe());
    drop(client);

    let dst = Running::spawn(&[
        "--incoming",
        &format!("file:{}", snap.display()),
        "--serial2",
        &com2("b.com2"),
    ]);
    // The guest reports each answer on COM1 too (no COM2 client needed here).
    let answered = || {
        dst.stdout_lines()
            .iter()
            .filter(|l| l.contains("ksm: PASS info"))
            .count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while answered() < COMMANDS && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(answered(), COMMANDS, "{}", dst.describe());
}

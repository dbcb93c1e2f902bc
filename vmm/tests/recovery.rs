//! Postcopy recovery: the connection is cut after the switch (twice: once in the push, once
//! during the recovery itself); both sides pause, the destination listens anew
//! (`migrate-recover`), the source reconnects (`migrate --resume`), and the guest finishes on the
//! destination with the same checksum as a run that never migrated: no write is lost.

mod common;

use std::time::{Duration, Instant};

use common::proxy::{Dir, Plan, Proxy};
use common::{dirty_round, remote, remote_json, scratch, wait_migration_state, Running};

const WAIT: Duration = Duration::from_secs(180);
const ROUNDS: u64 = 600;

fn guest() -> String {
    format!("suite=dirty mib=64 static=16 rounds={ROUNDS}")
}

#[test]
fn postcopy_cut_twice_recovers_without_losing_a_write() {
    let dir = scratch("recovery");
    let sock = |n: &str| dir.join(n).to_string_lossy().into_owned();
    let (a, b) = (sock("a.sock"), sock("b.sock"));
    // The same workload without migration, alongside: its last round's checksum is the truth.
    let mut reference = Running::spawn(&["--memory", "size=512M", "--cmdline", &guest()]);
    let src = Running::spawn(&[
        "--memory",
        "size=512M",
        "--cmdline",
        &guest(),
        "--api-socket",
        &a,
        "--postcopy",
        "--postcopy-after-iterations",
        "0",
    ]);
    assert!(
        src.wait_stdout(WAIT, |l| dirty_round(l).is_some_and(|r| r >= 5))
            .is_some(),
        "{}",
        src.describe()
    );
    let real = dir.join("mig.sock");
    let mut dst = Running::spawn(&[
        "--incoming",
        &format!("unix:{}", real.display()),
        "--postcopy",
        "--api-socket",
        &b,
    ]);
    assert!(dst.wait_stderr(WAIT, "waiting for an incoming migration"));

    // 1. The stream is cut in the middle of the background push.
    let cut1 = Proxy::start(
        &dir.join("relay1.sock"),
        &real,
        Plan::CutForwardAfter(24 << 20),
    )
    .expect("relay");
    // The relay carries the first connection only: the push stays on it (no RAM channels).
    let o = remote(
        &a,
        &[
            "migrate",
            &format!("unix:{},channels=0", cut1.path.display()),
        ],
    );
    assert_ne!(o.code, Some(0), "{}", o.describe());
    wait_migration_state(&a, "postcopy-paused", &src, WAIT);
    let st = wait_migration_state(&b, "postcopy-paused", &dst, WAIT);
    assert!(
        st["error"].as_str().unwrap_or("").contains("never arrived"),
        "{st}"
    );

    // 2. A recovery whose connection is cut too: both sides end up paused again.
    let rec1 = dir.join("rec1.sock");
    let v = remote_json(
        &b,
        &["migrate-recover", &format!("unix:{}", rec1.display())],
    );
    assert!(v["listening"].is_string(), "{v}");
    assert_eq!(
        remote_json(&b, &["migrate-status"])["state"],
        "postcopy-recover"
    );
    let cut2 = Proxy::start(
        &dir.join("relay2.sock"),
        &rec1,
        Plan::CutForwardAfter(8 << 20),
    )
    .expect("relay");
    let o = remote(
        &a,
        &[
            "migrate",
            "--resume",
            &format!("unix:{}", cut2.path.display()),
        ],
    );
    assert_ne!(o.code, Some(0), "{}", o.describe());
    assert!(
        cut2.bytes(Dir::Forward) >= 8 << 20,
        "the recovery never pushed pages"
    );
    let st = wait_migration_state(&a, "postcopy-paused", &src, WAIT);
    assert!(st["recovered_pages"].as_u64() > Some(0), "{st}");
    wait_migration_state(&b, "postcopy-paused", &dst, WAIT);
    for s in [&a, &b] {
        let o = remote(s, &["resume"]);
        assert!(o.stderr.contains("refused"), "{}", o.describe());
    }

    // 3. Recovered for good.
    let rec2 = dir.join("rec2.sock");
    remote_json(
        &b,
        &["migrate-recover", &format!("unix:{}", rec2.display())],
    );
    let v = remote_json(
        &a,
        &["migrate", "--resume", &format!("unix:{}", rec2.display())],
    );
    assert_eq!(v["state"], "completed", "{v}");
    let left_at_second = v["recovered_pages"].as_u64().unwrap_or(0);
    assert!(left_at_second > 0, "{v}");

    // The guest finishes on the destination with the reference's checksum.
    common::assert_same_final_checksum(&mut reference, &mut dst, ROUNDS, WAIT);
}

#[test]
fn recover_is_refused_where_nothing_is_paused() {
    let dir = scratch("recovery-refused");
    let a = dir.join("a.sock").to_string_lossy().into_owned();
    let _vm = Running::spawn(&[
        "--memory",
        "size=64M",
        "--cmdline",
        "suite=idle",
        "--api-socket",
        &a,
    ]);
    common::wait_socket(&a, WAIT);
    let o = remote(&a, &["migrate-recover", "unix:/tmp/nowhere.sock"]);
    assert!(o.stderr.contains("nothing to recover"), "{}", o.describe());
    let o = remote(&a, &["migrate", "--resume", "unix:/tmp/nowhere.sock"]);
    assert!(o.stderr.contains("nothing to resume"), "{}", o.describe());
}

/// Hybrid postcopy (one precopy pass, then the switch) cut as soon as the guest runs on the
/// destination, early in the push, then
/// recovered: the pages dirtied after precopy sent them come from the source again, and the guest
/// finishes with the reference checksum.
#[test]
fn hybrid_postcopy_cut_early_in_the_push_recovers() {
    const MIB: u64 = 128;
    let guest = format!("suite=dirty mib={MIB} static=16 rounds={ROUNDS}");
    let dir = scratch("recovery-hybrid");
    let sock = |n: &str| dir.join(n).to_string_lossy().into_owned();
    let (a, b) = (sock("a.sock"), sock("b.sock"));
    let mut reference = Running::spawn(&["--memory", "size=512M", "--cmdline", &guest]);
    let src = Running::spawn(&[
        "--memory",
        "size=512M",
        "--cmdline",
        &guest,
        "--api-socket",
        &a,
        "--postcopy",
        "--postcopy-after-iterations",
        "1",
        "--downtime-ms",
        "1",
    ]);
    assert!(
        src.wait_stdout(WAIT, |l| dirty_round(l).is_some_and(|r| r >= 2))
            .is_some(),
        "{}",
        src.describe()
    );
    let real = dir.join("mig.sock");
    let mut dst = Running::spawn(&[
        "--incoming",
        &format!("unix:{}", real.display()),
        "--postcopy",
        "--api-socket",
        &b,
    ]);
    assert!(dst.wait_stderr(WAIT, "waiting for an incoming migration"));
    let relay = Proxy::start(&dir.join("relay.sock"), &real, Plan::Pass).expect("relay");
    let o = remote(
        &a,
        &[
            "migrate",
            "--detach",
            // The relay carries the first connection only: RAM stays on it (no channels).
            &format!("unix:{},channels=0", relay.path.display()),
        ],
    );
    assert_eq!(o.code, Some(0), "{}", o.describe());
    // Cut the moment the destination runs the guest (the push of the dirtied working set goes
    // on): earlier, RUN could still be in flight and the destination would never own the guest.
    let deadline = Instant::now() + WAIT;
    loop {
        if std::path::Path::new(&b).exists() {
            let v = remote_json(&b, &["migrate-status"]);
            if v["phase"] == "RUNNING" {
                relay.cut();
                break;
            }
            assert!(v["state"] == "active", "ended before the cut: {v}");
        }
        assert!(Instant::now() < deadline, "{}", dst.describe());
        std::thread::sleep(Duration::from_millis(2));
    }
    wait_migration_state(&a, "postcopy-paused", &src, WAIT);
    wait_migration_state(&b, "postcopy-paused", &dst, WAIT);
    let rec = dir.join("rec.sock");
    remote_json(&b, &["migrate-recover", &format!("unix:{}", rec.display())]);
    let v = remote_json(
        &a,
        &["migrate", "--resume", &format!("unix:{}", rec.display())],
    );
    assert_eq!(v["state"], "completed", "{v}");
    common::assert_same_final_checksum(&mut reference, &mut dst, ROUNDS, WAIT);
}

/// A source and its destination, paused in postcopy: the stream was cut in the push.
fn paused_pair(
    dir: &std::path::Path,
    name: &str,
    rounds: u64,
) -> (String, Running, String, Running) {
    let sock = |n: &str| {
        dir.join(format!("{name}-{n}"))
            .to_string_lossy()
            .into_owned()
    };
    let (a, b) = (sock("src.sock"), sock("dst.sock"));
    let guest = format!("suite=dirty mib=32 static=8 rounds={rounds}");
    let src = Running::spawn(&[
        "--memory",
        "size=256M",
        "--cmdline",
        &guest,
        "--api-socket",
        &a,
        "--postcopy",
        "--postcopy-after-iterations",
        "0",
    ]);
    assert!(
        src.wait_stdout(WAIT, |l| dirty_round(l).is_some_and(|r| r >= 3))
            .is_some(),
        "{}",
        src.describe()
    );
    let real = dir.join(format!("{name}-mig.sock"));
    let dst = Running::spawn(&[
        "--incoming",
        &format!("unix:{}", real.display()),
        "--postcopy",
        "--api-socket",
        &b,
    ]);
    assert!(dst.wait_stderr(WAIT, "waiting for an incoming migration"));
    let cut = Proxy::start(
        &dir.join(format!("{name}-relay.sock")),
        &real,
        Plan::CutForwardAfter(8 << 20),
    )
    .expect("relay");
    let o = remote(
        &a,
        &[
            "migrate",
            &format!("unix:{},channels=0", cut.path.display()),
        ],
    );
    assert_ne!(o.code, Some(0), "{}", o.describe());
    wait_migration_state(&a, "postcopy-paused", &src, WAIT);
    wait_migration_state(&b, "postcopy-paused", &dst, WAIT);
    (a, src, b, dst)
}

/// Two paused pairs A -> A' and B -> B' (same RAM layout, same vCPUs): A' listens for its
/// recovery, B's source reconnects there and is refused (another migration id); A' still waits,
/// A's source recovers it, and A's guest finishes there intact.
#[test]
fn recovery_from_another_migration_is_refused_and_the_right_source_recovers() {
    let dir = scratch("recovery-identity");
    let rounds = 300;
    let (a, _a_src, a_dst_sock, mut a_dst) = paused_pair(&dir, "a", rounds);
    let (b, b_src, _b_dst_sock, _b_dst) = paused_pair(&dir, "b", rounds);
    let id = |s: &str| remote_json(s, &["migrate-status"])["migration_id"].clone();
    assert!(id(&a).is_string(), "{}", id(&a));
    assert_eq!(id(&a), id(&a_dst_sock), "both sides show the same id");
    assert_ne!(id(&a), id(&b));

    let rec = dir.join("a-rec.sock");
    remote_json(
        &a_dst_sock,
        &["migrate-recover", &format!("unix:{}", rec.display())],
    );
    let o = remote(
        &b,
        &["migrate", "--resume", &format!("unix:{}", rec.display())],
    );
    assert_ne!(o.code, Some(0), "{}", o.describe());
    assert!(o.stderr.contains("refused"), "{}", o.describe());
    let st = wait_migration_state(&b, "postcopy-paused", &b_src, WAIT);
    assert!(
        st["error"]
            .as_str()
            .unwrap_or("")
            .contains("belongs to migration"),
        "{st}"
    );
    assert_eq!(
        remote_json(&a_dst_sock, &["migrate-status"])["state"],
        "postcopy-recover",
        "the destination still waits for its own source"
    );

    let v = remote_json(
        &a,
        &["migrate", "--resume", &format!("unix:{}", rec.display())],
    );
    assert_eq!(v["state"], "completed", "{v}");
    // A's guest verifies every round it runs: a page of B's would be a FAIL line.
    assert_eq!(a_dst.wait_exit(WAIT), Some(0), "{}", a_dst.describe());
    let lines = a_dst.stdout_lines();
    assert!(
        lines.iter().any(|l| dirty_round(l) == Some(rounds)),
        "{}",
        a_dst.describe()
    );
    assert!(
        !lines.iter().any(|l| l.contains("FAIL")),
        "{}",
        a_dst.describe()
    );
}

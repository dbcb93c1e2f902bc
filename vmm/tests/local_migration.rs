//! Local migration (`unix:PATH,local=on`): guest RAM handed over as memfds between real tern
//! processes, and its refusals.

mod common;

use std::time::Duration;

use common::{
    assert_no_failure, last_round, remote, remote_json, run_tern, scratch, wait_progress, Running,
};

const WAIT: Duration = Duration::from_secs(60);

/// Whether process `pid` maps guest RAM from tern's memfd.
fn maps_guest_memfd(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap_or_default()
        .contains("memfd:tern-guest-ram")
}

#[test]
fn dirty_guest_moves_there_and_back_on_handed_over_memory() {
    let dir = scratch("local-hops");
    let sock = |n: usize| {
        dir.join(format!("api{n}.sock"))
            .to_string_lossy()
            .into_owned()
    };
    let mig = |n: usize| format!("unix:{},local=on", dir.join(format!("m{n}.sock")).display());
    let mut current = Running::spawn(&[
        "--memory",
        "size=256M,shared=on",
        "--cmdline",
        "suite=dirty mib=32 static=8",
        "--api-socket",
        &sock(0),
    ]);
    let mut round = wait_progress(&current, 1);
    assert!(
        maps_guest_memfd(current.child.id()),
        "{}",
        current.describe()
    );
    // A -> B -> A: the third process stands where the first one was.
    for hop in 1..=2 {
        let next = Running::spawn(&["--incoming", &mig(hop), "--api-socket", &sock(hop)]);
        assert!(
            next.wait_stderr(WAIT, "waiting for an incoming migration"),
            "{}",
            next.describe()
        );
        let result = remote_json(&sock(hop - 1), &["migrate", &mig(hop)]);
        assert_eq!(result["state"], "completed", "{result}");
        // Only vCPU and device state crossed, not 256 MiB of RAM.
        let bytes = result["bytes"].as_u64().unwrap_or(u64::MAX);
        assert!(bytes < 1 << 20, "hop {hop}: {bytes} bytes sent");
        assert_eq!(result["pages_full"], 0, "{result}");
        // The source never runs the guest again: it ends once the destination confirmed.
        assert_eq!(
            current.wait_exit(WAIT),
            Some(0),
            "source of hop {hop}\n{}",
            current.describe()
        );
        assert_no_failure(&current);
        let source_last = last_round(&current);
        assert!(
            next.wait_stderr(WAIT, "migration completed (destination)"),
            "{}",
            next.describe()
        );
        assert!(maps_guest_memfd(next.child.id()), "{}", next.describe());
        // Rounds go on from the source's last one, each verifying the whole working set and
        // the static region on the memory that was handed over.
        let r = wait_progress(&next, source_last.max(round));
        let r = wait_progress(&next, r);
        assert!(r > round, "hop {hop}: round {r} after {round}");
        round = r;
        assert_no_failure(&next);
        current = next;
    }
    let o = remote(&sock(2), &["quit"]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    assert_eq!(current.wait_exit(WAIT), Some(0), "{}", current.describe());
    assert_no_failure(&current);
}

#[test]
fn local_migration_of_private_ram_is_refused_and_the_guest_runs_on() {
    let dir = scratch("local-private");
    let sock = dir.join("api.sock").to_string_lossy().into_owned();
    let path = dir.join("mig.sock");
    let src = Running::spawn(&[
        "--memory",
        "size=128M",
        "--cmdline",
        "suite=dirty mib=16",
        "--api-socket",
        &sock,
    ]);
    let round = wait_progress(&src, 0);
    let dst = Running::spawn(&["--incoming", &format!("unix:{}", path.display())]);
    assert!(dst.wait_stderr(WAIT, "waiting for an incoming migration"));
    let o = remote(
        &sock,
        &["migrate", &format!("unix:{},local=on", path.display())],
    );
    assert_ne!(o.code, Some(0), "{}", o.describe());
    assert!(
        o.stderr.contains("local migration refused") && o.stderr.contains("shared=on"),
        "{}",
        o.describe()
    );
    let status = remote_json(&sock, &["migrate-status"]);
    assert_eq!(status["state"], "failed", "{status}");
    wait_progress(&src, round);
    assert_no_failure(&src);
    let st = remote_json(&sock, &["status"]);
    assert_eq!(st["state"], "running", "{st}");

    // Only a Unix socket carries descriptors.
    let o = remote(&sock, &["migrate", "tcp:127.0.0.1:1,local=on"]);
    assert_ne!(o.code, Some(0), "{}", o.describe());
    assert!(
        o.stderr.contains("local=on needs a unix:PATH endpoint"),
        "{}",
        o.describe()
    );
}

/// A shared=on guest also migrates by copy; its destination is shared=on again, so the next hop
/// can hand the memory over.
#[test]
fn copied_shared_guest_stays_shared_for_a_later_local_hop() {
    let dir = scratch("local-after-copy");
    let sock = |n: usize| {
        dir.join(format!("api{n}.sock"))
            .to_string_lossy()
            .into_owned()
    };
    let unix = |n: usize| format!("unix:{}", dir.join(format!("m{n}.sock")).display());
    let mut a = Running::spawn(&[
        "--memory",
        "size=128M,shared=on",
        "--cmdline",
        "suite=dirty mib=16 static=8",
        "--api-socket",
        &sock(0),
    ]);
    let round = wait_progress(&a, 1);
    let b = Running::spawn(&["--incoming", &unix(1), "--api-socket", &sock(1)]);
    assert!(b.wait_stderr(WAIT, "waiting for an incoming migration"));
    let copied = remote_json(&sock(0), &["migrate", &unix(1)]);
    assert!(copied["pages_full"].as_u64().unwrap_or(0) > 0, "{copied}");
    assert_eq!(a.wait_exit(WAIT), Some(0), "{}", a.describe());
    assert!(b.wait_stderr(WAIT, "migration completed (destination)"));
    assert!(maps_guest_memfd(b.child.id()), "{}", b.describe());
    let round = wait_progress(&b, round.max(last_round(&a)));
    let mut c = Running::spawn(&["--incoming", &unix(2), "--api-socket", &sock(2)]);
    assert!(c.wait_stderr(WAIT, "waiting for an incoming migration"));
    let local = remote_json(&sock(1), &["migrate", &format!("{},local=on", unix(2))]);
    assert_eq!(local["pages_full"], 0, "{local}");
    let r = wait_progress(&c, round.max(last_round(&b)));
    wait_progress(&c, r);
    assert_no_failure(&b);
    assert_no_failure(&c);
    assert_eq!(remote(&sock(2), &["quit"]).code, Some(0));
    assert_eq!(c.wait_exit(WAIT), Some(0), "{}", c.describe());
}

/// A destination that takes the memory and then refuses (before the switch): the guest was never
/// paused and runs on at the source. The fake destination also checks what was handed over.
#[test]
fn a_destination_that_takes_the_memory_and_refuses_leaves_the_guest_running() {
    use migration::stream::{Section, StreamWriter, HEADER_LEN, MAGIC};
    use std::os::unix::net::UnixListener;

    let dir = scratch("local-refuse");
    let sock = dir.join("api.sock").to_string_lossy().into_owned();
    let path = dir.join("mig.sock");
    let src = Running::spawn(&[
        "--memory",
        "size=128M,shared=on",
        "--cmdline",
        "suite=dirty mib=16",
        "--api-socket",
        &sock,
    ]);
    let round = wait_progress(&src, 0);
    let listener = UnixListener::bind(&path).unwrap();
    let uri = format!("unix:{},local=on", path.display());
    let migrate = {
        let sock = sock.clone();
        std::thread::spawn(move || remote(&sock, &["migrate", &uri]))
    };
    let (conn, _) = listener.accept().unwrap();
    let mut head = [0u8; HEADER_LEN];
    let (n, fds) = migration::fdpass::recv_with_fds(&conn, &mut head).unwrap();
    assert_eq!((n, &head[..8]), (HEADER_LEN, &MAGIC[..]));
    // One memfd for the one RAM region, of the guest's size.
    assert_eq!(fds.len(), 1);
    assert_eq!(fds[0].metadata().unwrap().len(), 128 << 20);
    let mut w = StreamWriter::new(&conn);
    w.record(Section::Abort, &"the test destination refuses")
        .unwrap();
    w.flush().unwrap();
    let o = migrate.join().unwrap();
    drop(conn);
    assert_ne!(o.code, Some(0), "{}", o.describe());
    assert!(
        o.stderr.contains("the test destination refuses"),
        "{}",
        o.describe()
    );
    let status = remote_json(&sock, &["migrate-status"]);
    assert_eq!(status["state"], "failed", "{status}");
    wait_progress(&src, round.max(last_round(&src)));
    assert_no_failure(&src);
    assert_eq!(remote_json(&sock, &["status"])["state"], "running");
}

#[test]
fn local_migration_with_postcopy_is_refused() {
    let dir = scratch("local-postcopy");
    let sock = dir.join("api.sock").to_string_lossy().into_owned();
    let path = dir.join("mig.sock");
    let src = Running::spawn(&[
        "--memory",
        "size=64M,shared=on",
        "--postcopy",
        "--cmdline",
        "suite=dirty mib=8",
        "--api-socket",
        &sock,
    ]);
    let round = wait_progress(&src, 0);
    let o = remote(
        &sock,
        &["migrate", &format!("unix:{},local=on", path.display())],
    );
    assert_ne!(o.code, Some(0), "{}", o.describe());
    assert!(
        o.stderr
            .contains("postcopy cannot be combined with local=on"),
        "{}",
        o.describe()
    );
    wait_progress(&src, round);
    assert_no_failure(&src);
}

#[test]
fn shared_memory_with_ksm_is_refused() {
    let o = run_tern(
        &[
            "--memory",
            "size=64M,shared=on,mergeable=on",
            "--serial",
            "off",
        ],
        WAIT,
    );
    assert_eq!(o.code, Some(1), "{}", o.describe());
    assert!(
        o.stderr
            .contains("shared=on and mergeable=on cannot be combined")
            && o.stderr
                .contains("KSM merges only private anonymous memory"),
        "{}",
        o.describe()
    );
}

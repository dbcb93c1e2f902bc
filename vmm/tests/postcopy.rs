//! Postcopy between two real tern processes: the switch, the discard list, page requests.

mod common;

use std::time::Duration;

use common::{apf_pattern, dirty_round, remote, run_tern, scratch, Running};

const WAIT: Duration = Duration::from_secs(120);
const ROUNDS: u64 = 150;
const GUEST: &str = "suite=dirty mib=256 static=16 rounds=150";

/// The checksum the guest prints for its last round: deterministic for a given workload.
fn final_line(lines: &[String]) -> Option<String> {
    lines
        .iter()
        .find(|l| dirty_round(l) == Some(ROUNDS))
        .cloned()
}

#[test]
fn dirty_guest_survives_an_early_switch_with_the_right_final_checksum() {
    // Reference: the same workload without migration.
    let reference = run_tern(&["--memory", "size=1G", "--cmdline", GUEST], WAIT);
    assert_eq!(reference.code, Some(0), "{}", reference.describe());
    let lines: Vec<String> = reference.stdout.lines().map(String::from).collect();
    let want =
        final_line(&lines).unwrap_or_else(|| panic!("no final round\n{}", reference.describe()));

    let dir = scratch("postcopy");
    let a = dir.join("a.sock").to_string_lossy().into_owned();
    let b = dir.join("b.sock").to_string_lossy().into_owned();
    let mig = format!("unix:{}", dir.join("mig.sock").display());
    let mut src = Running::spawn(&[
        "--memory",
        "size=1G",
        "--cmdline",
        GUEST,
        "--api-socket",
        &a,
        "--postcopy",
        "--downtime-ms",
        "1",
        "--max-iterations",
        "1000",
    ]);
    assert!(
        src.wait_stdout(WAIT, |l| dirty_round(l).is_some())
            .is_some(),
        "{}",
        src.describe()
    );
    let mut dst = Running::spawn(&["--incoming", &mig, "--postcopy", "--api-socket", &b]);
    assert!(
        dst.wait_stderr(WAIT, "waiting for an incoming migration"),
        "{}",
        dst.describe()
    );
    // RAM on the main connection (channels=0): with channels the passes are so fast that
    // precopy may converge before migrate-start-postcopy arrives, and this test is the switch.
    let o = remote(&a, &["migrate", "--detach", &format!("{mig},channels=0")]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    let o = remote(&a, &["migrate-start-postcopy"]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    assert_eq!(src.wait_exit(WAIT), Some(0), "source\n{}", src.describe());
    assert!(
        src.stderr_text().contains("postcopy:"),
        "{}",
        src.describe()
    );
    // The guest finishes its rounds on the destination with the reference checksum.
    assert_eq!(
        dst.wait_exit(WAIT),
        Some(0),
        "destination\n{}",
        dst.describe()
    );
    let got = final_line(&dst.stdout_lines()).or_else(|| final_line(&src.stdout_lines()));
    assert_eq!(
        got.as_deref(),
        Some(want.as_str()),
        "{}\n{}",
        src.describe(),
        dst.describe()
    );
    assert!(
        !dst.stdout_lines().iter().any(|l| l.contains("FAIL")),
        "{}",
        dst.describe()
    );
    // Pages dirtied after they were sent were discarded and arrived again.
    let err = dst.stderr_text();
    let summary = err
        .lines()
        .find(|l| l.contains("migration completed (destination)"))
        .unwrap_or_else(|| panic!("no summary\n{err}"));
    let missing: u64 = summary
        .split("postcopy: ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(missing > 0, "{summary}");
}

#[test]
fn no_userfaultfd_on_the_destination_refuses_at_advise() {
    let dir = scratch("postcopy-advise");
    let a = dir.join("a.sock").to_string_lossy().into_owned();
    let mig = format!("unix:{}", dir.join("mig.sock").display());
    let src = Running::spawn(&[
        "--memory",
        "size=256M",
        "--cmdline",
        "suite=dirty mib=32",
        "--api-socket",
        &a,
        "--postcopy",
    ]);
    assert!(
        src.wait_stdout(WAIT, |l| dirty_round(l).is_some())
            .is_some(),
        "{}",
        src.describe()
    );
    let mut dst = Running::spawn_env(
        &["--incoming", &mig, "--postcopy"],
        &[("TERN_TEST_NO_USERFAULTFD", "1")],
    );
    assert!(
        dst.wait_stderr(WAIT, "waiting for an incoming migration"),
        "{}",
        dst.describe()
    );
    let o = remote(&a, &["migrate", &mig]);
    assert_ne!(o.code, Some(0), "{}", o.describe());
    assert!(o.stderr.contains("postcopy advise"), "{}", o.describe());
    assert_ne!(dst.wait_exit(WAIT), Some(0), "{}", dst.describe());
    // The source's guest keeps running.
    let st = remote(&a, &["status"]);
    assert!(st.stdout.contains("\"running\""), "{}", st.describe());
    let before = src
        .stdout_lines()
        .iter()
        .filter_map(|l| dirty_round(l))
        .max()
        .unwrap_or(0);
    assert!(src
        .wait_stdout(WAIT, |l| dirty_round(l).is_some_and(|r| r > before))
        .is_some());
}

#[test]
fn apf_suite_sees_not_present_and_ready_during_pure_postcopy() {
    apf_during_pure_postcopy("kvm");
}

/// tern mode: the guest's async-PF MSRs live in tern's controller, travel in the vCPU state and
/// are taken over by the destination's controller, which injects NOT_PRESENT/READY for postcopy
/// faults.
#[test]
fn tern_mode_apf_survives_the_switch_and_serves_postcopy_faults() {
    apf_during_pure_postcopy("tern");
}

fn apf_during_pure_postcopy(mode: &str) {
    use std::io::{Seek, SeekFrom, Write};
    let dir = scratch(&format!("postcopy-apf-{mode}"));
    // The source's lazy memory supplies the suite's expected contents; after the switch the
    // destination fetches them through postcopy, with KVM's async page faults in the guest.
    let image = dir.join("lazy.img");
    let mut f = std::fs::File::create(&image).unwrap();
    let base = 0x400_0000u64;
    f.seek(SeekFrom::Start(base)).unwrap();
    let bytes: Vec<u8> = (0..64 * 512u64)
        .flat_map(|q| apf_pattern(base + q * 8).to_le_bytes())
        .collect();
    f.write_all(&bytes).unwrap();
    let a = dir.join("a.sock").to_string_lossy().into_owned();
    let mig = format!("unix:{}", dir.join("mig.sock").display());
    // Each pattern page costs the source 20 ms to read, so a page request is answered well after
    // the guest has parked its toucher and switched to its compute task (the guest's kernel code
    // is emulated and slow here; a fast answer could beat the switch and leave nothing to measure).
    let memory = format!(
        "size=128M,lazy-from={},lazy-delay-us=20000",
        image.display()
    );
    let mut src = Running::spawn(&[
        "--memory",
        &memory,
        "--api-socket",
        &a,
        "--postcopy",
        "--postcopy-after-iterations",
        "0",
        "--async-pf",
        mode,
        "--cmdline",
        // Held long enough for any postcopy to end; the test quits it after the checks.
        "suite=apf pages=64 delay_ms=300 hold_ms=100000 expect_async=1",
    ]);
    let b = dir.join("b.sock").to_string_lossy().into_owned();
    let mut dst = Running::spawn(&[
        "--incoming",
        &mig,
        "--postcopy",
        "--async-pf",
        mode,
        "--api-socket",
        &b,
    ]);
    assert!(
        dst.wait_stderr(WAIT, "waiting for an incoming migration"),
        "{}",
        dst.describe()
    );
    assert!(
        src.wait_stdout(WAIT, |l| l.contains("async PF enabled"))
            .is_some(),
        "{}",
        src.describe()
    );
    let o = remote(&a, &["migrate", &mig]);
    assert_eq!(o.code, Some(0), "{}\n{}", o.describe(), dst.describe());
    assert_eq!(src.wait_exit(WAIT), Some(0), "{}", src.describe());
    assert!(
        dst.wait_stderr(WAIT, "migration completed (destination)"),
        "{}",
        dst.describe()
    );
    // The suite's checks are done before its hold (a failure would end it at once).
    assert!(
        dst.wait_stdout(WAIT, |l| l
            .starts_with("tern-guest: apf: all checks passed"))
            .is_some(),
        "{}",
        dst.describe()
    );
    let o = remote(&b, &["quit"]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    assert_eq!(dst.wait_exit(WAIT), Some(0), "{}", dst.describe());
    let out = dst.stdout_lines();
    assert!(
        !out.iter().any(|l| l.contains("FAIL")),
        "{}",
        dst.describe()
    );
    let report = common::report_fields(out.iter().map(String::as_str), "tern-guest: apf pages=")
        .unwrap_or_else(|| panic!("{}", dst.describe()));
    let field = |k: &str| -> u64 { report.get(k).copied().unwrap_or(0) };
    assert!(field("async") >= 1, "{report:?}");
    assert_eq!(field("matched"), field("async"), "{report:?}");
    assert!(field("compute_during_waits") > 0, "{report:?}");
    assert!(
        dst.stderr_text()
            .contains("migration completed (destination)"),
        "{}",
        dst.describe()
    );
}

/// A destination that asks for a page outside guest RAM gets an error reply (PageRefused), not
/// a dead source: the source stays up, its guest paused with its memory, the migration failed.
#[test]
fn page_request_outside_ram_gets_an_error_reply() {
    use migration::postcopy::{PageRefusal, PageRequest};
    use migration::stream::{Section, StreamReader, StreamWriter};
    let dir = scratch("postcopy-refused");
    let a = dir.join("a.sock").to_string_lossy().into_owned();
    let mig_path = dir.join("mig.sock");
    let listener = std::os::unix::net::UnixListener::bind(&mig_path).unwrap();
    let mut src = Running::spawn(&[
        "--memory",
        "size=64M",
        "--api-socket",
        &a,
        "--postcopy",
        "--postcopy-after-iterations",
        "0",
        "--cmdline",
        "suite=idle",
    ]);
    assert!(
        src.wait_stdout(WAIT, |l| l.contains("idle: halting"))
            .is_some(),
        "{}",
        src.describe()
    );
    let o = remote(
        &a,
        &[
            "migrate",
            "--detach",
            // This scripted destination speaks the main connection only (no RAM channels).
            &format!("unix:{},channels=0", mig_path.display()),
        ],
    );
    assert_eq!(o.code, Some(0), "{}", o.describe());
    let (sock, _) = listener.accept().unwrap();
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let mut rx = StreamReader::new(sock.try_clone().unwrap());
    let mut tx = StreamWriter::new(sock);
    rx.header().unwrap();
    rx.read_section().unwrap().expect(Section::Config).unwrap();
    rx.read_section().unwrap().expect(Section::Advise).unwrap();
    tx.section(Section::Advise, &[]).unwrap();
    tx.flush().unwrap();
    while rx.read_section().unwrap().kind != Section::Run {}
    let bogus = 1u64 << 50;
    tx.record(Section::PageRequest, &PageRequest { gpa: bogus })
        .unwrap();
    tx.flush().unwrap();
    let refusal: PageRefusal = loop {
        let f = rx.read_section().unwrap();
        if f.kind == Section::PageRefused {
            break f.decode().unwrap();
        }
    };
    assert_eq!(refusal.gpa, bogus);
    assert!(refusal.reason.contains("outside guest RAM"), "{refusal:?}");
    drop((rx, tx));

    // The source: still there, postcopy-paused (the destination may run the guest), guest
    // paused, and `resume` refused: running it here could run it twice.
    let deadline = std::time::Instant::now() + WAIT;
    let status = loop {
        let o = remote(&a, &["migrate-status"]);
        assert_eq!(o.code, Some(0), "{}\n{}", o.describe(), src.describe());
        if o.stdout.contains("\"state\":\"postcopy-paused\"") {
            break o.stdout;
        }
        assert!(std::time::Instant::now() < deadline, "{}", o.stdout);
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.contains("postcopy"), "{status}");
    let o = remote(&a, &["status"]);
    assert!(
        o.stdout.contains("\"state\":\"paused\""),
        "{}",
        o.describe()
    );
    let o = remote(&a, &["resume"]);
    assert_ne!(o.code, Some(0), "{}", o.describe());
    assert!(o.stderr.contains("refused"), "{}", o.describe());
    // This scripted destination never ran the guest: forcing gives it back to the source.
    let o = remote(&a, &["resume", "--force"]);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    let o = remote(&a, &["status"]);
    assert!(
        o.stdout.contains("\"state\":\"running\""),
        "{}",
        o.describe()
    );
    assert!(
        src.child.try_wait().unwrap().is_none(),
        "{}",
        src.describe()
    );
}

/// A vCPU blocks on a missing page only as long as that page takes to arrive: its total blocked
/// time stays within a small multiple of (its faults x the request p99). A lost or delayed
/// wake-up (a fault on a page already in flight, a copy that does not wake) would show up as
/// waits of up to a second per fault.
#[test]
fn vcpu_blocked_time_follows_the_page_latency_in_pure_postcopy() {
    let dir = scratch("postcopy-blocked");
    let a = dir.join("a.sock").to_string_lossy().into_owned();
    let mig = format!("unix:{}", dir.join("mig.sock").display());
    let src = Running::spawn(&[
        "--memory",
        "size=512M",
        "--cmdline",
        "suite=dirty mib=192",
        "--api-socket",
        &a,
        "--postcopy",
        "--postcopy-after-iterations",
        "0",
    ]);
    assert!(
        src.wait_stdout(WAIT, |l| dirty_round(l).is_some_and(|r| r >= 2))
            .is_some(),
        "{}",
        src.describe()
    );
    let dst = Running::spawn(&["--incoming", &mig, "--postcopy"]);
    assert!(dst.wait_stderr(WAIT, "waiting for an incoming migration"));
    let v = common::remote_json(&a, &["migrate", &mig]);
    let p = &v["postcopy"];
    let p99_us = p["request_latency_p99_us"].as_f64().unwrap_or(0.0);
    let blocked = p["blocked"].as_array().cloned().unwrap_or_default();
    let vcpu0 = blocked
        .iter()
        .find(|b| b[0] == "vcpu0")
        .unwrap_or_else(|| panic!("vcpu0 never blocked: {v}"));
    let (faults, total_us) = (
        vcpu0[1].as_f64().unwrap_or(0.0),
        vcpu0[2].as_f64().unwrap_or(0.0),
    );
    assert!(faults >= 10.0, "the guest barely faulted: {v}");
    // Requested pages took the preempt channel (on by default).
    assert!(
        v["postcopy"]["source_pages_preempt"].as_u64() > Some(0),
        "{v}"
    );
    // Generous for a loaded machine, far below one lost wake-up (~1 s) per few faults.
    let bound = 4.0 * faults * p99_us.max(1000.0);
    assert!(
        total_us <= bound,
        "vcpu0 blocked {total_us:.0} us over {faults} faults, request p99 {p99_us:.0} us: {v}"
    );
    // The guest made progress on the destination and verified its memory.
    assert!(
        dst.wait_stdout(WAIT, |l| dirty_round(l).is_some())
            .is_some(),
        "{}",
        dst.describe()
    );
    assert!(
        !dst.stdout_lines().iter().any(|l| l.contains("FAIL")),
        "{}",
        dst.describe()
    );
}

/// `--postcopy-preempt off` keeps every page on the one connection, and the guest still
/// finishes with the right memory.
#[test]
fn postcopy_without_the_preempt_channel_sends_requests_on_the_main_stream() {
    let dir = scratch("postcopy-no-preempt");
    let a = dir.join("a.sock").to_string_lossy().into_owned();
    let mig = format!("unix:{}", dir.join("mig.sock").display());
    let src = Running::spawn(&[
        "--memory",
        "size=512M",
        "--cmdline",
        "suite=dirty mib=192",
        "--api-socket",
        &a,
        "--postcopy",
        "--postcopy-after-iterations",
        "0",
        "--postcopy-preempt",
        "off",
    ]);
    assert!(
        src.wait_stdout(WAIT, |l| dirty_round(l).is_some_and(|r| r >= 2))
            .is_some(),
        "{}",
        src.describe()
    );
    let dst = Running::spawn(&["--incoming", &mig, "--postcopy"]);
    assert!(dst.wait_stderr(WAIT, "waiting for an incoming migration"));
    let v = common::remote_json(&a, &["migrate", &mig]);
    let p = &v["postcopy"];
    assert!(p["pages_requested"].as_u64() > Some(0), "{v}");
    assert_eq!(p["source_pages_preempt"], 0, "{v}");
    let after = dirty_round(&src.stdout_lines().last().cloned().unwrap_or_default()).unwrap_or(0);
    assert!(
        dst.wait_stdout(WAIT, |l| dirty_round(l).is_some_and(|r| r > after + 1))
            .is_some(),
        "{}",
        dst.describe()
    );
    assert!(
        !dst.stdout_lines().iter().any(|l| l.contains("FAIL")),
        "{}",
        dst.describe()
    );
}

//! Hostile or careless API clients, and sockets at paths that already hold something: tern
//! stays responsive, bounded and never takes over what is not its own.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{remote, request_line, run_tern, scratch, wait_socket, Running};

const WAIT: Duration = Duration::from_secs(60);

fn idle_guest(sock: &str) -> Running {
    let vm = Running::spawn(&[
        "--memory",
        "size=64M",
        "--cmdline",
        "suite=idle",
        "--api-socket",
        sock,
    ]);
    // Connectable, not just present (a stale socket file is there from the start).
    wait_socket(sock, WAIT);
    let deadline = std::time::Instant::now() + WAIT;
    while UnixStream::connect(sock).is_err() {
        assert!(std::time::Instant::now() < deadline, "{}", vm.describe());
        std::thread::sleep(Duration::from_millis(20));
    }
    vm
}

/// One request over a raw connection; the reply line.
fn request(sock: &str, line: &str) -> String {
    request_line(sock, line, WAIT)
}

/// Peak resident memory of a process, in KiB.
fn hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[test]
fn a_request_line_without_end_is_cut_at_64_kib() {
    let dir = scratch("api-long-line");
    let sock = dir.join("api.sock").to_string_lossy().into_owned();
    let vm = idle_guest(&sock);
    let before = hwm_kib(vm.child.id());
    let s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    // 64 MiB without a newline (it once all went into one String): tern stops reading.
    let chunk = vec![b'x'; 1 << 20];
    let mut sent = 0usize;
    while sent < 64 << 20 {
        match (&s).write(&chunk) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    let mut reply = String::new();
    let _ = (&s).read_to_string(&mut reply);
    assert!(
        reply.contains("request line longer than 65536 bytes"),
        "{reply:?} after {sent} bytes\n{}",
        vm.describe()
    );
    let grown = hwm_kib(vm.child.id()).saturating_sub(before);
    eprintln!("tern peak RSS grew by {grown} KiB after {sent} bytes of one line");
    assert!(grown < 8 << 10, "tern's peak RSS grew by {grown} KiB");
    // Still serving.
    assert!(request(&sock, r#"{"command":"status"}"#).contains("\"ok\":true"));
}

/// Sends one byte of a request every 100 ms until the connection breaks; then reads the reply.
fn trickle(sock: &str) -> (Arc<AtomicBool>, std::thread::JoinHandle<String>) {
    let s = UnixStream::connect(sock).unwrap();
    let active = Arc::new(AtomicBool::new(true));
    let flag = active.clone();
    let t = std::thread::spawn(move || {
        while (&s).write_all(b" ").is_ok() {
            std::thread::sleep(Duration::from_millis(100));
        }
        flag.store(false, Ordering::SeqCst);
        let mut reply = String::new();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let _ = (&s).read_to_string(&mut reply);
        reply
    });
    // Let tern accept it first.
    std::thread::sleep(Duration::from_millis(300));
    (active, t)
}

#[test]
fn a_slow_client_delays_neither_other_clients_nor_sigterm() {
    let dir = scratch("api-slow");
    let sock = dir.join("api.sock").to_string_lossy().into_owned();
    let mut vm = idle_guest(&sock);
    let (active, slow) = trickle(&sock);
    // Answered while the slow client is still mid-request (it once held the event loop).
    let reply = request(&sock, r#"{"command":"status"}"#);
    assert!(reply.contains("\"ok\":true"), "{reply}");
    assert!(
        active.load(Ordering::SeqCst),
        "status waited for the slow client"
    );
    // The slow client is cut at the request deadline, with a reason.
    let why = slow.join().unwrap();
    assert!(why.contains("no complete request within 5 s"), "{why:?}");

    // SIGTERM while another slow client is mid-request: handled at once (it once waited for
    // the client, which here never stops).
    let _slow = trickle(&sock);
    // SAFETY: signals the child this test spawned.
    let sent = unsafe { libc::kill(vm.child.id() as i32, libc::SIGTERM) };
    assert_eq!(sent, 0);
    assert_eq!(vm.wait_exit(WAIT), Some(0), "{}", vm.describe());
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn api_socket_never_replaces_a_file_or_a_live_socket() {
    let dir = scratch("api-bind");
    let file = dir.join("notes.txt");
    std::fs::write(&file, b"keep me").unwrap();
    let o = run_tern(
        &[
            "--cmdline",
            "suite=idle",
            "--api-socket",
            file.to_str().unwrap(),
        ],
        WAIT,
    );
    assert_eq!(o.code, Some(1), "{}", o.describe());
    assert!(o.stderr.contains("not a socket"), "{}", o.describe());
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

    // Another tern's live API socket is not taken over.
    let sock = dir.join("api.sock");
    let s = sock.to_string_lossy().into_owned();
    let first = idle_guest(&s);
    assert_eq!(mode(&sock), 0o600);
    let o = run_tern(&["--cmdline", "suite=idle", "--api-socket", &s], WAIT);
    assert_eq!(o.code, Some(1), "{}", o.describe());
    assert!(
        o.stderr.contains("another process is listening"),
        "{}",
        o.describe()
    );
    let st = remote(&s, &["status"]);
    assert!(
        st.stdout.contains("running"),
        "{}\n{}",
        st.describe(),
        first.describe()
    );

    // A stale socket (nobody listening) is replaced.
    let stale = dir.join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let t = stale.to_string_lossy().into_owned();
    let _second = idle_guest(&t);
    assert!(remote(&t, &["status"]).stdout.contains("running"));
    assert_eq!(mode(&stale), 0o600);
}

#[test]
fn incoming_unix_socket_is_private_and_never_replaces_a_file() {
    let dir = scratch("incoming-bind");
    let file = dir.join("notes.txt");
    std::fs::write(&file, b"keep me").unwrap();
    let uri = format!("unix:{}", file.display());
    let o = run_tern(&["--incoming", &uri], WAIT);
    assert_eq!(o.code, Some(1), "{}", o.describe());
    assert!(o.stderr.contains("not a socket"), "{}", o.describe());
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

    let sock = dir.join("mig.sock");
    let _dst = Running::spawn(&["--incoming", &format!("unix:{}", sock.display())]);
    wait_socket(sock.to_str().unwrap(), WAIT);
    assert_eq!(mode(&sock), 0o600);
}

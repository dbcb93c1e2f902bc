//! The API server's answers to request lines, raw and through `tern remote` (one request type
//! on both sides): what clients send and read must not change with it.

mod common;

use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{remote_json, request_line, scratch, wait_socket, Running};

const WAIT: Duration = Duration::from_secs(60);

/// One request line over a raw connection; the parsed reply.
fn request(sock: &str, line: &str) -> serde_json::Value {
    let reply = request_line(sock, line, WAIT);
    serde_json::from_str(&reply).unwrap_or_else(|e| panic!("{e}: {reply:?}"))
}

fn error_of(sock: &str, line: &str) -> String {
    let reply = request(sock, line);
    assert_eq!(reply["ok"], false, "{line} -> {reply}");
    reply["error"].as_str().unwrap().to_string()
}

#[test]
fn requests_are_parsed_and_refused_as_documented() {
    let dir = scratch("api-requests");
    let sock = dir.join("api.sock").to_string_lossy().into_owned();
    let _vm = Running::spawn(&[
        "--memory",
        "size=64M",
        "--cmdline",
        "suite=idle",
        "--api-socket",
        &sock,
    ]);
    wait_socket(&sock, WAIT);
    let deadline = std::time::Instant::now() + WAIT;
    while UnixStream::connect(&sock).is_err() {
        assert!(std::time::Instant::now() < deadline, "tern never listened");
        std::thread::sleep(Duration::from_millis(20));
    }

    let status = request(&sock, r#"{"command":"status","unused":1}"#);
    assert_eq!(status["ok"], true, "{status}");
    assert_eq!(status["result"]["memory_bytes"], 64 << 20);
    assert_eq!(
        error_of(&sock, r#"{"command":"reboot"}"#),
        "unknown command `reboot`"
    );
    assert_eq!(
        error_of(&sock, r#"{"command":"migrate"}"#),
        r#"migrate needs "uri""#
    );
    assert_eq!(
        error_of(&sock, r#"{"command":"balloon"}"#),
        r#"balloon needs "bytes""#
    );
    let bad = error_of(&sock, r#"{"uri":"unix:/tmp/x"}"#);
    assert!(
        bad.starts_with("bad request: missing field `command`"),
        "{bad}"
    );
    let bad = error_of(&sock, r#"{"command":"migrate","uri":"ftp:x"}"#);
    assert!(bad.contains("is not a migration endpoint"), "{bad}");

    // The client builds the same requests: resume (with its default `force`), migrate-status.
    assert_eq!(remote_json(&sock, &["resume"])["state"], "running");
    assert_eq!(remote_json(&sock, &["migrate-status"])["state"], "none");
    assert_eq!(remote_json(&sock, &["pause"])["state"], "paused");
    assert_eq!(remote_json(&sock, &["status"])["state"], "paused");
}

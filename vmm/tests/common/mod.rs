//! Spawning the real `tern` binary with a deadline.

#![allow(dead_code)]

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub struct Outcome {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    /// The guest's lines, without the `tern-guest: ` prefix.
    pub fn guest_lines(&self) -> Vec<&str> {
        self.stdout
            .lines()
            .filter_map(|l| l.trim_end().strip_prefix("tern-guest: "))
            .collect()
    }

    pub fn last_guest_line(&self) -> &str {
        self.guest_lines().last().copied().unwrap_or("")
    }

    pub fn describe(&self) -> String {
        format!(
            "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

pub fn tern_path() -> &'static str {
    env!("CARGO_BIN_EXE_tern")
}

/// Runs tern with `args`, killing it after `timeout`.
pub fn run_tern(args: &[&str], timeout: Duration) -> Outcome {
    let mut child = Command::new(tern_path())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tern");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Outcome {
        code: status.and_then(|s| s.code()),
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    }
}

/// Generous: guest kernel code is emulated on the CI machine (design.md §1).
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(120);

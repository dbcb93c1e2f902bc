//! Spawning the real `tern` binary with a deadline.

#![allow(dead_code)]

#[allow(unused_imports)]
pub use guest_tests::relay as proxy;

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

/// Generous: guest kernel code is emulated on the CI machine (docs/machine-kvm.md).
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// A tern process whose output lines are collected as they arrive.
pub struct Running {
    pub child: std::process::Child,
    pub stdout: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    pub stderr: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

fn collect(r: impl Read + Send + 'static) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    use std::io::BufRead;
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let l = lines.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(r).lines().map_while(Result::ok) {
            l.lock().unwrap().push(line);
        }
    });
    lines
}

impl Running {
    pub fn spawn(args: &[&str]) -> Running {
        Self::spawn_env(args, &[])
    }

    pub fn spawn_env(args: &[&str], env: &[(&str, &str)]) -> Running {
        let mut cmd = Command::new(tern_path());
        cmd.args(args).envs(env.iter().copied());
        Self::spawn_command(cmd)
    }

    /// Runs `cmd` (which execs tern in the end) with its output collected.
    pub fn spawn_command(mut cmd: Command) -> Running {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tern");
        let stdout = collect(child.stdout.take().expect("stdout"));
        let stderr = collect(child.stderr.take().expect("stderr"));
        Running {
            child,
            stdout,
            stderr,
        }
    }

    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    pub fn describe(&self) -> String {
        format!(
            "--- stdout\n{}\n--- stderr\n{}",
            self.stdout_lines().join("\n"),
            self.stderr_text()
        )
    }

    /// Waits until some stdout line satisfies `pred`; returns it.
    pub fn wait_stdout(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(l) = self.stdout_lines().into_iter().find(|l| pred(l)) {
                return Some(l);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn wait_stderr(&self, timeout: Duration, needle: &str) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.stderr_text().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Waits for the process to end; None on timeout (then it is killed).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `tern remote --api-socket SOCK args...`.
pub fn remote(sock: &str, args: &[&str]) -> Outcome {
    let mut all = vec!["remote", "--api-socket", sock];
    all.extend_from_slice(args);
    run_tern(&all, Duration::from_secs(180))
}

/// Runs a `tern remote` command that must succeed; returns its JSON result.
pub fn remote_json(sock: &str, args: &[&str]) -> serde_json::Value {
    let o = remote(sock, args);
    assert_eq!(o.code, Some(0), "{}", o.describe());
    serde_json::from_str(o.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {}", o.describe()))
}

/// Waits until a tern has created its API socket at `sock`.
pub fn wait_socket(sock: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !std::path::Path::new(sock).exists() {
        assert!(Instant::now() < deadline, "no API socket at {sock}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `key=N` fields of the first guest line that starts with `prefix` (e.g.
/// `tern-guest: apf pages=`), including the one the prefix begins.
pub fn report_fields<'a>(
    lines: impl IntoIterator<Item = &'a str>,
    prefix: &str,
) -> Option<std::collections::HashMap<String, u64>> {
    let line = lines.into_iter().find(|l| l.starts_with(prefix))?;
    Some(
        line.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
            .collect(),
    )
}

/// A fresh scratch directory for one test.
pub fn scratch(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("tern-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// The round number of a `tern-guest: dirty round=N ...` line.
pub fn dirty_round(line: &str) -> Option<u64> {
    line.strip_prefix("tern-guest: dirty round=")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Waits for the destination and the reference run (a guest that never migrated) of a
/// `dirty ... rounds=N` guest to end, and checks that the destination ended with the reference's
/// final checksum and never reported a failure: no write was lost on the way.
pub fn assert_same_final_checksum(
    reference: &mut Running,
    dst: &mut Running,
    rounds: u64,
    wait: Duration,
) {
    assert_eq!(dst.wait_exit(wait), Some(0), "{}", dst.describe());
    assert_eq!(
        reference.wait_exit(wait),
        Some(0),
        "{}",
        reference.describe()
    );
    let last = |r: &Running| {
        r.stdout_lines()
            .into_iter()
            .find(|l| dirty_round(l) == Some(rounds))
    };
    let want = last(reference).expect("reference final round");
    assert_eq!(
        last(dst).as_deref(),
        Some(want.as_str()),
        "{}",
        dst.describe()
    );
    assert!(
        !dst.stdout_lines().iter().any(|l| l.contains("FAIL")),
        "{}",
        dst.describe()
    );
}

pub fn resources_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../resources")
}

/// Builds (or finds in the cache) the Linux guest with tern's guest programs: (KERNEL,
/// INITRAMFS) from `guest-tests/linux/build.sh` (progress on stderr, the two paths on stdout).
pub fn linux_guest() -> (String, String) {
    let out = Command::new("bash")
        .arg(resources_dir().join("../guest-tests/linux/build.sh"))
        .output()
        .expect("run build-guest.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "build-guest.sh failed ({:?}):\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    let value = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} line in build-guest.sh output: {stdout}"))
            .to_string()
    };
    (value("KERNEL="), value("INITRAMFS="))
}

/// The highest `dirty round=N` the guest in `p` printed (0 before the first).
pub fn last_round(p: &Running) -> u64 {
    p.stdout_lines()
        .iter()
        .filter_map(|l| dirty_round(l))
        .max()
        .unwrap_or(0)
}

/// Fails the test if the guest in `p` reported a failure.
pub fn assert_no_failure(p: &Running) {
    assert!(
        !p.stdout_lines().iter().any(|l| l.contains("FAIL")),
        "guest reported a failure\n{}",
        p.describe()
    );
}

/// How long a dirty guest may take to print its next round.
pub const PROGRESS_WAIT: Duration = Duration::from_secs(60);

/// Waits until the guest in `p` has printed a round above `after`; returns the last round.
pub fn wait_progress(p: &Running, after: u64) -> u64 {
    let line = p.wait_stdout(PROGRESS_WAIT, |l| dirty_round(l).is_some_and(|r| r > after));
    assert!(
        line.is_some(),
        "guest made no progress past round {after}\n{}",
        p.describe()
    );
    last_round(p)
}

/// Polls `migrate-status` on `sock` until its state is `want` (at most `timeout`).
pub fn wait_migration_state(
    sock: &str,
    want: &str,
    who: &Running,
    timeout: Duration,
) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let v = remote_json(sock, &["migrate-status"]);
        if v["state"] == want {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "want {want}: {v}\n{}",
            who.describe()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The 8 bytes the built-in guest's `apf` suite expects at guest physical address `addr`.
pub fn apf_pattern(addr: u64) -> u64 {
    addr.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x7465_726E_6170_6621
}

/// One request line over a raw connection to an API socket; the reply line as read.
pub fn request_line(sock: &str, line: &str, timeout: Duration) -> String {
    use std::io::{BufRead, BufReader, Write};
    let s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    (&s).write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut reply = String::new();
    BufReader::new(&s).read_line(&mut reply).unwrap();
    reply
}

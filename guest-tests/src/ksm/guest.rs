//! One guest: a tern process running the built-in `ksm` suite, its COM2 socket and the line
//! protocol (a command line out, lines back until one starts with PASS or FAIL).

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{host, KsmError};

/// How often waits look at the stop flag, the process and the host's memory.
pub const TICK: Duration = Duration::from_millis(50);

/// How a guest ended up.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum GuestState {
    Running,
    /// Ended by the harness: exit command, or stopped by the memory guard after its checks.
    Stopped(String),
    Failed(String),
}

pub struct Guest {
    pub index: usize,
    pub alloc_mib: u64,
    /// The key of the series it holds once split.
    pub key: Option<u64>,
    pub state: GuestState,
    /// Merged pages that are not the allocator's (see `take_baseline`).
    pub baseline_pages: u64,
    child: Child,
    stream: Option<UnixStream>,
    rbuf: Vec<u8>,
    pub console: PathBuf,
}

/// A PASS reply's `key=value` fields.
#[derive(Debug, Clone)]
pub struct Reply(pub String);

impl Reply {
    pub fn field(&self, key: &str) -> Option<u64> {
        self.0
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| v.parse().ok())
    }
}

/// What a wait may do each tick besides looking at the guest (the memory guard).
pub type Tick<'a> = &'a mut dyn FnMut() -> Result<(), KsmError>;

impl Guest {
    /// Starts tern with the `ksm` suite, COM1 to `dir/gN.console`, COM2 on `dir/gN.sock`; with
    /// `linux` (the booted-Linux snapshot) restores it instead and starts `ksm-alloc` on COM2.
    #[allow(clippy::too_many_arguments)]
    pub fn spawn(
        tern: &Path,
        dir: &Path,
        index: usize,
        guest_mib: u64,
        alloc_mib: u64,
        cpus: u32,
        allocators: u32,
        thp: bool,
        linux: Option<&Path>,
    ) -> Result<Guest, KsmError> {
        let console = dir.join(format!("g{index}.console"));
        let sock = dir.join(format!("g{index}.sock"));
        let stderr = std::fs::File::create(dir.join(format!("g{index}.stderr")))
            .map_err(KsmError::io("creating", dir))?;
        let mut cmd = Command::new(tern);
        match linux {
            // The snapshot carries the machine (512 MiB, mergeable, 2 vCPUs).
            Some(snap) => cmd
                .arg("--incoming")
                .arg(format!("file:{}", snap.display()))
                .args(["--restore", "lazy"]),
            None => cmd
                .arg("--memory")
                .arg(format!(
                    "size={guest_mib}M,mergeable=on,thp={}",
                    if thp { "on" } else { "off" }
                ))
                .arg("--cpus")
                .arg(format!("boot={cpus}"))
                .arg("--cmdline")
                .arg(format!("suite=ksm mib={alloc_mib} allocators={allocators}")),
        };
        let child = cmd
            .arg("--serial")
            .arg(format!("file={}", console.display()))
            .arg("--serial2")
            .arg(format!("socket={}", sock.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            // Its own process group: a terminal's Ctrl-C reaches the harness only, which then
            // stops the guests itself (and restores the KSM settings).
            .process_group(0)
            .spawn()
            .map_err(KsmError::Spawn)?;
        let mut g = Guest {
            index,
            alloc_mib,
            key: None,
            state: GuestState::Running,
            baseline_pages: 0,
            child,
            stream: None,
            rbuf: Vec::new(),
            console,
        };
        g.connect(&sock, Duration::from_secs(30))?;
        if linux.is_some() {
            // The guest's COM2 command channel runs the allocator, which then owns the line.
            let start = format!("ksm-alloc mib={alloc_mib} allocators={allocators}\n");
            if let Some(s) = g.stream.as_mut() {
                s.write_all(start.as_bytes())
                    .map_err(KsmError::io("starting ksm-alloc on", &sock))?;
            }
        }
        Ok(g)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn is_running(&self) -> bool {
        self.state == GuestState::Running
    }

    fn err(&self, reason: impl Into<String>) -> KsmError {
        KsmError::Guest {
            guest: self.index,
            reason: reason.into(),
        }
    }

    /// Err if tern has exited (the guest crashed, was killed, or ended its suite).
    pub fn check_alive(&mut self) -> Result<(), KsmError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(st)) => {
                let how = match st.signal() {
                    Some(sig) => format!("tern was killed by signal {sig}"),
                    None => format!("tern exited with status {}", st.code().unwrap_or(-1)),
                };
                Err(self.err(format!("{how} (console: {})", self.console.display())))
            }
            Err(e) => Err(self.err(format!("waiting for tern: {e}"))),
        }
    }

    fn connect(&mut self, sock: &Path, timeout: Duration) -> Result<(), KsmError> {
        let deadline = Instant::now() + timeout;
        loop {
            host::check_stop()?;
            self.check_alive()?;
            match UnixStream::connect(sock) {
                Ok(s) => {
                    s.set_read_timeout(Some(TICK))
                        .map_err(KsmError::io("configuring", sock))?;
                    self.stream = Some(s);
                    return Ok(());
                }
                Err(_) if Instant::now() < deadline => std::thread::sleep(TICK),
                Err(e) => return Err(self.err(format!("connecting to {}: {e}", sock.display()))),
            }
        }
    }

    /// Sends `line`; waits up to `timeout` for the PASS/FAIL reply, calling `tick` meanwhile.
    /// A FAIL reply, a closed connection or an exited tern is an error naming this guest.
    pub fn command(
        &mut self,
        line: &str,
        timeout: Duration,
        tick: Tick,
    ) -> Result<Reply, KsmError> {
        let Some(stream) = self.stream.as_mut() else {
            return Err(self.err("not connected"));
        };
        if let Err(e) = stream.write_all(format!("{line}\n").as_bytes()) {
            let _ = self.check_alive();
            return Err(self.err(format!("sending `{line}`: {e}")));
        }
        let deadline = Instant::now() + timeout;
        loop {
            while let Some(nl) = self.rbuf.iter().position(|&b| b == b'\n') {
                let got: Vec<u8> = self.rbuf.drain(..=nl).collect();
                let text = String::from_utf8_lossy(&got).trim().to_string();
                if let Some(rest) = text.strip_prefix("PASS ") {
                    return Ok(Reply(rest.to_string()));
                }
                if let Some(rest) = text.strip_prefix("FAIL ") {
                    return Err(self.err(format!("`{line}` failed in the guest: {rest}")));
                }
            }
            host::check_stop()?;
            tick()?;
            if Instant::now() > deadline {
                return Err(self.err(format!("no reply to `{line}` within {timeout:?}")));
            }
            let mut buf = [0u8; 512];
            let Some(stream) = self.stream.as_mut() else {
                return Err(self.err("not connected"));
            };
            match stream.read(&mut buf) {
                Ok(0) => {
                    self.stream = None;
                    self.check_alive()?;
                    return Err(self.err(format!("connection closed during `{line}`")));
                }
                Ok(n) => self.rbuf.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) =>
                {
                    self.check_alive()?;
                }
                Err(e) => return Err(self.err(format!("reading the reply to `{line}`: {e}"))),
            }
        }
    }

    /// Pages of this guest that KSM merged (0 once tern is gone).
    /// Pages of this guest that KSM merged, less its baseline.
    pub fn merged_pages(&self) -> u64 {
        self.raw_merged_pages().saturating_sub(self.baseline_pages)
    }

    fn raw_merged_pages(&self) -> u64 {
        if self.is_running() {
            host::merging_pages(self.pid()).unwrap_or(0)
        } else {
            0
        }
    }

    /// Linux guests restored from one snapshot share identical kernel and page-cache pages,
    /// which ksmd merges whatever the allocator does: wait until that count holds still for a
    /// second (10 s at most) and count from there.
    pub fn take_baseline(&mut self) {
        let mut last = self.raw_merged_pages();
        for _ in 0..10 {
            std::thread::sleep(Duration::from_secs(1));
            let now = self.raw_merged_pages();
            if now == last {
                break;
            }
            last = now;
        }
        self.baseline_pages = last;
    }

    /// Ends the guest: `exit` if it still answers, SIGKILL otherwise; records `state`.
    pub fn stop(&mut self, state: GuestState) {
        if self.is_running() && self.check_alive().is_ok() {
            let mut none = || Ok(());
            let graceful = self
                .command("exit", Duration::from_secs(5), &mut none)
                .is_ok();
            let deadline = Instant::now() + Duration::from_secs(5);
            while graceful && Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill();
        self.state = state;
    }

    /// SIGKILL and reap (no-op when tern already exited).
    pub fn kill(&mut self) {
        self.stream = None;
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }

    /// Test hook: kills tern without telling anyone (the "guest disconnects" case).
    pub fn kill_unannounced(&mut self) {
        let _ = self.child.kill();
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.kill();
    }
}

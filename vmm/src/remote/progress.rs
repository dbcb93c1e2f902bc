//! Live progress for `tern remote ... migrate`: a thread polls `migrate-status` on its own
//! connections while the `migrate` request waits, and writes to stderr (stdout keeps only the
//! final JSON result, for scripts).

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::api::call;
use crate::api::request::Request;

const POLL: Duration = Duration::from_millis(200);
/// Without a terminal, one plain line this often.
const PLAIN_EVERY: Duration = Duration::from_secs(1);

/// Polls until dropped.
pub struct Progress {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Progress {
    pub fn start(socket: &Path) -> Progress {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let socket = socket.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("progress".into())
            .spawn(move || poll(&socket, &flag))
            .map_err(|e| log::debug!("no progress display: {e}"))
            .ok();
        Progress { stop, thread }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

fn status(socket: &Path, request: Request) -> Option<Value> {
    let reply = call(socket, &request).ok()?;
    (reply["ok"].as_bool() == Some(true)).then(|| reply["result"].clone())
}

fn poll(socket: &Path, stop: &AtomicBool) {
    // SAFETY: isatty only inspects the descriptor.
    let tty = unsafe { libc::isatty(2) } == 1;
    let memory_bytes = status(socket, Request::Status)
        .and_then(|s| s["memory_bytes"].as_u64())
        .unwrap_or(0);
    let mut rate = Rate::default();
    let mut shown = false;
    let mut last_plain: Option<Instant> = None;
    loop {
        std::thread::park_timeout(POLL);
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let Some(s) = status(socket, Request::MigrateStatus) else {
            continue;
        };
        if s["state"] != "active" {
            continue;
        }
        let mbps = rate.update(s["bytes"].as_u64().unwrap_or(0));
        let text = line(&s, mbps, memory_bytes);
        let mut err = std::io::stderr().lock();
        if tty {
            let _ = write!(err, "\r\x1b[K{text}");
            shown = true;
        } else if last_plain.map_or(mbps > 0.0, |t| t.elapsed() >= PLAIN_EVERY) {
            // The first plain line waits for a rate (two polls); then one a second.
            let _ = writeln!(err, "{text}");
            last_plain = Some(Instant::now());
        }
    }
    if shown {
        let _ = write!(std::io::stderr(), "\r\x1b[K");
    }
}

/// Throughput between two polls, smoothed (the status's own figure changes once a pass).
#[derive(Default)]
struct Rate {
    last: Option<(Instant, u64)>,
    mbps: f64,
}

impl Rate {
    fn update(&mut self, bytes: u64) -> f64 {
        let now = Instant::now();
        if let Some((t, b)) = self.last {
            let dt = now.duration_since(t).as_secs_f64();
            if dt > 0.0 && bytes >= b {
                let m = (bytes - b) as f64 / dt / 1e6;
                self.mbps = if self.mbps == 0.0 {
                    m
                } else {
                    0.5 * self.mbps + 0.5 * m
                };
            }
        }
        self.last = Some((now, bytes));
        self.mbps
    }
}

/// One progress line: pass, MB sent, MB/s, remaining and ETA. In pass 0 the remaining figure is
/// at most what guest RAM holds beyond what was sent (untouched pages are never sent).
fn line(s: &Value, mbps: f64, memory_bytes: u64) -> String {
    let pass = s["iteration"].as_u64().unwrap_or(0);
    let sent = s["bytes"].as_u64().unwrap_or(0);
    let (remaining, bound) = match s["remaining_bytes"].as_u64().unwrap_or(0) {
        0 if pass == 0 => (memory_bytes.saturating_sub(sent), "<= "),
        r => (r, ""),
    };
    let eta = if mbps > 0.0 {
        format!("{bound}{:.1} s", remaining as f64 / 1e6 / mbps)
    } else {
        "?".into()
    };
    let phase = match s["phase"].as_str() {
        Some(p) if !p.is_empty() => format!(" ({p})"),
        _ => String::new(),
    };
    format!(
        "migrate: pass {pass}{phase} | {:.1} MB sent | {mbps:.0} MB/s | remaining {bound}{:.1} MB | ETA {eta}",
        sent as f64 / 1e6,
        remaining as f64 / 1e6
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn line_shows_pass_rate_remaining_and_eta() {
        let s = json!({"iteration": 2, "bytes": 300_000_000u64, "remaining_bytes": 50_000_000u64,
            "phase": ""});
        let l = line(&s, 100.0, 1 << 30);
        assert!(l.contains("pass 2 |"), "{l}");
        assert!(l.contains("300.0 MB sent"), "{l}");
        assert!(l.contains("100 MB/s"), "{l}");
        assert!(l.contains("remaining 50.0 MB"), "{l}");
        assert!(l.contains("ETA 0.5 s"), "{l}");
    }

    #[test]
    fn first_pass_remaining_is_a_bound_and_no_rate_no_eta() {
        let s = json!({"iteration": 0, "bytes": 24_000_000u64, "remaining_bytes": 0});
        let l = line(&s, 0.0, 124_000_000);
        assert!(l.contains("remaining <= 100.0 MB"), "{l}");
        assert!(l.contains("ETA ?"), "{l}");
    }
}

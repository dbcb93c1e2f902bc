//! Liveness between the two sides of a live migration: heartbeats, the peer timeout, and the
//! source's reader of the return path. A peer that falls silent is dead; a slow migration that
//! still moves pages is not (a read timeout alone cannot tell the two apart).

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::stream::{Frame, Section, StreamError, StreamReader, StreamWriter};

/// How often a side that waits on its peer says it is alive.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

/// Silence after which the peer counts as gone: many missed heartbeats, so a loaded machine
/// does not break a healthy migration. `TERN_PEER_TIMEOUT_MS` overrides it (tests use a short one).
pub fn peer_timeout() -> Duration {
    std::env::var("TERN_PEER_TIMEOUT_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis)
        .unwrap_or(Duration::from_secs(15))
}

/// A writer both a heartbeat thread and the protocol use.
pub type SharedWriter = Arc<Mutex<StreamWriter<Box<dyn Write + Send>>>>;

/// Sends a heartbeat section every [`HEARTBEAT_INTERVAL`] until dropped (or the write fails).
pub struct Heartbeat {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Heartbeat {
    pub fn start(w: SharedWriter) -> io::Result<Heartbeat> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("heartbeat".into())
            .spawn(move || {
                crate::thread_started("heartbeat");
                let mut next = Instant::now();
                while !flag.load(Ordering::SeqCst) {
                    if Instant::now() >= next {
                        let mut g = w.lock().unwrap_or_else(|e| e.into_inner());
                        if let Err(e) = g.section(Section::Heartbeat, &[]).and_then(|_| g.flush()) {
                            log::debug!("heartbeat stopped: {e}");
                            return;
                        }
                        next = Instant::now() + HEARTBEAT_INTERVAL;
                    }
                    // Parked, so that Drop wakes it at once (a sleep here added up to its
                    // length to every downtime: the destination stops it before answering).
                    std::thread::park_timeout(Duration::from_millis(50));
                }
            })?;
        Ok(Heartbeat {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// Words the source reads from the destination, heartbeats already dropped.
pub(crate) enum PeerEvent {
    Frame(Frame),
    Broken(String),
}

/// Why no section came from the destination.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("no answer from the destination within {:.0} s", .0.as_secs_f64())]
    Silent(Duration),
    #[error("the return path is closed")]
    Closed,
    /// The read failed, as [`explain`] words it.
    #[error("{0}")]
    Broken(String),
}

/// The destination's reads: a read timeout means the source fell silent; say so, with the
/// timeout, rather than as the socket's EAGAIN.
pub(crate) fn from_source(e: StreamError) -> StreamError {
    match e {
        StreamError::Read { section, source }
            if matches!(
                source.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            StreamError::SourceSilent {
                section,
                secs: peer_timeout().as_secs_f64(),
            }
        }
        e => e,
    }
}

/// The source's reader of the return path: a thread that reads sections as they come (so the
/// destination's heartbeats never pile up in the socket) and hands the others over.
pub(crate) struct PeerReader {
    rx: mpsc::Receiver<PeerEvent>,
}

/// Says what a failed read means: silence past the timeout is a dead peer.
fn explain(e: StreamError) -> String {
    match &e {
        StreamError::Read { source, .. }
            if matches!(
                source.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            format!(
                "no word from the destination for {:.0} s (heartbeats stopped): it is gone",
                peer_timeout().as_secs_f64()
            )
        }
        _ => e.to_string(),
    }
}

impl PeerReader {
    pub(crate) fn start(mut r: StreamReader<Box<dyn Read + Send>>) -> io::Result<PeerReader> {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("return-path".into())
            .spawn(move || {
                crate::thread_started("return-path");
                loop {
                    let ev = match r.read_section() {
                        Ok(f) if f.kind == Section::Heartbeat => continue,
                        Ok(f) => PeerEvent::Frame(f),
                        Err(e) => PeerEvent::Broken(explain(e)),
                    };
                    let last = matches!(ev, PeerEvent::Broken(_));
                    if tx.send(ev).is_err() || last {
                        return;
                    }
                }
            })?;
        Ok(PeerReader { rx })
    }

    /// The next section, waiting at most `timeout` (the peer timeout bounds it anyway).
    pub(crate) fn next(&self, timeout: Duration) -> Result<Frame, PeerError> {
        match self.rx.recv_timeout(timeout) {
            Ok(PeerEvent::Frame(f)) => Ok(f),
            Ok(PeerEvent::Broken(e)) => Err(PeerError::Broken(e)),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(PeerError::Silent(timeout)),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(PeerError::Closed),
        }
    }

    /// After a failed write: did the destination give up first (an Abort still on its way)?
    /// Then it never ran the guest, and the failure is its refusal, not a broken switch.
    pub(crate) fn abort_within(&self, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(PeerEvent::Frame(f)) if f.kind == Section::Abort => {
                    return Some(f.decode().unwrap_or_else(|e| e.to_string()))
                }
                Ok(PeerEvent::Frame(_)) => {}
                Ok(PeerEvent::Broken(_)) | Err(_) => return None,
            }
        }
    }

    /// The next event if one comes within `timeout`; `None` when none did (not an error).
    pub(crate) fn wait_next(&self, timeout: Duration) -> Option<PeerEvent> {
        match self.rx.recv_timeout(timeout) {
            Ok(ev) => Some(ev),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Some(PeerEvent::Broken("the return path is closed".into()))
            }
        }
    }

    /// A section that is already here, if any.
    pub(crate) fn try_next(&self) -> Option<PeerEvent> {
        match self.rx.try_recv() {
            Ok(ev) => Some(ev),
            Err(mpsc::TryRecvError::Empty) => None,
            Err(mpsc::TryRecvError::Disconnected) => {
                Some(PeerEvent::Broken("the return path is closed".into()))
            }
        }
    }
}

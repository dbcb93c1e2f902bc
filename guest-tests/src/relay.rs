//! A fault-injection relay for migration tests and benchmarks: it sits between source and destination on Unix
//! sockets and can cut the connection, swallow one direction, or stop forwarding, at a chosen
//! byte count or on demand.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Which way bytes flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Source to destination: the migration stream.
    Forward,
    /// Destination to source: the return path.
    Back,
}

/// What the relay does to the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Forward everything (cut on demand with [`Proxy::cut`]).
    Pass,
    /// Close both directions once this many bytes went forward.
    CutForwardAfter(u64),
    /// Read and drop everything going this way (a lost reply, lost heartbeats).
    Swallow(Dir),
    /// Forward at most this many bytes a second (a slow link: a migration that takes long).
    ThrottleForward(u64),
}

#[derive(Default)]
struct Shared {
    forward: AtomicU64,
    back: AtomicU64,
    cut: AtomicBool,
    sockets: Mutex<Vec<UnixStream>>,
}

impl Shared {
    fn cut_now(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for s in self
            .sockets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

pub struct Proxy {
    pub path: PathBuf,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Listens on `listen` and relays the first connection to `target`.
    pub fn start(listen: &Path, target: &Path, plan: Plan) -> std::io::Result<Proxy> {
        let listener = UnixListener::bind(listen)?;
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let target = target.to_path_buf();
        std::thread::spawn(move || {
            if let Err(e) = relay(&listener, &target, plan, &s) {
                eprintln!("relay: {e}");
                s.cut_now();
            }
        });
        Ok(Proxy {
            path: listen.to_path_buf(),
            shared,
        })
    }

    /// Listens on `listen` and relays every connection to `target`, connection i (0: the first)
    /// following `plans[i]` ([`Plan::Pass`] past the end), each with its own byte counts. The
    /// returned proxy's counts and [`Proxy::cut`] are the first connection's.
    pub fn start_each(listen: &Path, target: &Path, plans: Vec<Plan>) -> std::io::Result<Proxy> {
        let listener = UnixListener::bind(listen)?;
        let first = Arc::new(Shared::default());
        let s = first.clone();
        let target = target.to_path_buf();
        std::thread::spawn(move || {
            for i in 0.. {
                let shared = if i == 0 {
                    s.clone()
                } else {
                    Arc::new(Shared::default())
                };
                let plan = plans.get(i).copied().unwrap_or(Plan::Pass);
                if let Err(e) = relay(&listener, &target, plan, &shared) {
                    eprintln!("relay: connection {i}: {e}");
                    shared.cut_now();
                    return;
                }
            }
        });
        Ok(Proxy {
            path: listen.to_path_buf(),
            shared: first,
        })
    }

    /// Cuts both directions now.
    pub fn cut(&self) {
        self.shared.cut_now();
    }

    pub fn bytes(&self, dir: Dir) -> u64 {
        match dir {
            Dir::Forward => self.shared.forward.load(Ordering::SeqCst),
            Dir::Back => self.shared.back.load(Ordering::SeqCst),
        }
    }

    /// Waits until `n` bytes went `dir` (false on timeout).
    pub fn wait_bytes(&self, dir: Dir, n: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.bytes(dir) < n {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }
}

/// Accepts one connection, connects it to `target` and starts the two pumps.
fn relay(
    listener: &UnixListener,
    target: &Path,
    plan: Plan,
    s: &Arc<Shared>,
) -> std::io::Result<()> {
    let (src, _) = listener.accept()?;
    let dst = UnixStream::connect(target)?;
    {
        let mut v = s.sockets.lock().unwrap_or_else(|e| e.into_inner());
        v.push(src.try_clone()?);
        v.push(dst.try_clone()?);
    }
    let (s1, s2) = (s.clone(), s.clone());
    let (src2, dst2) = (src.try_clone()?, dst.try_clone()?);
    std::thread::spawn(move || pump(src, dst, Dir::Forward, plan, &s1));
    std::thread::spawn(move || pump(dst2, src2, Dir::Back, plan, &s2));
    Ok(())
}

fn pump(mut from: UnixStream, mut to: UnixStream, dir: Dir, plan: Plan, s: &Shared) {
    let mut buf = vec![0u8; 64 << 10];
    let began = Instant::now();
    let counter = match dir {
        Dir::Forward => &s.forward,
        Dir::Back => &s.back,
    };
    loop {
        if s.cut.load(Ordering::SeqCst) {
            return;
        }
        let mut want = buf.len();
        if let (Plan::CutForwardAfter(limit), Dir::Forward) = (plan, dir) {
            let done = counter.load(Ordering::SeqCst);
            if done >= limit {
                s.cut_now();
                return;
            }
            want = want.min((limit - done) as usize);
        }
        let n = match from.read(&mut buf[..want]) {
            Ok(0) | Err(_) => {
                // One side left: so does the relay (as a broken connection would).
                s.cut_now();
                return;
            }
            Ok(n) => n,
        };
        if plan != Plan::Swallow(dir) && to.write_all(&buf[..n]).is_err() {
            s.cut_now();
            return;
        }
        let done = counter.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
        if let (Plan::ThrottleForward(rate), Dir::Forward) = (plan, dir) {
            let due = Duration::from_secs_f64(done as f64 / rate.max(1) as f64);
            if let Some(wait) = due.checked_sub(began.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
}

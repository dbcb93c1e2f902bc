//! Where a migration stream goes: `unix:PATH[,local=on]`, `tcp:HOST:PORT` or `file:PATH`.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Cursor, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use crate::peer::peer_timeout;
use crate::unix_probe::{probe, Liveness, PROBE_WAIT};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `local`: hand guest RAM over as memfds (SCM_RIGHTS) instead of copying it.
    Unix {
        path: PathBuf,
        local: bool,
    },
    Tcp(String),
    File(PathBuf),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadEndpoint {
    #[error("`{0}` is not a migration endpoint (expected unix:PATH[,local=on], tcp:HOST:PORT or file:PATH)")]
    Syntax(String),
    #[error("`{0}`: local=on needs a unix:PATH endpoint (memory is handed over as file descriptors on a Unix socket)")]
    LocalNeedsUnix(String),
    #[error("`{0}`: channels=N takes a count from 0 to {max} on a unix: or tcp: endpoint without local=on", max = crate::channels::MAX_CHANNELS)]
    Channels(String),
}

/// What `migrate` is given: an endpoint and, optionally, `,channels=N` after it (the last option).
pub fn parse_migrate_uri(full: &str) -> Result<(Endpoint, Option<usize>), BadEndpoint> {
    let Some((rest, n)) = full.rsplit_once(",channels=") else {
        return Ok((full.parse()?, None));
    };
    let bad = || BadEndpoint::Channels(full.to_string());
    let n: usize = n.parse().map_err(|_| bad())?;
    let ep: Endpoint = rest.parse()?;
    if n > crate::channels::MAX_CHANNELS || ep.is_local() || matches!(ep, Endpoint::File(_)) {
        return Err(bad());
    }
    Ok((ep, Some(n)))
}

/// The `,local=on|off` suffix, if any: (the rest, local).
fn local_suffix(s: &str) -> (&str, Option<bool>) {
    if let Some(rest) = s.strip_suffix(",local=on") {
        (rest, Some(true))
    } else if let Some(rest) = s.strip_suffix(",local=off") {
        (rest, Some(false))
    } else {
        (s, None)
    }
}

impl Endpoint {
    /// A local migration: RAM is handed over, not copied.
    pub fn is_local(&self) -> bool {
        matches!(self, Endpoint::Unix { local: true, .. })
    }
}

impl FromStr for Endpoint {
    type Err = BadEndpoint;
    fn from_str(full: &str) -> Result<Self, BadEndpoint> {
        let bad = || BadEndpoint::Syntax(full.to_string());
        let (s, local) = local_suffix(full);
        if local == Some(true) && !s.starts_with("unix:") {
            return Err(BadEndpoint::LocalNeedsUnix(full.to_string()));
        }
        match s.split_once(':') {
            Some(("unix", p)) if !p.is_empty() => Ok(Endpoint::Unix {
                path: p.into(),
                local: local.unwrap_or(false),
            }),
            Some(("file", p)) if !p.is_empty() => Ok(Endpoint::File(p.into())),
            Some(("tcp", a))
                if a.rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()) =>
            {
                Ok(Endpoint::Tcp(a.to_string()))
            }
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix { path, local } => {
                write!(
                    f,
                    "unix:{}{}",
                    path.display(),
                    if *local { ",local=on" } else { "" }
                )
            }
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
            Endpoint::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

/// Both directions of a migration connection. Files have no return path.
pub struct Channel {
    pub reader: Option<Box<dyn Read + Send>>,
    pub writer: Option<Box<dyn Write + Send>>,
    /// Descriptors the source sent with the stream header (a local migration's guest RAM).
    pub fds: Vec<File>,
}

const BUF: usize = 1 << 20;
/// Smaller on the reading side: what sits read-ahead here delays a requested postcopy page.
const READ_BUF: usize = 128 << 10;

fn split<S: Read + Write + Send + 'static>(a: S, b: S) -> Channel {
    Channel {
        reader: Some(Box::new(BufReader::with_capacity(READ_BUF, a))),
        writer: Some(Box::new(BufWriter::with_capacity(BUF, b))),
        fds: Vec::new(),
    }
}

/// Source side of a Unix endpoint, before any byte went out (a local migration sends its
/// descriptors with the first bytes, then calls [`unix_channel`]).
pub fn connect_unix(path: &std::path::Path) -> io::Result<UnixStream> {
    let s = UnixStream::connect(path)?;
    s.set_write_timeout(Some(STALL_TIMEOUT))?;
    s.set_read_timeout(Some(peer_timeout()))?;
    Ok(s)
}

/// Buffered directions of a connected Unix socket.
pub fn unix_channel(s: UnixStream) -> io::Result<Channel> {
    let r = s.try_clone()?;
    Ok(split(r, s))
}

/// Binds a Unix socket at `path` that only this user may connect to (mode 0600), for every
/// socket tern listens on. A stale socket at the path (nobody accepts on it) is replaced; a live
/// one (another tern's, say) or any other kind of file is left alone and refused.
pub fn bind_private(path: &Path) -> io::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        // Bounded: a listener that never accepts must not hang tern here.
        Ok(m) if m.file_type().is_socket() => match probe(path, PROBE_WAIT)? {
            Liveness::Live => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process is listening on this socket",
                ))
            }
            Liveness::Stale => std::fs::remove_file(path)?,
        },
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket",
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // SAFETY: umask only changes this process's file-creation mask, restored right after. It is
    // process-wide, but nothing else in tern sets it, and a file another thread creates
    // meanwhile can only come out more private, never less.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    bound
}

/// Source side: connect to (or create) the endpoint.
pub fn connect(ep: &Endpoint) -> io::Result<Channel> {
    match ep {
        Endpoint::Unix { path, .. } => unix_channel(connect_unix(path)?),
        Endpoint::Tcp(a) => {
            let s = TcpStream::connect(a)?;
            s.set_nodelay(true)?;
            s.set_write_timeout(Some(STALL_TIMEOUT))?;
            s.set_read_timeout(Some(peer_timeout()))?;
            let r = s.try_clone()?;
            Ok(split(r, s))
        }
        Endpoint::File(p) => Ok(Channel {
            reader: None,
            writer: Some(Box::new(BufWriter::with_capacity(BUF, File::create(p)?))),
            fds: Vec::new(),
        }),
    }
}

/// Destination side: wait for the source (or open the file).
pub fn accept(ep: &Endpoint) -> io::Result<Channel> {
    accept_keep(ep).map(|(c, _)| c)
}

/// A destination's endpoint still listening after the first connection, for a second one (the
/// postcopy preempt channel). A Unix socket's path goes away with it.
pub enum Listening {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Listening {
    fn accept_blocking(&self) -> io::Result<Conn> {
        match self {
            Listening::Unix(l, _) => l.accept().map(|(s, _)| Conn::Unix(s)),
            Listening::Tcp(l) => l.accept().map(|(s, _)| Conn::Tcp(s)),
        }
    }

    /// The next connection, if one comes within `timeout`.
    pub fn accept_within(&self, timeout: Duration) -> io::Result<Channel> {
        let deadline = std::time::Instant::now() + timeout;
        match self {
            Listening::Unix(l, _) => l.set_nonblocking(true)?,
            Listening::Tcp(l) => l.set_nonblocking(true)?,
        }
        loop {
            match self.accept_blocking() {
                Ok(c) => return c.into_channel(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if std::time::Instant::now() >= deadline {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("nobody connected within {} s", timeout.as_secs()),
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        if let Listening::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    /// Timeouts as a destination wants them: the source writes all the time or sends
    /// heartbeats, so silence is a dead source.
    fn into_channel(self) -> io::Result<Channel> {
        match self {
            Conn::Unix(s) => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(peer_timeout()))?;
                s.set_write_timeout(Some(STALL_TIMEOUT))?;
                let r = s.try_clone()?;
                Ok(split(r, s))
            }
            Conn::Tcp(s) => {
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(peer_timeout()))?;
                s.set_write_timeout(Some(STALL_TIMEOUT))?;
                let r = s.try_clone()?;
                Ok(split(r, s))
            }
        }
    }
}

/// The first connection of a Unix endpoint. A local migration's descriptors ride on the stream
/// header: it is read with recvmsg before any buffered read could take (and so drop) them.
fn first_unix_channel(s: UnixStream) -> io::Result<Channel> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(peer_timeout()))?;
    s.set_write_timeout(Some(STALL_TIMEOUT))?;
    let mut head = vec![0u8; HEADER_LEN];
    let (n, fds) = crate::fdpass::recv_with_fds(&s, &mut head).map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "timed out waiting for the source: no stream header within {} s",
                peer_timeout().as_secs_f64()
            ),
        ),
        _ => e,
    })?;
    head.truncate(n);
    let r = s.try_clone()?;
    Ok(Channel {
        reader: Some(Box::new(
            Cursor::new(head).chain(BufReader::with_capacity(READ_BUF, r)),
        )),
        writer: Some(Box::new(BufWriter::with_capacity(BUF, s))),
        fds,
    })
}

/// Destination side: waits for the source (or opens the file); the endpoint keeps listening
/// (for a preempt channel) until the returned [`Listening`] is dropped.
/// Listens on `ep` (`unix:` or `tcp:`) without waiting for anyone yet.
pub fn listen(ep: &Endpoint) -> io::Result<Listening> {
    match ep {
        Endpoint::Unix { path, .. } => Ok(Listening::Unix(bind_private(path)?, path.clone())),
        Endpoint::Tcp(a) => Ok(Listening::Tcp(TcpListener::bind(a)?)),
        Endpoint::File(_) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a file is not a connection to listen on",
        )),
    }
}

pub fn accept_keep(ep: &Endpoint) -> io::Result<(Channel, Option<Listening>)> {
    match ep {
        Endpoint::Unix { path: p, .. } => {
            // Made first, so the path goes away whatever happens next.
            let listening = Listening::Unix(bind_private(p)?, p.clone());
            let first = match listening.accept_blocking()? {
                Conn::Unix(s) => first_unix_channel(s)?,
                other => other.into_channel()?,
            };
            Ok((first, Some(listening)))
        }
        Endpoint::Tcp(a) => {
            let listening = Listening::Tcp(TcpListener::bind(a)?);
            let first = listening.accept_blocking()?;
            Ok((first.into_channel()?, Some(listening)))
        }
        Endpoint::File(p) => Ok((
            Channel {
                reader: Some(Box::new(BufReader::with_capacity(BUF, File::open(p)?))),
                writer: None,
                fds: Vec::new(),
            },
            None,
        )),
    }
}

/// The stream header's length (see `stream`).
const HEADER_LEN: usize = crate::stream::HEADER_LEN;

/// How long the source waits for the destination's answer after the end section.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(60);
/// A destination that takes no data for this long has stalled: the migration fails.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_endpoints() {
        assert_eq!(
            "unix:/tmp/s".parse(),
            Ok(Endpoint::Unix {
                path: "/tmp/s".into(),
                local: false
            })
        );
        let local: Endpoint = "unix:/tmp/a,b,local=on".parse().unwrap();
        assert_eq!(
            local,
            Endpoint::Unix {
                path: "/tmp/a,b".into(),
                local: true
            }
        );
        assert_eq!(local.to_string(), "unix:/tmp/a,b,local=on");
        assert!(!"unix:/tmp/s,local=off"
            .parse::<Endpoint>()
            .unwrap()
            .is_local());
        for bad in ["tcp:127.0.0.1:4444,local=on", "file:/tmp/x,local=on"] {
            assert_eq!(
                bad.parse::<Endpoint>(),
                Err(BadEndpoint::LocalNeedsUnix(bad.into()))
            );
        }
        assert_eq!(
            "tcp:127.0.0.1:4444".parse(),
            Ok(Endpoint::Tcp("127.0.0.1:4444".into()))
        );
        assert_eq!(
            "file:/tmp/snap".parse(),
            Ok(Endpoint::File("/tmp/snap".into()))
        );
        assert!("tcp:nohost".parse::<Endpoint>().is_err());
        assert!("ftp:x".parse::<Endpoint>().is_err());
        assert!("unix:".parse::<Endpoint>().is_err());
    }

    #[test]
    fn parses_channels() {
        assert_eq!(
            parse_migrate_uri("tcp:127.0.0.1:4444,channels=4"),
            Ok((Endpoint::Tcp("127.0.0.1:4444".into()), Some(4)))
        );
        assert_eq!(
            parse_migrate_uri("unix:/tmp/s"),
            Ok((
                Endpoint::Unix {
                    path: "/tmp/s".into(),
                    local: false
                },
                None
            ))
        );
        for bad in [
            "unix:/tmp/s,channels=17",
            "unix:/tmp/s,channels=x",
            "unix:/tmp/s,local=on,channels=2",
            "file:/tmp/f,channels=2",
        ] {
            assert_eq!(
                parse_migrate_uri(bad),
                Err(BadEndpoint::Channels(bad.into())),
                "{bad}"
            );
        }
    }

    #[test]
    fn bind_private_replaces_only_a_stale_socket() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("tern-bind-private-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("not-a-socket");
        std::fs::write(&file, b"keep me").unwrap();
        let err = bind_private(&file).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

        let sock = dir.join("a.sock");
        let live = bind_private(&sock).unwrap();
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // Someone listens: not taken over.
        let err = bind_private(&sock).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        assert!(
            UnixStream::connect(&sock).is_ok(),
            "the first listener keeps its socket"
        );
        // Stale (its listener is gone): replaced.
        drop(live);
        let _again = bind_private(&sock).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}

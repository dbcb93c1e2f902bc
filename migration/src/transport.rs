//! Where a migration stream goes: `unix:PATH`, `tcp:HOST:PORT` or `file:PATH`.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::peer::peer_timeout;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
    File(PathBuf),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("`{0}` is not a migration endpoint (expected unix:PATH, tcp:HOST:PORT or file:PATH)")]
pub struct BadEndpoint(pub String);

impl FromStr for Endpoint {
    type Err = BadEndpoint;
    fn from_str(s: &str) -> Result<Self, BadEndpoint> {
        let bad = || BadEndpoint(s.to_string());
        match s.split_once(':') {
            Some(("unix", p)) if !p.is_empty() => Ok(Endpoint::Unix(p.into())),
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
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
            Endpoint::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

/// Both directions of a migration connection. Files have no return path.
pub struct Channel {
    pub reader: Option<Box<dyn Read + Send>>,
    pub writer: Option<Box<dyn Write + Send>>,
}

const BUF: usize = 1 << 20;
/// Smaller on the reading side: what sits read-ahead here delays a requested postcopy page.
const READ_BUF: usize = 128 << 10;

fn split<S: Read + Write + Send + 'static>(a: S, b: S) -> Channel {
    Channel {
        reader: Some(Box::new(BufReader::with_capacity(READ_BUF, a))),
        writer: Some(Box::new(BufWriter::with_capacity(BUF, b))),
    }
}

/// Source side: connect to (or create) the endpoint.
pub fn connect(ep: &Endpoint) -> io::Result<Channel> {
    match ep {
        Endpoint::Unix(p) => {
            let s = UnixStream::connect(p)?;
            s.set_write_timeout(Some(STALL_TIMEOUT))?;
            s.set_read_timeout(Some(peer_timeout()))?;
            let r = s.try_clone()?;
            Ok(split(r, s))
        }
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
        }),
    }
}

/// Destination side: wait for the source (or open the file).
pub fn accept(ep: &Endpoint) -> io::Result<Channel> {
    match ep {
        Endpoint::Unix(p) => {
            // A stale socket file from an earlier run would make bind fail.
            if p.exists() {
                std::fs::remove_file(p)?;
            }
            let l = UnixListener::bind(p)?;
            let (s, _) = l.accept()?;
            let _ = std::fs::remove_file(p);
            // The source writes all the time or sends heartbeats: silence is a dead source.
            s.set_read_timeout(Some(peer_timeout()))?;
            s.set_write_timeout(Some(STALL_TIMEOUT))?;
            let r = s.try_clone()?;
            Ok(split(r, s))
        }
        Endpoint::Tcp(a) => {
            let l = TcpListener::bind(a)?;
            let (s, _) = l.accept()?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(peer_timeout()))?;
            s.set_write_timeout(Some(STALL_TIMEOUT))?;
            let r = s.try_clone()?;
            Ok(split(r, s))
        }
        Endpoint::File(p) => Ok(Channel {
            reader: Some(Box::new(BufReader::with_capacity(BUF, File::open(p)?))),
            writer: None,
        }),
    }
}

/// How long the source waits for the destination's answer after the end section.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(60);
/// A destination that takes no data for this long has stalled: the migration fails.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_endpoints() {
        assert_eq!("unix:/tmp/s".parse(), Ok(Endpoint::Unix("/tmp/s".into())));
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
}

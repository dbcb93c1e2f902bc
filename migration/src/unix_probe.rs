//! Is anyone listening on a Unix socket path? Asked before tern binds there: a stale socket (its
//! listener gone) may be replaced, a live one must not be. Asked without blocking: a listener
//! that never accepts, its backlog full, would hold a blocking `connect` forever.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Liveness {
    /// Something listens (it may never accept: it still owns the path).
    Live,
    /// Nobody listens: the socket file is left over.
    Stale,
}

/// How long a connection still in progress may take before its listener counts as live.
pub(crate) const PROBE_WAIT: Duration = Duration::from_millis(500);

fn last_error() -> io::Error {
    io::Error::last_os_error()
}

/// Connects to `path` without blocking (at most `wait` for a connection in progress).
pub(crate) fn probe(path: &Path, wait: Duration) -> io::Result<Liveness> {
    // SAFETY: an all-zero sockaddr_un is a valid (empty) address.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let bytes = path.as_os_str().as_bytes();
    // One byte is left for the terminating NUL.
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the socket path is too long for a Unix socket address",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    // SAFETY: creates a descriptor, owned right below.
    let raw = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if raw < 0 {
        return Err(last_error());
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: `addr` is a valid sockaddr_un and `len` lies within it.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if rc == 0 {
        return Ok(Liveness::Live);
    }
    let e = last_error();
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => Ok(Liveness::Stale),
        // The backlog is full: a listener that does not accept (yet) still owns the path.
        Some(libc::EAGAIN) => Ok(Liveness::Live),
        Some(libc::EINPROGRESS) => finish(&fd, wait),
        _ => Err(e),
    }
}

/// A connection in progress: live unless it is refused within `wait`.
fn finish(fd: &OwnedFd, wait: Duration) -> io::Result<Liveness> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    let ms = libc::c_int::try_from(wait.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    if n <= 0 {
        // Timed out (or interrupted): someone holds the path without answering.
        return Ok(Liveness::Live);
    }
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: SO_ERROR writes one c_int into `err`, its size in `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(last_error());
    }
    match err {
        0 => Ok(Liveness::Live),
        libc::ECONNREFUSED => Ok(Liveness::Stale),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::time::Instant;

    #[test]
    fn a_full_backlog_is_live_at_once_and_a_gone_listener_stale() {
        let dir = std::env::temp_dir().join(format!("tern-unix-probe-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("full.sock");
        let l = UnixListener::bind(&path).unwrap();
        // SAFETY: shrinks the backlog of a listening socket this test owns.
        assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 0) }, 0);
        // One connection, never accepted, fills a backlog of 0.
        let _queued = UnixStream::connect(&path).unwrap();
        let t = Instant::now();
        assert_eq!(probe(&path, PROBE_WAIT).unwrap(), Liveness::Live);
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        drop(l);
        assert_eq!(probe(&path, PROBE_WAIT).unwrap(), Liveness::Stale);
        let long = dir.join("x".repeat(200));
        assert_eq!(
            probe(&long, PROBE_WAIT).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! A serial output backend that writes to whichever Unix-socket client is connected.
//!
//! The VMM owns the listening socket and installs or clears the client with
//! [`SocketClient::set`] / [`SocketClient::clear`]; the UART writes through a [`SocketOutput`].
//! With no client connected, output is dropped. Writes never block a vCPU: a client that stops
//! reading loses output once the socket buffer is full, and a client that went away is cleared.

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use crate::bus::lock;

/// The currently connected client, shared by the UART's output and the VMM's accept/read side.
#[derive(Clone, Default)]
pub struct SocketClient {
    stream: Arc<Mutex<Option<UnixStream>>>,
}

impl SocketClient {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `stream` the client that receives the guest's output.
    pub fn set(&self, stream: UnixStream) {
        *lock(&self.stream) = Some(stream);
    }

    /// Forgets the client (it disconnected): output is dropped until the next one.
    pub fn clear(&self) {
        *lock(&self.stream) = None;
    }

    pub fn is_connected(&self) -> bool {
        lock(&self.stream).is_some()
    }

    /// The UART side of this client slot.
    pub fn output(&self) -> SocketOutput {
        SocketOutput {
            client: self.clone(),
            dropped: 0,
        }
    }
}

/// `Write` for the UART: sends to the connected client, drops bytes when there is none.
pub struct SocketOutput {
    client: SocketClient,
    dropped: u64,
}

impl SocketOutput {
    /// Bytes dropped because no client was connected or it was not reading.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

/// Sends without blocking and without SIGPIPE.
fn send_nonblocking(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a valid slice for the duration of the call; the fd is owned by `stream`.
    let n = unsafe {
        libc::send(
            stream.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

impl Write for SocketOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut slot = lock(&self.client.stream);
        let Some(stream) = slot.as_ref() else {
            self.dropped += buf.len() as u64;
            return Ok(buf.len());
        };
        let mut sent = 0;
        while sent < buf.len() {
            match send_nonblocking(stream, &buf[sent..]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    // EPIPE / ECONNRESET: the client is gone. The VMM's reader sees the hang-up
                    // too and accepts the next client.
                    log::debug!("serial socket client dropped: {e}");
                    *slot = None;
                    break;
                }
            }
        }
        self.dropped += (buf.len() - sent) as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn output_goes_to_the_client_or_nowhere() {
        let client = SocketClient::new();
        let mut out = client.output();
        out.write_all(b"lost").unwrap();
        assert_eq!(out.dropped(), 4);

        let (ours, mut theirs) = UnixStream::pair().unwrap();
        client.set(ours);
        out.write_all(b"hello\n").unwrap();
        let mut buf = [0u8; 6];
        theirs.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello\n");

        drop(theirs);
        out.write_all(b"x").unwrap();
        assert!(!client.is_connected(), "a hung-up client is forgotten");
        client.clear();
        assert!(!client.is_connected());
    }
}

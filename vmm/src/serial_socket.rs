//! `--serial2 socket=PATH`: the host side of COM2, a Unix socket that connects one client at a
//! time to the guest's second 16550.
//!
//! tern listens on PATH (created 0600). While a client is connected the listener is not watched,
//! so a second client waits in the listen backlog until the first one leaves. Bytes from the client
//! go to the UART's receive path ([`SerialDevice::queue_input`]: the 64-byte FIFO plus a backlog
//! that refills it whenever the guest empties it, so no input is lost); the guest's output goes to
//! the client through the device's [`devices::legacy::SocketOutput`]. When the client disconnects,
//! tern accepts the next one. A client that sends faster than the guest reads is paused (not
//! read) once [`BACKLOG_LIMIT`] bytes wait, and resumed by a short timer.

use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::bus::lock;
use devices::legacy::{SerialDevice, SocketClient};
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

/// Input bytes that may wait for the guest before tern stops reading from the client (they
/// migrate with the device, which refuses more).
pub const BACKLOG_LIMIT: usize = devices::legacy::INPUT_BACKLOG_LIMIT;
/// How often a paused client is re-checked.
const RESUME_POLL: Duration = Duration::from_millis(5);

pub struct SerialSocket {
    listener: UnixListener,
    path: PathBuf,
    client: SocketClient,
    /// Our read side of the connected client (the output side holds a clone in `client`).
    stream: Option<UnixStream>,
    /// Reading from `stream` is paused because the backlog is full.
    paused: bool,
    timer: TimerFd,
    device: Arc<Mutex<SerialDevice>>,
}

impl SerialSocket {
    /// Listens on `path` for clients of `device`, whose output must go to `client.output()`.
    pub fn bind(
        path: &Path,
        client: SocketClient,
        device: Arc<Mutex<SerialDevice>>,
    ) -> io::Result<Self> {
        let listener = migration::transport::bind_private(path)?;
        listener.set_nonblocking(true)?;
        Ok(SerialSocket {
            listener,
            path: path.to_path_buf(),
            client,
            stream: None,
            paused: false,
            timer: TimerFd::new()?,
            device,
        })
    }

    fn accept(&mut self, ops: &mut EventOps) {
        let stream = match self.listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                log::warn!("serial2: accept on {}: {e}", self.path.display());
                return;
            }
        };
        let output = match stream
            .set_nonblocking(true)
            .and_then(|_| stream.try_clone())
        {
            Ok(s) => s,
            Err(e) => {
                log::warn!("serial2: setting up the client: {e}");
                return;
            }
        };
        if let Err(e) = ops.add(Events::new(&stream, EventSet::IN | EventSet::READ_HANG_UP)) {
            log::warn!("serial2: cannot watch the client: {e:?}");
            return;
        }
        // One client at a time: the next one waits in the listen backlog.
        let _ = ops.remove(Events::new(&self.listener, EventSet::IN));
        self.client.set(output);
        self.stream = Some(stream);
        self.paused = false;
        log::debug!("serial2: client connected");
    }

    fn disconnect(&mut self, ops: &mut EventOps) {
        if let Some(stream) = self.stream.take() {
            if !self.paused {
                let _ = ops.remove(Events::new(&stream, EventSet::IN | EventSet::READ_HANG_UP));
            }
        }
        self.paused = false;
        let _ = self.timer.clear();
        self.client.clear();
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            log::warn!("serial2: cannot watch {} again: {e:?}", self.path.display());
        }
        log::debug!("serial2: client disconnected");
    }

    /// Reads what the client sent into the UART; returns false when the client has gone.
    fn read_client(&mut self, ops: &mut EventOps) -> bool {
        let Some(stream) = self.stream.as_mut() else {
            return false;
        };
        let mut buf = [0u8; 4096];
        loop {
            let mut dev = lock(&self.device);
            if dev.backlog_len() >= BACKLOG_LIMIT {
                drop(dev);
                // The guest is behind: stop reading (epoll would report the data again at once)
                // and look again shortly.
                let _ = ops.remove(Events::new(&*stream, EventSet::IN | EventSet::READ_HANG_UP));
                self.paused = true;
                if let Err(e) = self.timer.reset(RESUME_POLL, Some(RESUME_POLL)) {
                    log::warn!("serial2: resume timer: {e}");
                }
                return true;
            }
            // Never past the limit: the backlog is saved with the device and must restore.
            let room = (BACKLOG_LIMIT - dev.backlog_len()).min(buf.len());
            match stream.read(&mut buf[..room]) {
                Ok(0) => return false,
                Ok(n) => dev.queue_input(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("serial2: client read: {e}");
                    return false;
                }
            }
        }
    }

    fn resume_if_room(&mut self, ops: &mut EventOps) {
        let _ = self.timer.wait();
        if !self.paused || lock(&self.device).backlog_len() >= BACKLOG_LIMIT / 2 {
            return;
        }
        let _ = self.timer.clear();
        self.paused = false;
        if let Some(stream) = &self.stream {
            if let Err(e) = ops.add(Events::new(stream, EventSet::IN | EventSet::READ_HANG_UP)) {
                log::warn!("serial2: cannot watch the client again: {e:?}");
            }
        }
    }
}

impl MutEventSubscriber for SerialSocket {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.listener.as_raw_fd() {
            self.accept(ops);
        } else if fd == self.timer.as_raw_fd() {
            self.resume_if_room(ops);
        } else if self.stream.as_ref().is_some_and(|s| s.as_raw_fd() == fd) {
            // Read before looking at the hang-up: the client may have sent a last line and left.
            if !self.read_client(ops) {
                self.disconnect(ops);
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            log::error!("serial2: cannot watch {}: {e:?}", self.path.display());
        }
        if let Err(e) = ops.add(Events::new(&self.timer, EventSet::IN)) {
            log::error!("serial2: cannot watch the resume timer: {e:?}");
        }
    }
}

impl Drop for SerialSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

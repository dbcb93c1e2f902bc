//! The control API: newline-delimited JSON on a Unix socket (see docs/api.md).
//!
//! Request: a [`Request`] (`{"command": "status" | "pause" | ..., fields}`), the type `tern
//! remote` sends too. Response: `{"ok": true, "result": ...}` or `{"ok": false, "error": "..."}`.
//!
//! The event loop only accepts; each client is served on its own short-lived thread, with a
//! line-length cap and a deadline, so a slow or hostile client never delays the VMM.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::VmExitReason;
use event_manager::{EventOps, Events, MutEventSubscriber};
use migration::outgoing::Params;
use serde_json::{json, Value};
use vmm_sys_util::epoll::EventSet;

use crate::migrate::flows;
use crate::vm::VmInner;
use migration::lifecycle::Command;

pub mod request;
pub use request::{LineReader, Request};

fn reply(stream: &UnixStream, result: Result<Value, String>) -> std::io::Result<()> {
    let body = match result {
        Ok(result) => json!({"ok": true, "result": result}),
        Err(error) => json!({"ok": false, "error": error}),
    };
    let mut w = stream;
    writeln!(w, "{body}")
}

/// A client has this long to send its request line.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// Replies that cannot be written in this long are dropped.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// Clients served at once; more are told to come back later.
const MAX_CLIENTS: usize = 8;

pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    handler: Arc<Handler>,
    clients: Arc<AtomicUsize>,
}

/// What serving a request needs; shared by the client threads.
struct Handler {
    vm: Arc<VmInner>,
    params: Params,
    started: Instant,
}

impl ApiServer {
    /// Binds the socket with mode 0600 (only this user may drive the VM).
    pub fn bind(
        path: &Path,
        vm: Arc<VmInner>,
        params: Params,
        started: Instant,
    ) -> std::io::Result<Self> {
        let listener = migration::transport::bind_private(path)?;
        listener.set_nonblocking(true)?;
        Ok(ApiServer {
            listener,
            path: path.to_path_buf(),
            handler: Arc::new(Handler {
                vm,
                params,
                started,
            }),
            clients: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Hands a new client to its own thread (or turns it away when too many are being served).
    fn spawn_client(&self, stream: UnixStream) {
        if self.clients.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
            self.clients.fetch_sub(1, Ordering::SeqCst);
            // A short reply into a fresh socket's empty buffer: it does not wait for the client.
            let _ = reply(&stream, Err("too many API clients at once; retry".into()));
            return;
        }
        let handler = self.handler.clone();
        let clients = self.clients.clone();
        let spawned = std::thread::Builder::new()
            .name("api-client".into())
            .spawn(move || {
                // Under the main thread's filter.
                crate::seccomp::label("API client");
                if let Err(e) = handler.serve(stream) {
                    log::warn!("api: {e}");
                }
                clients.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            self.clients.fetch_sub(1, Ordering::SeqCst);
            log::warn!("api: cannot start a client thread: {e}");
        }
    }
}

/// Reads one request line: at most [`request::MAX_REQUEST`] bytes, all before `deadline`. None: the
/// client left without sending anything.
fn read_request(stream: &UnixStream, deadline: Instant) -> Result<Option<String>, String> {
    let mut line = LineReader::default();
    let mut chunk = [0u8; 4096];
    let mut r = stream;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "no complete request within {} s",
                REQUEST_DEADLINE.as_secs()
            ));
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        let n = match r.read(&mut chunk) {
            Ok(0) if line.is_empty() => return Ok(None),
            Ok(0) => return Err("the request line has no newline".into()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // A timeout: the deadline check at the top reports it.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => return Err(e.to_string()),
        };
        if let Some(line) = line.push(&chunk[..n])? {
            return Ok(Some(line));
        }
    }
}

impl Handler {
    /// Handles a request; None when the reply is sent later by someone else.
    fn handle(&self, req: Request, stream: &UnixStream) -> Option<Result<Value, String>> {
        let vm = &self.vm;
        let result = match req {
            Request::Migrate {
                uri,
                detach,
                resume,
            } => return self.migrate(uri, detach, resume, stream),
            Request::Status => Ok(json!({
                "state": if vm.paused.load(Ordering::SeqCst) { "paused" } else { "running" },
                "vcpus": vm.record.vcpus,
                "memory_bytes": vm.record.memory_size,
                "uptime_ms": self.started.elapsed().as_millis() as u64,
                "migration": vm.migration.get().state,
                "balloon": vm.balloon.as_ref().map(|b| crate::balloon::status(&devices::bus::lock(b))),
            })),
            Request::Balloon { bytes } => match &vm.balloon {
                Some(b) => flows::admit(vm, Command::Balloon)
                    .map_err(|e| e.to_string())
                    .and_then(|_| {
                        crate::balloon::set_target(b, bytes, vm.record.memory_size)
                            .map_err(|e| e.to_string())
                    }),
                None => Err("this VM has no balloon (start it with --balloon)".into()),
            },
            Request::Pause => flows::set_paused(vm, true, false)
                .map(|_| json!({"state": "paused"}))
                .map_err(|e| e.to_string()),
            Request::Resume { force } => flows::set_paused(vm, false, force)
                .map(|_| json!({"state": "running"}))
                .map_err(|e| e.to_string()),
            Request::MigrateCancel => flows::cancel_outgoing(vm)
                .map(|_| json!({"cancelling": true}))
                .map_err(|e| e.to_string()),
            Request::MigrateRecover { uri } => uri
                .parse::<migration::transport::Endpoint>()
                .map_err(|e| e.to_string())
                .and_then(|ep| {
                    migration::destination::recover::listen(vm.clone(), ep)
                        .map_err(|e| e.to_string())
                })
                .map(|_| json!({"listening": uri})),
            Request::MigrateStatus => {
                let status = vm.migration.get();
                let stage = migration::lifecycle::Stage::of(&status).as_str();
                serde_json::to_value(status)
                    .map(|mut v| {
                        v["stage"] = json!(stage);
                        v
                    })
                    .map_err(|e| e.to_string())
            }
            Request::MigrateStartPostcopy => flows::request_postcopy(vm)
                .map(|_| json!({"postcopy_requested": true}))
                .map_err(|e| e.to_string()),
            Request::Quit { force } => {
                let command = if force {
                    Command::QuitForce
                } else {
                    Command::Quit
                };
                flows::admit(vm, command)
                    .map(|_| {
                        vm.exit.request(VmExitReason::HostRequest(
                            "quit requested through the API".into(),
                        ));
                        json!({"quitting": true})
                    })
                    .map_err(|e| e.to_string())
            }
        };
        Some(result)
    }

    fn migrate(
        &self,
        uri: String,
        detach: bool,
        resume: bool,
        stream: &UnixStream,
    ) -> Option<Result<Value, String>> {
        let (ep, channels) = match migration::transport::parse_migrate_uri(&uri) {
            Ok(v) => v,
            Err(e) => return Some(Err(e.to_string())),
        };
        let waiter = match (detach, stream.try_clone()) {
            (false, Ok(s)) => Some(s),
            _ => None,
        };
        let on_done: flows::OnDone = match waiter {
            Some(s) => Box::new(move |status| {
                let result = match status.state {
                    migration::progress::MigrationState::Completed => {
                        serde_json::to_value(status).map_err(|e| e.to_string())
                    }
                    _ => Err(status
                        .error
                        .clone()
                        .unwrap_or_else(|| "migration failed".into())),
                };
                let _ = reply(&s, result);
            }),
            None => Box::new(|_| {}),
        };
        let started = if resume && ep.is_local() {
            Err("local=on cannot resume a postcopy (a local migration never uses postcopy)".into())
        } else if resume {
            crate::migrate::recovery::reconnect(
                &self.vm,
                ep,
                self.params.postcopy_bandwidth,
                on_done,
            )
            .map_err(|e| e.to_string())
        } else {
            let mut params = self.params.clone();
            params.channels = channels.or(params.channels);
            flows::start_outgoing(&self.vm, ep, params, on_done).map_err(|e| e.to_string())
        };
        match started {
            Ok(()) if detach => Some(Ok(json!({"started": uri}))),
            Ok(()) => None,
            Err(e) => Some(Err(e)),
        }
    }

    fn serve(&self, stream: UnixStream) -> std::io::Result<()> {
        stream.set_nonblocking(false)?;
        stream.set_write_timeout(Some(REPLY_TIMEOUT))?;
        let result = match read_request(&stream, Instant::now() + REQUEST_DEADLINE) {
            Ok(None) => return Ok(()),
            Ok(Some(line)) => match Request::parse(&line) {
                Ok(req) => self.handle(req, &stream),
                Err(e) => Some(Err(e.to_string())),
            },
            Err(e) => Some(Err(format!("bad request: {e}"))),
        };
        match result {
            Some(r) => reply(&stream, r),
            None => Ok(()),
        }
    }
}

impl MutEventSubscriber for ApiServer {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        while let Ok((stream, _)) = self.listener.accept() {
            self.spawn_client(stream);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            log::error!("api: cannot watch {}: {e:?}", self.path.display());
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Client side: sends one request and returns the parsed reply.
pub fn call(path: &Path, request: &Request) -> anyhow::Result<Value> {
    use anyhow::Context;
    let stream = UnixStream::connect(path)
        .with_context(|| format!("cannot connect to the API socket {}", path.display()))?;
    // No read timeout: `migrate` answers when the migration has ended.
    let mut w = &stream;
    writeln!(w, "{}", serde_json::to_string(request)?)?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    serde_json::from_str(&line).context("malformed reply from tern")
}

//! The control API: newline-delimited JSON on a Unix socket (see docs/api.md).
//!
//! Request: `{"command": "status" | "pause" | "resume" | "migrate" | "migrate-status" |
//! "migrate-start-postcopy" | "migrate-cancel" | "migrate-recover" | "balloon" | "quit", "uri": "unix:PATH" (migrate only), "bytes": N
//! (balloon only)}`. Response: `{"ok": true, "result": ...}` or
//! `{"ok": false, "error": "..."}`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::VmExitReason;
use event_manager::{EventOps, Events, MutEventSubscriber};
use migration::outgoing::Params;
use serde::Deserialize;
use serde_json::{json, Value};
use vmm_sys_util::epoll::EventSet;

use crate::migrate::flows;
use crate::vm::VmInner;

#[derive(Debug, Deserialize)]
pub struct Request {
    pub command: String,
    #[serde(default)]
    pub uri: Option<String>,
    /// migrate: reply at once instead of when the migration has ended.
    #[serde(default)]
    pub detach: bool,
    /// balloon: the new target size in bytes.
    #[serde(default)]
    pub bytes: Option<u64>,
    /// resume: even where the guest may run elsewhere (a parked source).
    #[serde(default)]
    pub force: bool,
    /// migrate: reconnect a paused postcopy instead of starting a migration.
    #[serde(default)]
    pub resume: bool,
}

fn reply(stream: &UnixStream, result: Result<Value, String>) -> std::io::Result<()> {
    let body = match result {
        Ok(result) => json!({"ok": true, "result": result}),
        Err(error) => json!({"ok": false, "error": error}),
    };
    let mut w = stream;
    writeln!(w, "{body}")
}

pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
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
        if path.exists() {
            std::fs::remove_file(path)?;
        }
        // SAFETY: umask only changes this process's file-creation mask; restored right after.
        let old = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let listener = bound?;
        listener.set_nonblocking(true)?;
        Ok(ApiServer {
            listener,
            path: path.to_path_buf(),
            vm,
            params,
            started,
        })
    }

    /// Handles a request; None when the reply is sent later by someone else.
    fn handle(&self, req: Request, stream: &UnixStream) -> Option<Result<Value, String>> {
        if req.command == "migrate" {
            return self.migrate(req, stream);
        }
        Some(self.handle_simple(req))
    }

    fn migrate(&self, req: Request, stream: &UnixStream) -> Option<Result<Value, String>> {
        let Some(uri) = req.uri else {
            return Some(Err("migrate needs \"uri\"".into()));
        };
        let ep = match uri.parse::<migration::transport::Endpoint>() {
            Ok(ep) => ep,
            Err(e) => return Some(Err(e.to_string())),
        };
        let waiter = match (req.detach, stream.try_clone()) {
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
        let detach = req.detach;
        let started = if req.resume {
            crate::migrate::recovery::reconnect(&self.vm, ep, on_done)
        } else {
            flows::start_outgoing(&self.vm, ep, self.params.clone(), on_done)
        };
        match started {
            Ok(()) if detach => Some(Ok(json!({"started": uri}))),
            Ok(()) => None,
            Err(e) => Some(Err(e)),
        }
    }

    fn handle_simple(&self, req: Request) -> Result<Value, String> {
        let vm = &self.vm;
        match req.command.as_str() {
            "status" => Ok(json!({
                "state": if vm.paused.load(Ordering::SeqCst) { "paused" } else { "running" },
                "vcpus": vm.record.vcpus,
                "memory_bytes": vm.record.memory_size,
                "uptime_ms": self.started.elapsed().as_millis() as u64,
                "migration": vm.migration.get().state,
                "balloon": vm.balloon.as_ref().map(|b| crate::balloon::status(&devices::bus::lock(b))),
            })),
            "balloon" => {
                let Some(b) = &vm.balloon else {
                    return Err("this VM has no balloon (start it with --balloon)".into());
                };
                let bytes = req.bytes.ok_or("balloon needs \"bytes\"")?;
                crate::balloon::set_target(b, bytes, vm.record.memory_size)
            }
            "pause" => flows::set_paused(vm, true, false).map(|_| json!({"state": "paused"})),
            "resume" => {
                flows::set_paused(vm, false, req.force).map(|_| json!({"state": "running"}))
            }
            "migrate-cancel" => flows::cancel_outgoing(vm).map(|_| json!({"cancelling": true})),
            "migrate-recover" => {
                let uri = req.uri.ok_or("migrate-recover needs \"uri\"")?;
                let ep = uri
                    .parse::<migration::transport::Endpoint>()
                    .map_err(|e| e.to_string())?;
                crate::migrate::recovery::listen(vm, ep).map(|_| json!({"listening": uri}))
            }
            "migrate-status" => serde_json::to_value(vm.migration.get()).map_err(|e| e.to_string()),
            "migrate-start-postcopy" => {
                let active = vm.migration.is_active();
                vm.migration.update(|s| s.postcopy_requested = active);
                Ok(json!({"postcopy_requested": active}))
            }
            "quit" => {
                vm.exit.request(VmExitReason::HostRequest(
                    "quit requested through the API".into(),
                ));
                Ok(json!({"quitting": true}))
            }
            other => Err(format!("unknown command `{other}`")),
        }
    }

    fn serve(&self, stream: UnixStream) -> std::io::Result<()> {
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line)?;
        let result = match serde_json::from_str::<Request>(&line) {
            Ok(req) => self.handle(req, &stream),
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
            if let Err(e) = self.serve(stream) {
                log::warn!("api: {e}");
            }
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
pub fn call(path: &Path, request: &Value) -> anyhow::Result<Value> {
    use anyhow::Context;
    let stream = UnixStream::connect(path)
        .with_context(|| format!("cannot connect to the API socket {}", path.display()))?;
    // No read timeout: `migrate` answers when the migration has ended.
    let mut w = &stream;
    writeln!(w, "{request}")?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    serde_json::from_str(&line).context("malformed reply from tern")
}

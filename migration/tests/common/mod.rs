//! Both sides of a migration in one process: the source (`outgoing::migrate`) and the destination
//! (`incoming::receive`, answered as tern's flows answer) on their own threads, over a Unix socket
//! in a temporary directory, with a [`FakeVm`] on each side.

// Each test file uses a different part of this module.
#![allow(dead_code)]

pub mod fake_vm;
pub mod scripted;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use migration::error::MigrationError;
use migration::incoming::{self, Received, ReturnPath};
use migration::outgoing::{self, Params};
use migration::peer::Heartbeat;
use migration::postcopy::PostcopyFigures;
use migration::progress::{MigrationStatus, StatusCell};
use migration::stream::{Section, StreamReader, StreamWriter};
use migration::transport::{bind_private, Channel, Endpoint, Listening};
use migration::MigratableVm;

pub use fake_vm::{FakeVm, LAYOUT};

/// How long any side waits for its peer's connection before the test fails.
const CONNECT_WAIT: Duration = Duration::from_secs(30);

/// A directory for one test's sockets, removed at the end.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("tern-mig-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A listening endpoint, bound before the source starts (so it never finds nobody there).
pub fn listen(dir: &TempDir) -> (Endpoint, Listening) {
    let path = dir.0.join("mig.sock");
    let l = bind_private(&path).unwrap();
    (
        Endpoint::Unix {
            path: path.clone(),
            local: false,
        },
        Listening::Unix(l, path),
    )
}

pub fn accept(listening: &Listening) -> Channel {
    listening.accept_within(CONNECT_WAIT).unwrap()
}

/// The source side, on its own thread: the result and the final status.
pub fn spawn_source(
    vm: Arc<FakeVm>,
    endpoint: Endpoint,
    params: Params,
) -> JoinHandle<(Result<(), MigrationError>, MigrationStatus)> {
    std::thread::spawn(move || {
        let status = StatusCell::default();
        let r = outgoing::migrate(&*vm, &endpoint, &params, &status);
        (r, status.get())
    })
}

/// Source parameters with everything deterministic: `downtime` 0 means "converged" only when
/// nothing is dirty (whatever the measured bandwidth), and the timeout never fires.
pub fn params() -> Params {
    Params {
        downtime: Duration::ZERO,
        max_iterations: 30,
        timeout: Duration::from_secs(3600),
        postcopy: false,
        postcopy_after_iterations: None,
        postcopy_preempt: false,
        postcopy_bandwidth: None,
        channels: Some(0),
        pacing: migration::pacing::PassPacing::OFF,
    }
}

/// What the destination may do, and what it does while postcopy runs.
#[derive(Default, Clone)]
pub struct DestOptions {
    pub postcopy: bool,
    /// `restore_state` fails with this.
    pub refuse_restore: Option<String>,
    /// Postcopy: pages a "vCPU" thread reads after RUN, before any pushed page is placed.
    pub touch: Vec<u64>,
}

pub struct PostcopyOutcome {
    /// The destination's missing pages right after RUN (runs of (gpa, pages)).
    pub missing_at_run: Vec<(u64, u64)>,
    pub figures: PostcopyFigures,
    /// What the touching threads read.
    pub touched: Vec<(u64, Vec<u8>)>,
}

pub struct DestOutcome {
    pub vm: Arc<FakeVm>,
    pub result: Result<(), String>,
    pub status: MigrationStatus,
    pub postcopy: Option<PostcopyOutcome>,
}

/// The destination side, on its own thread: accepts, builds a [`FakeVm`] from the stream's
/// configuration, receives, restores, resumes and answers the source.
pub fn spawn_dest(listening: Listening, opts: DestOptions) -> JoinHandle<DestOutcome> {
    std::thread::spawn(move || destination(listening, opts))
}

fn destination(listening: Listening, opts: DestOptions) -> DestOutcome {
    let mut ch = accept(&listening);
    let rp: ReturnPath = Arc::new(Mutex::new(StreamWriter::new(ch.writer.take().unwrap())));
    // As tern's destination does: the source hears from this side every second.
    let heartbeat = Heartbeat::start(rp.clone()).unwrap();
    let mut rx = StreamReader::new(ch.reader.take().unwrap());
    let start = incoming::read_start(&mut rx).unwrap();
    let record = start.config;
    let mut vm = FakeVm::from_record(&record);
    vm.refuse_restore = opts.refuse_restore.clone();
    let vm = Arc::new(vm);
    let status = StatusCell::default();
    let options = incoming::Options {
        postcopy: opts.postcopy,
        vcpu_tids: Vec::new(),
        local: false,
        shared_ram: false,
        preempt: Mutex::new(Some(listening)),
        id: start.id,
    };
    let received = incoming::receive(
        rx,
        &*vm,
        &status,
        Instant::now(),
        Some(rp.clone()),
        &options,
    );
    let mut postcopy = None;
    let result = match received {
        Err(e) => Err(e.to_string()),
        Ok(Received::Precopy { state, .. }) => vm
            .restore_state(state)
            .and_then(|_| vm.resume())
            .map_err(|e| e.to_string()),
        Ok(Received::Postcopy { state, tail, .. }) => {
            let tail = *tail;
            let missing_at_run = tail.listener.not_received();
            vm.restore_state(state).unwrap();
            vm.resume().unwrap();
            let touchers: Vec<_> = opts
                .touch
                .iter()
                .map(|&gpa| {
                    let vm = vm.clone();
                    std::thread::spawn(move || {
                        let mut page = vec![0u8; migration::PAGE_SIZE];
                        vm.read_ram(gpa, &mut page).unwrap();
                        (gpa, page)
                    })
                })
                .collect();
            // Every touch has faulted (and so been requested) before a pushed page is placed.
            let deadline = Instant::now() + CONNECT_WAIT;
            while tail.listener.figures().faults < opts.touch.len() as u64 {
                assert!(
                    Instant::now() < deadline,
                    "the touching threads never faulted"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            // A broken tail would leave the touching threads blocked: fail here, saying why.
            if let Err(e) = tail.run(&status) {
                panic!("the postcopy tail failed: {e}");
            }
            let touched = touchers.into_iter().map(|t| t.join().unwrap()).collect();
            let figures = tail.listener.finish();
            let json = serde_json::json!({ "downtime_ms": 0.0 });
            let mut w = rp.lock().unwrap();
            w.record(Section::Complete, &json).unwrap();
            w.flush().unwrap();
            drop(w);
            postcopy = Some(PostcopyOutcome {
                missing_at_run,
                figures,
                touched,
            });
            Ok(())
        }
    };
    drop(heartbeat);
    if postcopy.is_none() {
        // Resumed or Abort, as tern's flows answer.
        // The source may be gone already (it refused first): nothing to tell it then.
        let outcome = match &result {
            Ok(()) => incoming::Answer::Resumed,
            Err(why) => incoming::Answer::Abort(why),
        };
        let _ = incoming::answer(&rp, outcome);
    }
    DestOutcome {
        vm,
        result,
        status: status.get(),
        postcopy,
    }
}

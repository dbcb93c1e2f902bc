//! The controller's side of a vCPU thread: pause, resume, save and restore, stop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use migration::state::VcpuState;
use vmm_sys_util::signal::{Killable, SIGRTMIN};

use super::vcpu::{ControlPort, Request, Response, Vcpu};

const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a vCPU's state could not be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    /// The vCPU thread did not answer.
    #[error("{0}")]
    Gone(std::io::Error),
    #[error(transparent)]
    Kvm(#[from] super::state::StateError),
    #[error("unexpected vcpu reply to {0}")]
    Unexpected(&'static str),
}

pub struct VcpuHandle {
    pub id: u8,
    pause: Arc<AtomicBool>,
    tx: Sender<Request>,
    rx: Mutex<Receiver<Response>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl VcpuHandle {
    /// Starts the vCPU's thread; with `paused` it waits for a resume before running the guest.
    pub fn spawn(vcpu: Vcpu, paused: bool) -> std::io::Result<Self> {
        let id = vcpu.id;
        let pause = Arc::new(AtomicBool::new(paused));
        let (tx, requests) = channel();
        let (responses, rx) = channel();
        let port = ControlPort {
            pause: pause.clone(),
            requests,
            responses,
        };
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                crate::seccomp::install_or_exit(crate::seccomp::ThreadKind::Vcpu);
                vcpu.run(port)
            })?;
        let handle = VcpuHandle {
            id,
            pause,
            tx,
            rx: Mutex::new(rx),
            thread: Mutex::new(Some(thread)),
        };
        if paused {
            handle.wait_paused()?;
        }
        Ok(handle)
    }

    fn kick(&self) {
        if let Some(t) = devices::bus::lock(&self.thread).as_ref() {
            let _ = t.kill(SIGRTMIN());
        }
    }

    fn wait_paused(&self) -> std::io::Result<()> {
        let deadline = Instant::now() + REPLY_TIMEOUT;
        let rx = devices::bus::lock(&self.rx);
        loop {
            // Repeated kicks: one that lands just before KVM_RUN is entered is lost.
            self.kick();
            match rx.recv_timeout(Duration::from_millis(5)) {
                Ok(Response::Paused) => return Ok(()),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(_) => {
                    return Err(std::io::Error::other(format!(
                        "vcpu {} did not pause (thread ended or hung)",
                        self.id
                    )))
                }
            }
        }
    }

    pub fn pause(&self) -> std::io::Result<()> {
        self.pause.store(true, Ordering::SeqCst);
        self.wait_paused()
    }

    fn call(&self, req: Request) -> std::io::Result<Response> {
        let gone = || std::io::Error::other(format!("vcpu {} thread is gone", self.id));
        self.tx.send(req).map_err(|_| gone())?;
        devices::bus::lock(&self.rx)
            .recv_timeout(REPLY_TIMEOUT)
            .map_err(|_| gone())
    }

    pub fn resume(&self) -> std::io::Result<()> {
        match self.call(Request::Resume)? {
            Response::Resumed => Ok(()),
            _ => Err(std::io::Error::other("unexpected vcpu reply to resume")),
        }
    }

    pub fn save(&self) -> Result<VcpuState, VcpuStateError> {
        match self
            .call(Request::SaveState)
            .map_err(VcpuStateError::Gone)?
        {
            Response::State(s) => Ok(*s?),
            _ => Err(VcpuStateError::Unexpected("save")),
        }
    }

    pub fn restore(&self, state: VcpuState) -> Result<(), VcpuStateError> {
        match self
            .call(Request::Restore(Box::new(state)))
            .map_err(VcpuStateError::Gone)?
        {
            Response::Restored(r) => Ok(r?),
            _ => Err(VcpuStateError::Unexpected("restore")),
        }
    }

    /// Ends the thread (the VM's exit request must already be set) and joins it.
    pub fn stop(&self) {
        let _ = self.tx.send(Request::Exit);
        let Some(thread) = devices::bus::lock(&self.thread).take() else {
            return;
        };
        for _ in 0..500 {
            if thread.is_finished() {
                break;
            }
            let _ = thread.kill(SIGRTMIN());
            std::thread::sleep(Duration::from_millis(2));
        }
        if thread.join().is_err() {
            log::error!("vcpu {} thread panicked", self.id);
        }
    }
}

//! How devices reach the outside world: an interrupt line and a request to end the VM.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::EventFd;

/// An edge-triggered interrupt line backed by an eventfd (the VMM wires it to an irqfd).
pub struct IrqLine(EventFd);

impl IrqLine {
    pub fn new(evt: EventFd) -> Self {
        IrqLine(evt)
    }
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Why the VM is ending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExitReason {
    /// The guest reset or powered off the machine (exit code 0).
    Reset,
    /// The guest reported a status through the test-exit port.
    GuestStatus(i32),
    /// The host asked tern to stop (signal or control API).
    HostRequest(String),
    /// Something went wrong with the guest or KVM; the message says what.
    Crash(String),
}

impl VmExitReason {
    /// The process exit code for this reason.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmExitReason::Reset | VmExitReason::HostRequest(_) => 0,
            VmExitReason::GuestStatus(s) => *s,
            VmExitReason::Crash(_) => 2,
        }
    }
}

/// Shared by devices, vCPU threads and the event loop: the first reason recorded wins, and the
/// eventfd wakes the event loop.
pub struct ExitRequest {
    reason: Mutex<Option<VmExitReason>>,
    requested: AtomicBool,
    code: AtomicI32,
    evt: EventFd,
}

impl ExitRequest {
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(ExitRequest {
            reason: Mutex::new(None),
            requested: AtomicBool::new(false),
            code: AtomicI32::new(0),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        }))
    }

    pub fn request(&self, reason: VmExitReason) {
        let mut slot = crate::bus::lock(&self.reason);
        if slot.is_none() {
            self.code.store(reason.exit_code(), Ordering::SeqCst);
            *slot = Some(reason);
            self.requested.store(true, Ordering::SeqCst);
            // A full eventfd counter is the only possible error, and it already wakes the loop.
            let _ = self.evt.write(1);
        }
    }

    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    pub fn reason(&self) -> Option<VmExitReason> {
        crate::bus::lock(&self.reason).clone()
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

//! tern's main-thread event loop (event-manager): exit requests, signals and console input.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use devices::legacy::SerialDevice;
use devices::{ExitRequest, VmExitReason};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

/// The signal that arrived (0 = none) and the eventfd its handler writes to.
static SIGNAL_NUMBER: AtomicI32 = AtomicI32::new(0);
static SIGNAL_EVENTFD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_terminate(signum: libc::c_int) {
    SIGNAL_NUMBER.store(signum, Ordering::SeqCst);
    let fd = SIGNAL_EVENTFD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) on an eventfd is async-signal-safe; the buffer is a valid u64.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

/// Routes SIGINT and SIGTERM to the event loop.
pub struct SignalWatcher {
    evt: EventFd,
    exit: Arc<ExitRequest>,
}

impl SignalWatcher {
    pub fn install(exit: Arc<ExitRequest>) -> std::io::Result<Self> {
        let evt = EventFd::new(libc::EFD_NONBLOCK)?;
        SIGNAL_EVENTFD.store(evt.as_raw_fd(), Ordering::SeqCst);
        for sig in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: installs a handler that only touches atomics and write(2).
            let prev =
                unsafe { libc::signal(sig, on_terminate as *const () as libc::sighandler_t) };
            if prev == libc::SIG_ERR {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(SignalWatcher { evt, exit })
    }
}

impl MutEventSubscriber for SignalWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        let name = match SIGNAL_NUMBER.load(Ordering::SeqCst) {
            libc::SIGINT => "SIGINT",
            libc::SIGTERM => "SIGTERM",
            _ => "a signal",
        };
        self.exit
            .request(VmExitReason::HostRequest(format!("stopped by {name}")));
    }
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            log::error!("cannot watch signals: {e:?}");
        }
    }
}

/// Wakes the loop when a device or vCPU asks the VM to end.
struct ExitWatcher(Arc<ExitRequest>);

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.eventfd().read();
    }
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.0.eventfd(), EventSet::IN)) {
            log::error!("cannot watch exit requests: {e:?}");
        }
    }
}

/// Feeds tern's standard input to a serial port (line-buffered: the terminal stays in cooked mode
/// so Ctrl-C still stops tern).
pub struct ConsoleInput {
    serial: Arc<Mutex<SerialDevice>>,
}

impl ConsoleInput {
    pub fn new(serial: Arc<Mutex<SerialDevice>>) -> Self {
        ConsoleInput { serial }
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut serial = devices::bus::lock(&self.serial);
        let room = serial.input_room().clamp(1, 64);
        let mut buf = [0u8; 64];
        match std::io::stdin().lock().read(&mut buf[..room]) {
            Ok(0) | Err(_) => {
                // End of input (or a closed terminal): stop watching, the guest keeps running.
                let _ = ops.remove(events);
            }
            Ok(n) => {
                serial.enqueue_input(&buf[..n]);
            }
        }
    }
    fn init(&mut self, ops: &mut EventOps) {
        let stdin = std::io::stdin();
        if let Err(e) = ops.add(Events::new(&stdin, EventSet::IN)) {
            // stdin may be a regular file or /dev/null, which epoll refuses: no console input then.
            log::debug!("console input disabled: {e:?}");
        }
    }
}

pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Runs the loop until an exit is requested; returns the reason.
pub fn run(
    exit: Arc<ExitRequest>,
    extra: Vec<Subscriber>,
) -> Result<VmExitReason, event_manager::Error> {
    let mut em = EventManager::<Subscriber>::new()?;
    em.add_subscriber(Arc::new(Mutex::new(ExitWatcher(exit.clone()))));
    for s in extra {
        em.add_subscriber(s);
    }
    loop {
        if let Some(reason) = exit.reason() {
            return Ok(reason);
        }
        match em.run_with_timeout(1000) {
            Ok(_) => {}
            Err(event_manager::Error::Epoll(e)) if e.errno() == libc::EINTR => {}
            Err(e) => return Err(e),
        }
    }
}

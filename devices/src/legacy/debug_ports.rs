//! Ports through which a guest talks to the test harness: test exit, isa-debug-exit, boot timer.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::bus::PioDevice;
use crate::irq::{ExitRequest, VmExitReason};

fn le_value(data: &[u8]) -> u32 {
    data.iter()
        .take(4)
        .enumerate()
        .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (8 * i)))
}

/// tern's test-exit port: a write of status S ends tern with exit code S & 0xff.
pub struct TestExit {
    exit: Arc<ExitRequest>,
}

impl TestExit {
    pub fn new(exit: Arc<ExitRequest>) -> Self {
        TestExit { exit }
    }
}

impl PioDevice for TestExit {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u16, data: &[u8]) {
        let status = (le_value(data) & 0xff) as i32;
        self.exit.request(VmExitReason::GuestStatus(status));
    }
}

/// QEMU's isa-debug-exit: a write of code C ends tern with exit code (C << 1) | 1, so a guest can
/// never make its harness see 0 by accident (kvm-unit-tests' convention: C = 0 means PASS).
pub struct IsaDebugExit {
    exit: Arc<ExitRequest>,
}

impl IsaDebugExit {
    pub fn new(exit: Arc<ExitRequest>) -> Self {
        IsaDebugExit { exit }
    }
}

impl PioDevice for IsaDebugExit {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u16, data: &[u8]) {
        let status = ((le_value(data) << 1) | 1) & 0xff;
        self.exit.request(VmExitReason::GuestStatus(status as i32));
    }
}

/// Firecracker-style boot timer: the guest writes a magic byte when it is ready; tern logs the time
/// since it started and keeps it for the benchmark.
pub struct BootTimer {
    start: Instant,
    magic: u8,
    recorded: Arc<Mutex<Option<Duration>>>,
}

impl BootTimer {
    pub fn new(start: Instant, magic: u8) -> Self {
        BootTimer {
            start,
            magic,
            recorded: Arc::new(Mutex::new(None)),
        }
    }

    /// The time of the first magic write, once it happened.
    pub fn recorded(&self) -> Arc<Mutex<Option<Duration>>> {
        self.recorded.clone()
    }
}

impl PioDevice for BootTimer {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u16, data: &[u8]) {
        if data.first() != Some(&self.magic) {
            return;
        }
        let elapsed = self.start.elapsed();
        let mut slot = crate::bus::lock(&self.recorded);
        if slot.is_none() {
            *slot = Some(elapsed);
        }
        eprintln!(
            "tern: boot-timer: guest ready {:.3} ms after start",
            elapsed.as_secs_f64() * 1e3
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_each_convention() {
        let exit = ExitRequest::new().unwrap();
        TestExit::new(exit.clone()).write(0, &[5, 0, 0, 0]);
        assert_eq!(exit.reason(), Some(VmExitReason::GuestStatus(5)));
        let exit = ExitRequest::new().unwrap();
        IsaDebugExit::new(exit.clone()).write(0, &[0, 0, 0, 0]);
        assert_eq!(exit.reason(), Some(VmExitReason::GuestStatus(1)));
        let exit = ExitRequest::new().unwrap();
        IsaDebugExit::new(exit.clone()).write(0, &[1]);
        assert_eq!(exit.reason(), Some(VmExitReason::GuestStatus(3)));
    }

    #[test]
    fn first_exit_reason_wins() {
        let exit = ExitRequest::new().unwrap();
        exit.request(VmExitReason::Reset);
        exit.request(VmExitReason::GuestStatus(1));
        assert_eq!(exit.reason(), Some(VmExitReason::Reset));
        assert_eq!(exit.reason().map(|r| r.exit_code()), Some(0));
    }
}

//! The i8042 keyboard controller, only as far as guests use it to reset the machine.

use std::sync::Arc;

use crate::bus::PioDevice;
use crate::irq::{ExitRequest, VmExitReason};

/// Ports 0x60..=0x64 (offset 0 data, offset 4 command). Command 0xfe pulses the reset line.
pub struct I8042 {
    exit: Arc<ExitRequest>,
}

const CMD_RESET_CPU: u8 = 0xfe;
const OFFSET_COMMAND: u16 = 4;
/// Status: nothing to read, input buffer empty (the guest may always write).
const STATUS_IDLE: u8 = 0;

impl I8042 {
    pub fn new(exit: Arc<ExitRequest>) -> Self {
        I8042 { exit }
    }
}

impl PioDevice for I8042 {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(STATUS_IDLE);
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if offset == OFFSET_COMMAND && data.first() == Some(&CMD_RESET_CPU) {
            self.exit.request(VmExitReason::Reset);
        }
    }
}

//! A 16550 UART (vm-superio) with a pluggable output.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Serial;

use crate::bus::PioDevice;
use crate::irq::IrqLine;
use crate::state::{RestoreError, Stateful};

/// Where the guest's serial output goes.
pub enum SerialOutput {
    /// tern's standard output, flushed on every write so the console is interactive.
    Stdout,
    File(File),
    /// Any writer (tests, sockets).
    Writer(Box<dyn Write + Send>),
    Off,
}

struct OutputWriter(SerialOutput);

impl Write for OutputWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.0 {
            SerialOutput::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(buf)?;
                out.flush()?;
                Ok(buf.len())
            }
            SerialOutput::File(f) => f.write(buf),
            SerialOutput::Writer(w) => w.write(buf),
            SerialOutput::Off => Ok(buf.len()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match &mut self.0 {
            SerialOutput::Stdout => io::stdout().flush(),
            SerialOutput::File(f) => f.flush(),
            SerialOutput::Writer(w) => w.flush(),
            SerialOutput::Off => Ok(()),
        }
    }
}

/// A 16550's registers and pending input, as they cross in a migration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialPortState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
    /// Input waiting behind the FIFO (what a host client sent that did not fit yet), in order;
    /// at most [`INPUT_BACKLOG_LIMIT`] bytes. Absent in records of older terns.
    #[serde(default)]
    pub pending: Vec<u8>,
}

impl From<SerialState> for SerialPortState {
    fn from(s: SerialState) -> Self {
        SerialPortState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
            pending: Vec::new(),
        }
    }
}

impl From<&SerialPortState> for SerialState {
    fn from(s: &SerialPortState) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// One 16550 on an 8-port range.
pub struct SerialDevice {
    uart: Option<Serial<IrqLine, NoEvents, OutputWriter>>,
    irq: IrqLine,
    name: &'static str,
    /// Input that did not fit the 64-byte receive FIFO yet (see [`SerialDevice::queue_input`]).
    backlog: VecDeque<u8>,
}

/// Offset of the receive buffer register (with DLAB clear; with DLAB set the read returns the
/// divisor latch and leaves the FIFO alone, so a refill then finds it as it was).
const RBR_OFFSET: u16 = 0;
/// vm-superio's receive FIFO size.
const FIFO_SIZE: usize = 64;
/// Input that may wait behind the FIFO: a host side stops reading its client there, and a
/// restore refuses a record with more (it is migrated with the registers).
pub const INPUT_BACKLOG_LIMIT: usize = 64 * 1024;

impl SerialDevice {
    pub fn new(name: &'static str, irq: IrqLine, output: SerialOutput) -> std::io::Result<Self> {
        let uart_irq = IrqLine::new(irq.eventfd().try_clone()?);
        Ok(SerialDevice {
            uart: Some(Serial::new(uart_irq, OutputWriter(output))),
            irq,
            name,
            backlog: VecDeque::new(),
        })
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    fn uart(&mut self) -> &mut Serial<IrqLine, NoEvents, OutputWriter> {
        // Only `restore` takes the UART out, and it always puts one back.
        self.uart.as_mut().expect("serial UART present")
    }

    /// Queues bytes for the guest to read; returns how many fit in the receive FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        match self.uart().enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("{}: input dropped: {e:?}", self.name);
                0
            }
        }
    }

    /// Free space in the receive FIFO.
    pub fn input_room(&self) -> usize {
        self.uart.as_ref().map(|u| u.fifo_capacity()).unwrap_or(0)
    }

    /// Queues bytes for the guest without losing any: what fits goes into the receive FIFO now,
    /// the rest waits in a backlog that refills the FIFO each time the guest empties it (on its
    /// read of the receive buffer register). Callers keep the backlog within
    /// [`INPUT_BACKLOG_LIMIT`] with [`Self::backlog_len`] (a save must restore).
    pub fn queue_input(&mut self, bytes: &[u8]) {
        self.backlog.extend(bytes);
        self.refill();
    }

    /// Bytes waiting for room in the receive FIFO.
    pub fn backlog_len(&self) -> usize {
        self.backlog.len()
    }

    /// Moves backlog bytes into the FIFO once it is empty: one RX interrupt per FIFO load.
    fn refill(&mut self) {
        let room = self.input_room();
        if self.backlog.is_empty() || room == 0 {
            return;
        }
        let n = room.min(self.backlog.len());
        let chunk: Vec<u8> = self.backlog.iter().take(n).copied().collect();
        let taken = self.enqueue_input(&chunk);
        self.backlog.drain(..taken);
    }
}

impl Stateful for SerialDevice {
    type State = SerialPortState;

    fn save(&self) -> SerialPortState {
        // The UART is out only inside `restore`, which always puts one back.
        let mut state: SerialPortState = self
            .uart
            .as_ref()
            .map(|u| u.state().into())
            .unwrap_or_default();
        state.pending = self.backlog.iter().copied().collect();
        state
    }

    fn restore(&mut self, state: &SerialPortState) -> Result<(), RestoreError> {
        // Checked here, before the UART (and its output backend) is taken apart.
        if state.in_buffer.len() > FIFO_SIZE {
            return Err(RestoreError::Invalid(format!(
                "{}: {} bytes of pending input do not fit the {FIFO_SIZE}-byte FIFO",
                self.name,
                state.in_buffer.len()
            )));
        }
        if state.pending.len() > INPUT_BACKLOG_LIMIT {
            return Err(RestoreError::Invalid(format!(
                "{}: {} bytes of input waiting behind the FIFO exceed the {INPUT_BACKLOG_LIMIT}-byte \
                 limit",
                self.name,
                state.pending.len()
            )));
        }
        let irq = IrqLine::new(self.irq.eventfd().try_clone()?);
        if let Some(old) = self.uart.take() {
            let out = old.into_writer();
            self.uart = Some(
                Serial::from_state(&SerialState::from(state), irq, NoEvents, out)
                    .map_err(|e| std::io::Error::other(format!("{e:?}")))?,
            );
        }
        // Behind the FIFO, as on the source: the guest's next read of an empty FIFO refills it.
        self.backlog = state.pending.iter().copied().collect();
        Ok(())
    }
}

impl PioDevice for SerialDevice {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let Ok(off) = u8::try_from(offset) else {
            data.fill(0xff);
            return;
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = self.uart().read(off);
        }
        if offset == RBR_OFFSET && !self.backlog.is_empty() && self.input_room() == FIFO_SIZE {
            self.refill();
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        let (Ok(off), Some(&value)) = (u8::try_from(offset), data.first()) else {
            return;
        };
        if let Err(e) = self.uart().write(off, value) {
            // The output backend failed (closed file, broken pipe): the guest must not notice.
            log::debug!("{}: output error: {e:?}", self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    const LSR: u16 = 5;
    const LSR_DATA_READY: u8 = 1;

    fn device() -> SerialDevice {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        SerialDevice::new("test", IrqLine::new(evt), SerialOutput::Off).unwrap()
    }

    fn read_reg(dev: &mut SerialDevice, offset: u16) -> u8 {
        let mut b = [0u8; 1];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn long_input_is_not_lost() {
        let mut dev = device();
        let line: Vec<u8> = (0..1000u32).map(|i| b'a' + (i % 26) as u8).collect();
        dev.queue_input(&line[..300]);
        dev.queue_input(&line[300..]);
        assert_eq!(dev.input_room(), 0);
        assert_eq!(dev.backlog_len(), 1000 - FIFO_SIZE);
        let mut got = Vec::new();
        while read_reg(&mut dev, LSR) & LSR_DATA_READY != 0 {
            got.push(read_reg(&mut dev, RBR_OFFSET));
        }
        assert_eq!(got, line);
        assert_eq!(dev.backlog_len(), 0);
    }

    #[test]
    fn state_moves_to_another_port_and_oversized_input_is_refused_whole() {
        let mut src = device();
        src.write(3, &[0x03]); // line control: 8N1
        src.write(7, &[0x5a]); // scratch

        // More than the FIFO holds: the rest waits behind it and moves too.
        let input: Vec<u8> = (0..200u32).map(|i| b'a' + (i % 26) as u8).collect();
        src.queue_input(&input);
        let saved = src.save();
        assert_eq!(saved.pending, &input[FIFO_SIZE..]);
        assert_eq!((saved.scratch, saved.line_control), (0x5a, 0x03));
        let mut dst = device();
        dst.restore(&saved).unwrap();
        assert_eq!(dst.save(), saved);
        assert_eq!(read_reg(&mut dst, 7), 0x5a);
        let mut got = Vec::new();
        while read_reg(&mut dst, LSR) & LSR_DATA_READY != 0 {
            got.push(read_reg(&mut dst, RBR_OFFSET));
        }
        assert_eq!(got, input, "every byte, in order");
        dst.restore(&saved).unwrap();

        let mut bad = saved.clone();
        bad.in_buffer = vec![0; FIFO_SIZE + 1];
        assert!(matches!(dst.restore(&bad), Err(RestoreError::Invalid(_))));
        // A stream claiming more waiting input than any host side lets wait.
        let mut huge = saved.clone();
        huge.pending = vec![0; INPUT_BACKLOG_LIMIT + 1];
        assert!(matches!(dst.restore(&huge), Err(RestoreError::Invalid(_))));
        assert_eq!(
            dst.save(),
            saved,
            "a refused record leaves the port as it was"
        );
    }
}

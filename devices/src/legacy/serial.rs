//! A 16550 UART (vm-superio) with a pluggable output.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Serial;

use crate::bus::PioDevice;
use crate::irq::IrqLine;

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

    /// The registers and pending input, for migration.
    pub fn state(&self) -> Option<SerialState> {
        self.uart.as_ref().map(|u| u.state())
    }

    /// Replaces the registers and pending input; the output backend stays.
    pub fn restore(&mut self, state: &SerialState) -> std::io::Result<()> {
        let irq = IrqLine::new(self.irq.eventfd().try_clone()?);
        if let Some(old) = self.uart.take() {
            let out = old.into_writer();
            self.uart = Some(
                Serial::from_state(state, irq, NoEvents, out)
                    .map_err(|e| std::io::Error::other(format!("{e:?}")))?,
            );
        }
        Ok(())
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
    /// read of the receive buffer register). Callers bound the backlog with [`Self::backlog_len`].
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
}

//! A 16550 UART (vm-superio) with a pluggable output.

use std::fs::File;
use std::io::{self, Write};

use vm_superio::serial::NoEvents;
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
    uart: Serial<IrqLine, NoEvents, OutputWriter>,
    name: &'static str,
}

impl SerialDevice {
    pub fn new(name: &'static str, irq: IrqLine, output: SerialOutput) -> Self {
        SerialDevice {
            uart: Serial::new(irq, OutputWriter(output)),
            name,
        }
    }

    /// Queues bytes for the guest to read; returns how many fit in the receive FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("{}: input dropped: {e:?}", self.name);
                0
            }
        }
    }

    /// Free space in the receive FIFO.
    pub fn input_room(&self) -> usize {
        self.uart.fifo_capacity()
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
            *first = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        let (Ok(off), Some(&value)) = (u8::try_from(offset), data.first()) else {
            return;
        };
        if let Err(e) = self.uart.write(off, value) {
            // The output backend failed (closed file, broken pipe): the guest must not notice.
            log::debug!("{}: output error: {e:?}", self.name);
        }
    }
}

//! COM2 (0x2f8), the host control channel: a line-oriented 16550 driver at CPL3.
//!
//! Receiving is interrupt-driven, because every port access is a VM exit (~160 µs from CPL3 on
//! this machine): with the receive-data interrupt routed through the I/O APIC (pin 3), the CPU
//! halts (`user::wait`, IF = 0 at CPL3 so an interrupt arriving between the check and the halt
//! is still pending and wakes it) until bytes arrive, then drains the FIFO with one `in` per
//! byte: tern's UART returns 0 from an empty receive buffer, so only a 0 needs a line-status
//! check. Transmitting needs no polling (tern's transmitter is always ready).

use super::platform::*;
use super::{cpu, user, Fail};

const RBR: u16 = COM2;
const THR: u16 = COM2;
const IER: u16 = COM2 + 1;
const FCR: u16 = COM2 + 2;
const LCR: u16 = COM2 + 3;
const MCR: u16 = COM2 + 4;
const LSR: u16 = COM2 + 5;
const SCR: u16 = COM2 + 7;
const LSR_DATA_READY: u8 = 1;
const IER_RX: u8 = 1;
const IOAPIC_REDIR: u32 = 0x10;

fn ioapic_write(reg: u32, value: u32) {
    // SAFETY: the I/O APIC page is identity mapped, user-accessible and uncached
    // (paging::map_ram); 32-bit stores to IOREGSEL then IOWIN are how its registers are written.
    unsafe {
        core::ptr::write_volatile(IOAPIC_BASE as *mut u32, reg);
        core::ptr::write_volatile((IOAPIC_BASE + IOAPIC_IOWIN) as *mut u32, value);
    }
}

/// The control channel. Create it once, on the CPU that should take its interrupt.
pub struct Com2 {
    /// Bytes received after the last complete line.
    pending: [u8; 256],
    pending_len: usize,
}

impl Com2 {
    /// Checks that COM2 exists, routes its interrupt to this CPU and enables receive interrupts.
    pub fn open() -> Result<Com2, Fail> {
        cpu::outb(SCR, 0x5a);
        if cpu::inb(SCR) != 0x5a {
            return Err(Fail::from(
                "no UART at COM2 (0x2f8): run tern with --serial2 socket=PATH",
            ));
        }
        // The 8259s start unmasked with vector base 0 under KVM, and LINT0 takes their output
        // (ExtINT): IRQ 3 would arrive as vector 3. Mask them; the I/O APIC delivers instead.
        cpu::outb(PIC1_DATA, 0xff);
        cpu::outb(PIC2_DATA, 0xff);
        // Pin 3: fixed delivery, physical destination (this CPU), edge, active high, unmasked.
        ioapic_write(IOAPIC_REDIR + 2 * COM2_IRQ + 1, cpu::apic_id() << 24);
        ioapic_write(IOAPIC_REDIR + 2 * COM2_IRQ, COM2_VECTOR);
        cpu::outb(LCR, 0x03); // 8N1, DLAB clear
        cpu::outb(FCR, 0x07); // FIFO on, cleared
        cpu::outb(MCR, 0x0b); // DTR, RTS, OUT2 (the PC's interrupt gate)
        cpu::outb(IER, IER_RX);
        Ok(Com2 {
            pending: [0; 256],
            pending_len: 0,
        })
    }

    /// The next received byte, halting until one arrives.
    fn read_byte(&mut self) -> u8 {
        loop {
            let b = cpu::inb(RBR);
            if b != 0 {
                return b;
            }
            // A 0: either the FIFO was empty or the host sent a NUL (which the protocol never
            // carries: it is dropped). Data still waiting means the latter.
            if cpu::inb(LSR) & LSR_DATA_READY == 0 {
                user::wait(core::ptr::null());
            }
        }
    }

    /// Reads one line (without the newline; a CR before it is dropped) into the internal buffer.
    /// A line longer than the buffer is consumed to its end and reported as an error.
    pub fn read_line(&mut self) -> Result<&str, Fail> {
        self.pending_len = 0;
        let mut overflow = false;
        loop {
            match self.read_byte() {
                b'\n' => break,
                b'\r' => {}
                b => {
                    if self.pending_len < self.pending.len() {
                        self.pending[self.pending_len] = b;
                        self.pending_len += 1;
                    } else {
                        overflow = true;
                    }
                }
            }
        }
        if overflow {
            return Err(crate::fail!(
                "line longer than {} bytes",
                self.pending.len()
            ));
        }
        core::str::from_utf8(&self.pending[..self.pending_len])
            .map_err(|_| Fail::from("line is not UTF-8"))
    }

    /// Sends `line` and a newline.
    pub fn write_line(&mut self, line: &str) {
        for &b in line.as_bytes() {
            cpu::outb(THR, b);
        }
        cpu::outb(THR, b'\n');
    }
}

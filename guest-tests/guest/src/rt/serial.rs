//! COM1 console. tern's transmitter is always ready, so bytes go straight out without polling
//! the LSR (each port access is a VM exit, ~160 µs from CPL3).

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

use super::cpu;
use super::platform::COM1;

pub fn write_bytes(bytes: &[u8]) {
    for &b in bytes {
        cpu::outb(COM1, b);
    }
}

struct Com1;

impl Write for Com1 {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_bytes(s.as_bytes());
        Ok(())
    }
}

/// Keeps lines from different CPUs apart.
static LOCK: AtomicBool = AtomicBool::new(false);

/// Prints `args` (and `prefix` before it) under the console lock. The wait for the lock is
/// bounded so an exception report can still print if the faulting code held it.
pub fn print(prefix: &str, args: fmt::Arguments) {
    let mut spins = 0u64;
    while LOCK.swap(true, Ordering::Acquire) && spins < 50_000_000 {
        cpu::pause();
        spins += 1;
    }
    write_bytes(prefix.as_bytes());
    let _ = Com1.write_fmt(args);
    LOCK.store(false, Ordering::Release);
}

/// Prints to COM1.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::rt::serial::print("", format_args!($($arg)*)) };
}

/// Prints a line to COM1.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => { $crate::rt::serial::print("", format_args!("{}\n", format_args!($($arg)*))) };
}

/// Prints a protocol line: `tern-guest: ...`.
#[macro_export]
macro_rules! report {
    ($($arg:tt)*) => {
        $crate::rt::serial::print("tern-guest: ", format_args!("{}\n", format_args!($($arg)*)))
    };
}

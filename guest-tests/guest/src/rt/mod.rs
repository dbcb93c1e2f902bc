//! The guest's runtime: a tiny CPL0 part in assembly (entry, GDT/TSS, IDT, syscalls, AP
//! trampoline) and the CPL3 services the suites use.

pub mod apf;
pub mod bootinfo;
pub mod com2;
pub mod cpu;
mod entry;
mod gdt;
pub mod idt;
mod mem;
pub mod paging;
pub mod platform;
pub mod serial;
pub mod smp;
pub mod user;

use core::fmt;
use core::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

use platform::*;

/// A failure reason, formatted into a fixed buffer (no allocator here).
pub struct Fail {
    buf: [u8; 192],
    len: usize,
}

impl Fail {
    pub fn new(args: fmt::Arguments) -> Fail {
        let mut f = Fail {
            buf: [0; 192],
            len: 0,
        };
        let _ = fmt::Write::write_fmt(&mut f, args);
        f
    }

    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("(bad utf-8)")
    }
}

impl fmt::Write for Fail {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // Truncates on a char boundary so as_str stays valid.
        for c in s.chars() {
            let mut tmp = [0u8; 4];
            let bytes = c.encode_utf8(&mut tmp).as_bytes();
            if self.len + bytes.len() > self.buf.len() {
                break;
            }
            self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
            self.len += bytes.len();
        }
        Ok(())
    }
}

impl From<&str> for Fail {
    fn from(s: &str) -> Fail {
        Fail::new(format_args!("{s}"))
    }
}

/// Builds a [`Fail`] like `format!`.
#[macro_export]
macro_rules! fail {
    ($($arg:tt)*) => { $crate::rt::Fail::new(format_args!($($arg)*)) };
}

/// Name of the running suite, for the FAIL line of panics and exceptions.
static SUITE_NAME: AtomicPtr<u8> = AtomicPtr::new(core::ptr::null_mut());
static SUITE_NAME_LEN: AtomicUsize = AtomicUsize::new(0);

pub fn set_suite_name(name: &'static str) {
    SUITE_NAME_LEN.store(name.len(), Ordering::Relaxed);
    SUITE_NAME.store(name.as_ptr() as *mut u8, Ordering::Release);
}

pub fn suite_name() -> &'static str {
    let p = SUITE_NAME.load(Ordering::Acquire);
    if p.is_null() {
        return "boot";
    }
    // SAFETY: set_suite_name stored a &'static str's pointer and length.
    let bytes = unsafe { core::slice::from_raw_parts(p, SUITE_NAME_LEN.load(Ordering::Relaxed)) };
    core::str::from_utf8(bytes).unwrap_or("boot")
}

/// Tells tern the guest is ready (it logs the time since it started).
pub fn boot_timer() {
    cpu::outb(BOOT_TIMER, BOOT_TIMER_MAGIC);
}

/// Ends the VM with `status` (tern exits with it).
pub fn exit(status: u32) -> ! {
    cpu::outl(TEST_EXIT, status);
    loop {
        cpu::pause();
    }
}

/// Prints the final protocol line and exits 0 (PASS) or 1 (FAIL).
pub fn finish(result: Result<(), Fail>) -> ! {
    match result {
        Ok(()) => {
            crate::report!("{} PASS", suite_name());
            exit(EXIT_PASS)
        }
        Err(f) => {
            crate::report!("{} FAIL {}", suite_name(), f.as_str());
            exit(EXIT_FAIL)
        }
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    crate::report!("panic: {info}");
    finish(Err(Fail::from("panic")))
}

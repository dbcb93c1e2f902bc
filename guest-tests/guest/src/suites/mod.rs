//! Test suites, chosen with `suite=NAME` on the command line. To add one: a file with
//! `pub const SUITE: Suite`, a `mod` line and an entry in `SUITES`.

use core::fmt;

use crate::rt::bootinfo::BootInfo;
use crate::rt::Fail;

mod apf;
mod apfmsr;
mod balloon;
mod dirty;
mod fault;
mod hello;
mod idle;
mod ksm;
mod memtest;
mod touch;

/// What a suite gets: boot information and the machine as set up by the runtime.
pub struct Env<'a> {
    pub boot: &'a BootInfo,
    /// CPUs online (BSP + APs that checked in).
    pub cpus: usize,
    /// Processors the MP table lists.
    pub mp_cpus: usize,
    /// TSC frequency in kHz (0: unknown).
    pub tsc_khz: u64,
}

impl Env<'_> {
    /// Numeric option `key=N` (decimal, or hex with 0x), `default` when absent.
    pub fn arg_u64(&self, key: &str, default: u64) -> Result<u64, Fail> {
        let Some(v) = self.boot.arg(key) else {
            return Ok(default);
        };
        let parsed = match v.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => v.parse(),
        };
        parsed.map_err(|_| crate::fail!("bad number {key}={v}"))
    }

    /// `mib` MiB of free RAM for a suite's data: from the first 2 MiB boundary above the image,
    /// in the e820 region holding it. Returns the start address.
    pub fn free_ram(&self, mib: u64) -> Result<u64, Fail> {
        const MIB: u64 = 1 << 20;
        let start = self.image_end().next_multiple_of(2 * MIB);
        let (_, end) = self
            .boot
            .ram_regions()
            .find(|&(s, e)| s <= start && start < e)
            .ok_or_else(|| crate::fail!("no RAM at {start:#x} above the guest image"))?;
        mib.checked_mul(MIB)
            .filter(|b| start.saturating_add(*b) <= end)
            .map(|_| start)
            .ok_or_else(|| {
                crate::fail!(
                    "{mib} MiB do not fit: {} MiB of RAM free at {start:#x}..{end:#x}",
                    (end - start) / MIB
                )
            })
    }

    /// First byte after the guest image (code, data, bss, stacks, page tables).
    pub fn image_end(&self) -> u64 {
        extern "C" {
            static __image_end: u8;
        }
        core::ptr::addr_of!(__image_end) as u64
    }
}

pub struct Suite {
    pub name: &'static str,
    pub run: fn(&Env) -> Result<(), Fail>,
}

static SUITES: &[Suite] = &[
    hello::SUITE,
    apf::SUITE,
    apfmsr::SUITE,
    balloon::SUITE,
    memtest::SUITE,
    dirty::SUITE,
    idle::SUITE,
    ksm::SUITE,
    fault::SUITE,
    touch::SUITE,
];

pub fn find(name: &str) -> Option<&'static Suite> {
    SUITES.iter().find(|s| s.name == name)
}

/// Displays the known suite names, for error messages.
pub struct Names;

impl fmt::Display for Names {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        for (i, s) in SUITES.iter().enumerate() {
            write!(f, "{}{}", if i > 0 { " " } else { "" }, s.name)?;
        }
        Ok(())
    }
}

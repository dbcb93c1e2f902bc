//! tern's built-in test guest: a bare-metal x86_64 program that tern boots as an ELF "vmlinux".
//! Its CPL0 part is a little assembly (this machine emulates guest CPL0 code); everything else,
//! including every suite, runs at CPL3. See docs/guest-abi.md for the contract with tern.
#![no_std]
#![no_main]
// Failures carry a formatted message in a fixed buffer (there is no allocator to box it).
#![allow(clippy::result_large_err)]

mod rt;
mod suites;

use rt::bootinfo::{self, BootInfo};
use rt::{cpu, paging, platform, smp, Fail};

/// The BSP's first CPL3 code (entered from `_start` with the boot_params address).
extern "C" fn bsp_main(zero_page: usize) -> ! {
    rt::boot_timer();
    let zero_page = if zero_page == 0 {
        platform::ZERO_PAGE
    } else {
        zero_page
    };
    let boot = BootInfo::parse(zero_page);
    let name = boot.arg("suite").unwrap_or("hello");
    let Some(suite) = suites::find(name) else {
        rt::set_suite_name(name);
        rt::finish(Err(fail!(
            "unknown suite '{name}' (known: {})",
            suites::Names
        )));
    };
    rt::set_suite_name(suite.name);
    rt::finish(setup(&boot).and_then(|env| (suite.run)(&env)))
}

/// Page tables from e820, then the APs.
fn setup(boot: &BootInfo) -> Result<suites::Env<'_>, Fail> {
    paging::map_ram(boot)?;
    let tsc_khz = cpu::tsc_khz();
    let mp = bootinfo::scan_mp()?;
    let cpus = smp::start_aps(&mp, tsc_khz)?;
    Ok(suites::Env {
        boot,
        cpus,
        mp_cpus: mp.count,
        tsc_khz,
    })
}

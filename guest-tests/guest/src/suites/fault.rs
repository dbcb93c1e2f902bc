//! `fault`: takes a page fault at CPL3 on purpose, so the exception protocol (report line, exit
//! status 3) can be tested. Never passes.

use super::{Env, Suite};
use crate::rt::Fail;

pub const SUITE: Suite = Suite { name: "fault", run };

/// Not mapped: above the 66 GiB the page tables cover.
const UNMAPPED: usize = 0x7f_0000_0000;

fn run(_env: &Env) -> Result<(), Fail> {
    // SAFETY: none — the read is meant to fault; the exception handler ends the VM.
    let v = unsafe { core::ptr::read_volatile(UNMAPPED as *const u64) };
    Err(crate::fail!(
        "read {v:#x} from unmapped {UNMAPPED:#x} without a fault"
    ))
}

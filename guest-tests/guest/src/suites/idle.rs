//! `idle [fill=MIB]`: boots, optionally writes a non-zero pattern over MIB of RAM (an idle guest
//! with that much live memory, for migration benchmarks), then halts until the VM is stopped.

use super::{Env, Suite};
use crate::rt::{user, Fail};

pub const SUITE: Suite = Suite { name: "idle", run };

const MIB: u64 = 1 << 20;
static NEVER: u64 = 0;

fn run(env: &Env) -> Result<(), Fail> {
    let fill = env.arg_u64("fill", 0)?;
    if fill > 0 {
        let start = env.free_ram(fill)?;
        let p = start as *mut u64;
        for i in 0..(fill * MIB / 8) as usize {
            // SAFETY: [start, start + fill MiB) is free RAM above the image, identity mapped and
            // user-writable.
            unsafe { core::ptr::write_volatile(p.add(i), (i as u64) | 0x5a00_0000_0000_0001) };
        }
    }
    crate::report!("idle: halting until stopped (filled {fill} MiB)");
    loop {
        user::wait(&NEVER);
    }
}

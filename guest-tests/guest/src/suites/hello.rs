//! `hello`: reports the CPUs that came online and the memory size, and checks the CPU count
//! against the MP table.

use core::sync::atomic::{AtomicUsize, Ordering};

use super::{Env, Suite};
use crate::rt::{smp, user, Fail};

pub const SUITE: Suite = Suite { name: "hello", run };

const MIB: u64 = 1 << 20;

fn run(env: &Env) -> Result<(), Fail> {
    crate::report!("vcpus={}", env.cpus);
    if env.cpus != env.mp_cpus {
        return Err(crate::fail!(
            "{} CPUs online but the MP table lists {}",
            env.cpus,
            env.mp_cpus
        ));
    }
    // What the user gave --memory: see BootInfo::memory_size, rounded up to a MiB.
    crate::report!("mem={} MiB", env.boot.memory_size().div_ceil(MIB));
    check_runtime(env)
}

static PINGS: AtomicUsize = AtomicUsize::new(0);

fn ping(cpu: usize, arg: u64) {
    if arg == cpu as u64 {
        PINGS.fetch_add(1, Ordering::AcqRel);
    }
}

/// Exercises what later suites rely on: a system call (int 0x80) and work handed to every AP
/// through its mailbox (wake IPI, hlt at CPL0, back to CPL3).
fn check_runtime(env: &Env) -> Result<(), Fail> {
    let cr4 = user::read_cr(4);
    if cr4 & 0x600 != 0x600 {
        return Err(crate::fail!("CR4.OSFXSR|OSXMMEXCPT not set: cr4={cr4:#x}"));
    }
    for cpu in 1..env.cpus {
        smp::run_on(cpu, ping, cpu as u64)?;
    }
    for cpu in 1..env.cpus {
        smp::wait_idle(cpu)?;
    }
    let pings = PINGS.load(Ordering::Acquire);
    if pings != env.cpus - 1 {
        return Err(crate::fail!(
            "{pings} of {} APs ran the work handed to them",
            env.cpus - 1
        ));
    }
    Ok(())
}

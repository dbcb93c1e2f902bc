//! `idle`: boots, then halts until the VM is stopped (for host-side measurements such as tern's
//! memory overhead, and for stopping tern from outside).

use super::{Env, Suite};
use crate::rt::{user, Fail};

pub const SUITE: Suite = Suite { name: "idle", run };

static NEVER: u64 = 0;

fn run(_env: &Env) -> Result<(), Fail> {
    crate::report!("idle: halting until stopped");
    loop {
        user::wait(&NEVER);
    }
}

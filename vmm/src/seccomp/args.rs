//! Argument rules for the most dangerous calls a filter allows: `ioctl` only with the request
//! numbers of KVM (type 0xAE), userfaultfd (type 0xAA), FIONBIO (std's `set_nonblocking` on
//! sockets) and TCGETS (`isatty`: progress lines on a terminal) — the vCPU threads with KVM's
//! alone — and `socket` only for Unix, IPv4 and IPv6
//! (what the migration endpoints and the API use; no netlink, no raw packets).

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

use super::ThreadKind;

/// The `_IOC_TYPE` byte of KVM's ioctls (`KVMIO`).
const KVMIO: u64 = 0xae;
/// The `_IOC_TYPE` byte of userfaultfd's ioctls (`UFFDIO`).
const UFFDIO: u64 = 0xaa;

/// One condition on argument `arg` (a 32-bit compare: ioctl requests and socket domains are
/// `int`s to the kernel).
fn when(arg: u8, op: SeccompCmpOp, value: u64) -> SeccompRule {
    let cond = SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
        .expect("argument index below 6");
    SeccompRule::new(vec![cond]).expect("a rule with one condition")
}

fn ioctl_type(ty: u64) -> SeccompRule {
    when(1, SeccompCmpOp::MaskedEq(0xff00), ty << 8)
}

/// The rules (any one allows the call) for the calls of `kind`'s allow-list that take them;
/// None: the call is allowed whatever its arguments.
pub(super) fn rules(kind: ThreadKind, nr: i64) -> Option<Vec<SeccompRule>> {
    match nr {
        libc::SYS_ioctl => Some(match kind {
            ThreadKind::Vcpu => vec![ioctl_type(KVMIO)],
            _ => vec![
                ioctl_type(KVMIO),
                ioctl_type(UFFDIO),
                when(1, SeccompCmpOp::Eq, libc::FIONBIO),
                when(1, SeccompCmpOp::Eq, libc::TCGETS),
            ],
        }),
        libc::SYS_socket => Some(
            [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6]
                .map(|domain| when(0, SeccompCmpOp::Eq, domain as u64))
                .to_vec(),
        ),
        _ => None,
    }
}

//! `apfmsr`: probes how the async-PF MSRs treat malformed writes. Each refused write must raise
//! #GP (caught and counted here), as KVM does; the well-formed sequence (INT, then EN, then ACK)
//! must be accepted. Prints one `apfmsr <case>=ok|gp` line per probe, then PASS when every probe
//! got the expected answer.

use super::{Env, Suite};
use crate::rt::{user, Fail};

pub const SUITE: Suite = Suite { name: "apfmsr", run };

const MSR_EN: u32 = 0x4b56_4d02;
const MSR_INT: u32 = 0x4b56_4d06;
const MSR_ACK: u32 = 0x4b56_4d07;
const ENABLED: u64 = 1;
const AS_PF_VMEXIT: u64 = 4;
const AS_INT: u64 = 8;

#[repr(C, align(64))]
struct Area([u8; 128]);

static mut AREA: Area = Area([0; 128]);

fn run(_env: &Env) -> Result<(), Fail> {
    let area = core::ptr::addr_of!(AREA) as u64;
    let good = area | ENABLED | AS_PF_VMEXIT | AS_INT;
    // (name, msr, value, accepted?) in order: the state carries from one probe to the next.
    let probes: [(&str, u32, u64, bool); 7] = [
        ("en_before_int", MSR_EN, good, false),
        ("int_reserved_bits", MSR_INT, 0x1f3, false),
        ("int", MSR_INT, 0xf3, true),
        ("en_misaligned_area", MSR_EN, good | 0x10, false),
        ("en_without_delivery_as_int", MSR_EN, area | ENABLED, false),
        ("en", MSR_EN, good, true),
        ("ack", MSR_ACK, 1, true),
    ];
    let mut wrong = 0;
    for (name, msr, value, want_ok) in probes {
        let ok = user::wrmsr_safe(msr, value);
        crate::report!("apfmsr {name}={}", if ok { "ok" } else { "gp" });
        if ok != want_ok {
            wrong += 1;
        }
    }
    // Leave async PF off again.
    user::wrmsr_safe(MSR_EN, 0);
    if wrong > 0 {
        return Err(crate::fail!("{wrong} probes got the wrong answer"));
    }
    Ok(())
}

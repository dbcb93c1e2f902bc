//! The compat module's instruction decoder (64-bit mode) on arbitrary bytes, and the effective
//! address of what it decodes. The decoder lives in the `tern` binary; it is compiled in here
//! from its source file (it needs nothing but `kvm_bindings`' register types).

use kvm_bindings::{kvm_regs, kvm_sregs};

use crate::bytes::Bytes;

#[allow(dead_code)]
#[path = "../../vmm/src/compat/decode.rs"]
mod decode;

use decode::{decode, InsnKind};

/// Input: the instruction bytes (up to 15), then register values for the effective address.
pub fn run(data: &[u8]) {
    let (bytes, rest) = data.split_at(data.len().min(15));
    let Some(insn) = decode(bytes) else {
        return;
    };
    assert!(insn.len >= 1 && insn.len <= bytes.len(), "{insn:?}");
    // Deterministic, and reads nothing past the instruction.
    assert_eq!(decode(&bytes[..insn.len]), Some(insn));
    let op = match insn.kind {
        InsnKind::Invpcid { reg, op } => {
            assert!(reg < 16);
            op
        }
        InsnKind::Ldmxcsr(op) | InsnKind::Stmxcsr(op) => op,
        _ => return,
    };
    assert!(op.base.is_none_or(|r| r < 16));
    assert!(op.index.is_none_or(|(r, scale)| r < 16 && scale < 4));
    let mut b = Bytes::new(rest);
    let mut regs = kvm_regs::default();
    for r in [
        &mut regs.rax,
        &mut regs.rcx,
        &mut regs.rdx,
        &mut regs.rbx,
        &mut regs.rsp,
        &mut regs.rbp,
        &mut regs.rsi,
        &mut regs.rdi,
        &mut regs.r8,
        &mut regs.r15,
    ] {
        *r = b.u64();
    }
    let mut sregs = kvm_sregs::default();
    sregs.fs.base = b.u64();
    sregs.gs.base = b.u64();
    let ea = op.effective_address(&regs, &sregs, b.u64());
    if op.addr32 && op.segment.is_none() {
        assert!(ea <= u64::from(u32::MAX));
    }
}

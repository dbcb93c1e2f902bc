//! Nested-KVM compatibility: on this machine's hypervisor (docs/machine-kvm.md) a few instructions reach
//! KVM's instruction emulator, which cannot run them, and KVM_RUN returns an emulation failure.
//! This module completes the ones measured to be safe to complete (int3, int imm8, fwait, ldmxcsr,
//! stmxcsr, stac/clac; #UD for movbe with a register operand)
//! and turns every other failure into a clear error. `syscall` completes user-mode SYSCALL, which
//! the hypervisor leaves half done (see there); `exits` counts exits by reason. On a host with real
//! VMX/SVM nothing here runs (the counters aside).

mod decode;
mod exits;
pub mod syscall;

use kvm_bindings::{kvm_regs, kvm_sregs, KVM_INTERNAL_ERROR_EMULATION};
use kvm_ioctls::VcpuFd;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemory;
pub use decode::{decode, Insn, InsnKind};
pub use exits::ExitCounts;
use std::sync::OnceLock;
pub use syscall::{DebugOutcome, SyscallAssist};

/// Whether this host's KVM runs guest kernel mode through its instruction emulator, as this
/// machine's does (docs/machine-kvm.md): its KVM is `kvm_pvm`, or the CPU has neither VMX nor SVM.
/// `TERN_COMPAT=on|off` overrides the detection (tests, and hosts this check misjudges).
/// Workarounds that would cost something on a normal host (the SYSCALL assist, masking the
/// hypercall-based PV features) are taken only when this is true.
pub fn host_emulates_kernel_mode() -> bool {
    static DETECTED: OnceLock<bool> = OnceLock::new();
    *DETECTED.get_or_init(|| match std::env::var("TERN_COMPAT").as_deref() {
        Ok("on") => true,
        Ok("off") => false,
        _ => {
            if std::path::Path::new("/sys/module/kvm_pvm").exists() {
                return true;
            }
            let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
            let flags = cpuinfo
                .lines()
                .find(|l| l.starts_with("flags"))
                .unwrap_or_default();
            !flags.split_whitespace().any(|f| f == "vmx" || f == "svm")
        }
    })
}

/// KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES: insn_bytes is valid.
const FLAG_INSN_BYTES: u64 = 1;
const BP_VECTOR: u8 = 3;
const UD_VECTOR: u8 = 6;
const GP_VECTOR: u8 = 13;
const CR4_PCIDE: u64 = 1 << 17;

#[derive(Debug, Error)]
pub enum CompatError {
    #[error("KVM internal error (suberror {suberror}) at rip={rip:#x} cpl={cpl}")]
    Internal { suberror: u32, rip: u64, cpl: u8 },
    #[error(
        "instruction cannot be emulated on this host: rip={rip:#x} cpl={cpl} bytes=[{}]",
        hex(.bytes)
    )]
    Unsupported { rip: u64, cpl: u8, bytes: Vec<u8> },
    #[error("emulating {what} at rip={rip:#x}: guest address {gva:#x} is not mapped")]
    Unmapped {
        what: &'static str,
        rip: u64,
        gva: u64,
    },
    #[error("emulating {what} at rip={rip:#x}: {source}")]
    Kvm {
        what: &'static str,
        rip: u64,
        source: kvm_ioctls::Error,
    },
    #[error("emulating {what} at rip={rip:#x}: guest memory: {source}")]
    Memory {
        what: &'static str,
        rip: u64,
        source: vm_memory::GuestMemoryError,
    },
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// What was completed, for the caller's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completed {
    Int3,
    IntN,
    /// #UD injected for an encoding the CPU rejects.
    Undefined,
    Invpcid,
    Fwait,
    Ldmxcsr,
    Stmxcsr,
    /// nop, cld, clac or stac.
    Other,
}

/// Reads up to 15 instruction bytes at the guest's RIP, preferring what KVM reported.
fn insn_bytes(fd: &mut VcpuFd, mem: &GuestMemory, rip: u64) -> Vec<u8> {
    let run = fd.get_kvm_run();
    // SAFETY: KVM filled `emulation_failure` for this KVM_EXIT_INTERNAL_ERROR exit; it is plain data.
    let failure = unsafe { run.__bindgen_anon_1.emulation_failure };
    // SAFETY: the union has a single plain-data member.
    let insn = unsafe { failure.__bindgen_anon_1.__bindgen_anon_1 };
    if failure.flags & FLAG_INSN_BYTES != 0 && insn.insn_size > 0 {
        let n = (insn.insn_size as usize).min(insn.insn_bytes.len());
        return insn.insn_bytes[..n].to_vec();
    }
    let Ok(t) = fd.translate_gva(rip) else {
        return Vec::new();
    };
    if t.valid == 0 {
        return Vec::new();
    }
    let mut buf = [0u8; 15];
    // Stop at the page end: the next page may not be mapped.
    let n = (4096 - (t.physical_address & 0xfff) as usize).min(buf.len());
    match mem.read_slice(&mut buf[..n], GuestAddress(t.physical_address)) {
        Ok(()) => buf[..n].to_vec(),
        Err(_) => Vec::new(),
    }
}

fn cpl(sregs: &kvm_sregs) -> u8 {
    sregs.cs.selector as u8 & 3
}

/// Handles a KVM_EXIT_INTERNAL_ERROR. Ok means the vCPU can run again.
pub fn handle_internal_error(fd: &mut VcpuFd, mem: &GuestMemory) -> Result<Completed, CompatError> {
    let run = fd.get_kvm_run();
    // SAFETY: KVM filled `internal` for this KVM_EXIT_INTERNAL_ERROR exit; it is plain data.
    let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
    let what = "instruction";
    let regs = fd.get_regs().map_err(|source| CompatError::Kvm {
        what,
        rip: 0,
        source,
    })?;
    let sregs = fd.get_sregs().map_err(|source| CompatError::Kvm {
        what,
        rip: regs.rip,
        source,
    })?;
    if suberror != KVM_INTERNAL_ERROR_EMULATION {
        return Err(CompatError::Internal {
            suberror,
            rip: regs.rip,
            cpl: cpl(&sregs),
        });
    }
    let bytes = insn_bytes(fd, mem, regs.rip);
    let unsupported = || CompatError::Unsupported {
        rip: regs.rip,
        cpl: cpl(&sregs),
        bytes: bytes.clone(),
    };
    let insn = decode(&bytes).ok_or_else(unsupported)?;
    complete(fd, mem, insn, regs, &sregs)
}

/// INVPCID's #GP(0) conditions (SDM): bad type, reserved descriptor bits, a non-canonical address
/// for type 0, or a non-zero PCID for types 0/1 while CR4.PCIDE is off.
fn invpcid_faults(kind: u64, desc: [u64; 2], cr4: u64) -> bool {
    let pcid = desc[0] & 0xfff;
    let canonical = ((desc[1] as i64) << 16 >> 16) as u64 == desc[1];
    kind > 3
        || desc[0] >> 12 != 0
        || (kind == 0 && !canonical)
        || (cr4 & CR4_PCIDE == 0 && kind <= 1 && pcid != 0)
}

fn guest_has_invpcid(fd: &VcpuFd) -> bool {
    const MAX_CPUID_ENTRIES: usize = 256;
    fd.get_cpuid2(MAX_CPUID_ENTRIES).is_ok_and(|c| {
        c.as_slice()
            .iter()
            .any(|e| e.function == 7 && e.index == 0 && e.ebx & (1 << 10) != 0)
    })
}

fn inject_exception(
    fd: &mut VcpuFd,
    vector: u8,
    error_code: Option<u32>,
) -> Result<(), kvm_ioctls::Error> {
    let mut events = fd.get_vcpu_events()?;
    events.exception.injected = 1;
    events.exception.nr = vector;
    events.exception.has_error_code = u8::from(error_code.is_some());
    events.exception.error_code = error_code.unwrap_or(0);
    fd.set_vcpu_events(&events)
}

fn complete(
    fd: &mut VcpuFd,
    mem: &GuestMemory,
    insn: Insn,
    mut regs: kvm_regs,
    sregs: &kvm_sregs,
) -> Result<Completed, CompatError> {
    let rip = regs.rip;
    let kvm_err = |what: &'static str| move |source| CompatError::Kvm { what, rip, source };
    let next_rip = rip + insn.len as u64;
    let done = match insn.kind {
        InsnKind::Int3 => {
            // The #BP trap frame points after the int3, as the real instruction's would.
            regs.rip = next_rip;
            fd.set_regs(&regs).map_err(kvm_err("int3"))?;
            let mut events = fd.get_vcpu_events().map_err(kvm_err("int3"))?;
            events.exception.injected = 1;
            events.exception.nr = BP_VECTOR;
            events.exception.has_error_code = 0;
            fd.set_vcpu_events(&events).map_err(kvm_err("int3"))?;
            return Ok(Completed::Int3);
        }
        InsnKind::IntN(vector) => {
            // Delivered through the IDT like an external interrupt at the next instruction: the
            // same frame as `int n` (no error code); the gate DPL check does not apply at CPL0,
            // the only place this exit happens.
            regs.rip = next_rip;
            fd.set_regs(&regs).map_err(kvm_err("int"))?;
            let mut events = fd.get_vcpu_events().map_err(kvm_err("int"))?;
            events.interrupt.injected = 1;
            events.interrupt.nr = vector;
            events.interrupt.soft = 0;
            fd.set_vcpu_events(&events).map_err(kvm_err("int"))?;
            return Ok(Completed::IntN);
        }
        InsnKind::Invpcid { reg, op } => {
            let what = "invpcid";
            // Without CPUID.7.EBX[10] the CPU answers #UD (KVM may not offer INVPCID here).
            if !guest_has_invpcid(fd) {
                inject_exception(fd, UD_VECTOR, None).map_err(kvm_err(what))?;
                return Ok(Completed::Undefined);
            }
            let gva = op.effective_address(&regs, sregs, next_rip);
            let mut desc = [0u64; 2];
            for (i, half) in desc.iter_mut().enumerate() {
                let at = gva.wrapping_add(8 * i as u64);
                let t = fd.translate_gva(at).map_err(kvm_err(what))?;
                if t.valid == 0 {
                    return Err(CompatError::Unmapped { what, rip, gva: at });
                }
                *half = mem
                    .read_obj(GuestAddress(t.physical_address))
                    .map_err(|source| CompatError::Memory { what, rip, source })?;
            }
            if invpcid_faults(decode::gpr(&regs, reg), desc, sregs.cr4) {
                inject_exception(fd, GP_VECTOR, Some(0)).map_err(kvm_err(what))?;
                return Ok(Completed::Invpcid);
            }
            // Setting the special registers again resets KVM's MMU context: a full TLB flush,
            // which covers every invalidation type.
            fd.set_sregs(sregs).map_err(kvm_err(what))?;
            Completed::Invpcid
        }
        InsnKind::Undefined => {
            // A fault: RIP stays on the instruction.
            inject_exception(fd, UD_VECTOR, None).map_err(kvm_err("#UD"))?;
            return Ok(Completed::Undefined);
        }
        InsnKind::Fwait => Completed::Fwait,
        InsnKind::Nop | InsnKind::Cld | InsnKind::Clac | InsnKind::Stac => {
            regs.rflags &= !insn.kind.rflags_cleared();
            regs.rflags |= insn.kind.rflags_set();
            Completed::Other
        }
        InsnKind::Ldmxcsr(op) | InsnKind::Stmxcsr(op) => {
            let (what, load) = match insn.kind {
                InsnKind::Ldmxcsr(_) => ("ldmxcsr", true),
                _ => ("stmxcsr", false),
            };
            let gva = op.effective_address(&regs, sregs, next_rip);
            let t = fd.translate_gva(gva).map_err(kvm_err(what))?;
            if t.valid == 0 {
                return Err(CompatError::Unmapped { what, rip, gva });
            }
            let gpa = GuestAddress(t.physical_address);
            let mem_err = |source| CompatError::Memory { what, rip, source };
            let mut fpu = fd.get_fpu().map_err(kvm_err(what))?;
            if load {
                fpu.mxcsr = mem.read_obj::<u32>(gpa).map_err(mem_err)?;
                fd.set_fpu(&fpu).map_err(kvm_err(what))?;
                Completed::Ldmxcsr
            } else {
                mem.write_obj(fpu.mxcsr, gpa).map_err(mem_err)?;
                Completed::Stmxcsr
            }
        }
    };
    regs.rip = next_rip;
    fd.set_regs(&regs).map_err(kvm_err("advancing rip"))?;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invpcid_gp_conditions() {
        let ok = [5u64, 0x4000];
        assert!(!invpcid_faults(0, ok, CR4_PCIDE));
        assert!(invpcid_faults(4, ok, CR4_PCIDE));
        assert!(invpcid_faults(2, [1 << 12, 0], CR4_PCIDE));
        assert!(invpcid_faults(0, [0, 0x8000_0000_0000], CR4_PCIDE));
        assert!(!invpcid_faults(2, [0, 0x8000_0000_0000], CR4_PCIDE));
        // PCIDE off: a non-zero PCID is refused for types 0 and 1 only.
        assert!(invpcid_faults(1, ok, 0));
        assert!(!invpcid_faults(2, ok, 0));
        assert!(!invpcid_faults(0, [0, 0x4000], 0));
    }
}

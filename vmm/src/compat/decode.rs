//! A decoder for exactly the instructions the compatibility module completes.

use kvm_bindings::{kvm_regs, kvm_sregs};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    Fs,
    Gs,
}

/// A ModRM memory operand: [base + index*scale + disp], or [rip + disp].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemOperand {
    pub base: Option<u8>,
    pub index: Option<(u8, u8)>,
    pub disp: i64,
    pub rip_relative: bool,
    pub segment: Option<Segment>,
    pub addr32: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsnKind {
    Int3,
    Fwait,
    /// `nop`, `nopl`/`nopw` with a ModRM operand, `endbr64`: nothing to do but advance.
    Nop,
    /// `cld`: clear RFLAGS.DF.
    Cld,
    /// `clac`: clear RFLAGS.AC.
    Clac,
    /// `stac`: set RFLAGS.AC (kernel mode only: user mode raises #UD before any exit).
    Stac,
    /// `int imm8`: a software interrupt through the IDT.
    IntN(u8),
    /// `invpcid reg, m128`: `reg` holds the type, the operand the descriptor.
    Invpcid {
        reg: u8,
        op: MemOperand,
    },
    /// An encoding the CPU rejects with #UD that KVM's emulator cannot even decode (`movbe` with
    /// a register operand; `rdpru`, which KVM never exposes).
    Undefined,
    Ldmxcsr(MemOperand),
    Stmxcsr(MemOperand),
}

impl InsnKind {
    /// The RFLAGS bits the instruction sets (AC for stac).
    pub fn rflags_set(self) -> u64 {
        match self {
            InsnKind::Stac => 1 << 18,
            _ => 0,
        }
    }

    /// The RFLAGS bits the instruction clears (DF for cld, AC for clac).
    pub fn rflags_cleared(self) -> u64 {
        match self {
            InsnKind::Cld => 1 << 10,
            InsnKind::Clac => 1 << 18,
            _ => 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub kind: InsnKind,
    pub len: usize,
}

/// A register by its x86 encoding number (0 = rax ... 15 = r15).
pub fn gpr(regs: &kvm_regs, n: u8) -> u64 {
    [
        regs.rax, regs.rcx, regs.rdx, regs.rbx, regs.rsp, regs.rbp, regs.rsi, regs.rdi, regs.r8,
        regs.r9, regs.r10, regs.r11, regs.r12, regs.r13, regs.r14, regs.r15,
    ][usize::from(n & 15)]
}

impl MemOperand {
    /// The linear address the operand names, given the registers and the next instruction's RIP.
    pub fn effective_address(&self, regs: &kvm_regs, sregs: &kvm_sregs, next_rip: u64) -> u64 {
        let mut ea = self.disp as u64;
        if self.rip_relative {
            ea = ea.wrapping_add(next_rip);
        }
        if let Some(b) = self.base {
            ea = ea.wrapping_add(gpr(regs, b));
        }
        if let Some((i, scale)) = self.index {
            ea = ea.wrapping_add(gpr(regs, i) << scale);
        }
        if self.addr32 {
            ea &= 0xffff_ffff;
        }
        match self.segment {
            Some(Segment::Fs) => ea.wrapping_add(sregs.fs.base),
            Some(Segment::Gs) => ea.wrapping_add(sregs.gs.base),
            None => ea,
        }
    }
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.bytes.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }
    fn disp(&mut self, n: usize) -> Option<i64> {
        let s = self.bytes.get(self.pos..self.pos + n)?;
        self.pos += n;
        Some(match n {
            1 => s[0] as i8 as i64,
            _ => i32::from_le_bytes([s[0], s[1], s[2], s[3]]) as i64,
        })
    }
}

/// Decodes a 64-bit-mode instruction; None for anything this module does not complete.
pub fn decode(bytes: &[u8]) -> Option<Insn> {
    let mut c = Cursor { bytes, pos: 0 };
    let mut segment = None;
    let mut addr32 = false;
    let mut repne = false;
    let mut opsize = false;
    let mut rex = 0u8;
    let mut op = c.byte()?;
    loop {
        match op {
            0x64 => segment = Some(Segment::Fs),
            0x65 => segment = Some(Segment::Gs),
            0x67 => addr32 = true,
            0xf2 => repne = true,
            0x66 => opsize = true,
            0x26 | 0x2e | 0x36 | 0x3e | 0xf3 => {}
            _ => break,
        }
        op = c.byte()?;
    }
    if (0x40..=0x4f).contains(&op) {
        rex = op;
        op = c.byte()?;
    }
    let kind = match op {
        0xcc if c.pos == 1 => InsnKind::Int3,
        0x9b if c.pos == 1 => InsnKind::Fwait,
        0xcd if c.pos == 1 => InsnKind::IntN(c.byte()?),
        0x90 => InsnKind::Nop,
        0xfc => InsnKind::Cld,
        0x0f if c.bytes.get(c.pos) == Some(&0x1f) => {
            c.pos += 1;
            let modrm = c.byte()?;
            let (md, rm) = (modrm >> 6, modrm & 7);
            if md != 3 {
                mem_operand(&mut c, rex, md, rm, segment, addr32)?;
            }
            InsnKind::Nop
        }
        0x0f if c.bytes.get(c.pos..c.pos + 2) == Some(&[0x1e, 0xfa]) => {
            c.pos += 2;
            InsnKind::Nop
        }
        0x0f if c.bytes.get(c.pos..c.pos + 2) == Some(&[0x01, 0xca]) => {
            c.pos += 2;
            InsnKind::Clac
        }
        // movbe (0f 38 f0/f1) takes only a memory operand; with F2 it is crc32, which is fine.
        0x0f if !repne
            && matches!(c.bytes.get(c.pos..c.pos + 3), Some(&[0x38, 0xf0 | 0xf1, m]) if m >> 6 == 3) =>
        {
            c.pos += 3;
            InsnKind::Undefined
        }
        0x0f if opsize && c.bytes.get(c.pos..c.pos + 2) == Some(&[0x38, 0x82]) => {
            c.pos += 2;
            let modrm = c.byte()?;
            let (md, reg, rm) = (modrm >> 6, ((modrm >> 3) & 7) | ((rex & 4) << 1), modrm & 7);
            if md == 3 {
                return None;
            }
            let op = mem_operand(&mut c, rex, md, rm, segment, addr32)?;
            InsnKind::Invpcid { reg, op }
        }
        // rdpru: KVM never offers it to guests (no CPUID bit), so the CPU's answer is #UD.
        0x0f if c.bytes.get(c.pos..c.pos + 2) == Some(&[0x01, 0xfd]) => {
            c.pos += 2;
            InsnKind::Undefined
        }
        0x0f if c.bytes.get(c.pos..c.pos + 2) == Some(&[0x01, 0xcb]) => {
            c.pos += 2;
            InsnKind::Stac
        }
        0x0f if c.byte()? == 0xae => {
            let modrm = c.byte()?;
            let (md, reg, rm) = (modrm >> 6, (modrm >> 3) & 7, modrm & 7);
            // clflush (/7), clflushopt (66 /7), clwb (66 /6): cache hints, nothing to emulate.
            if md != 3 && (reg == 7 || (reg == 6 && opsize)) {
                mem_operand(&mut c, rex, md, rm, segment, addr32)?;
                return Some(Insn {
                    kind: InsnKind::Nop,
                    len: c.pos,
                });
            }
            if md == 3 || !(reg == 2 || reg == 3) {
                return None;
            }
            let operand = mem_operand(&mut c, rex, md, rm, segment, addr32)?;
            if reg == 2 {
                InsnKind::Ldmxcsr(operand)
            } else {
                InsnKind::Stmxcsr(operand)
            }
        }
        _ => return None,
    };
    Some(Insn { kind, len: c.pos })
}

fn mem_operand(
    c: &mut Cursor,
    rex: u8,
    md: u8,
    rm: u8,
    segment: Option<Segment>,
    addr32: bool,
) -> Option<MemOperand> {
    let rex_b = (rex & 1) << 3;
    let rex_x = (rex & 2) << 2;
    let mut op = MemOperand {
        base: None,
        index: None,
        disp: 0,
        rip_relative: false,
        segment,
        addr32,
    };
    if rm == 4 {
        let sib = c.byte()?;
        let (scale, index, base) = (sib >> 6, ((sib >> 3) & 7) | rex_x, sib & 7);
        if index != 4 {
            op.index = Some((index, scale));
        }
        if base == 5 && md == 0 {
            op.disp = c.disp(4)?;
        } else {
            op.base = Some(base | rex_b);
        }
    } else if rm == 5 && md == 0 {
        op.rip_relative = true;
        op.disp = c.disp(4)?;
    } else {
        op.base = Some(rm | rex_b);
    }
    match md {
        1 => op.disp = c.disp(1)?,
        2 => op.disp = c.disp(4)?,
        _ => {}
    }
    Some(op)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs() -> kvm_regs {
        kvm_regs {
            rax: 0x1000,
            rbx: 0x20,
            rsp: 0x8000,
            r12: 0x3000,
            ..Default::default()
        }
    }

    #[test]
    fn single_byte_instructions() {
        assert_eq!(
            decode(&[0xcc, 0x90]).map(|i| (i.kind, i.len)),
            Some((InsnKind::Int3, 1))
        );
        assert_eq!(decode(&[0x9b]).map(|i| i.len), Some(1));
        assert_eq!(decode(&[]), None);
    }

    #[test]
    fn nops_cld_clac() {
        let kinds = |b: &[u8]| decode(b).map(|i| (i.kind, i.len));
        assert_eq!(kinds(&[0x90, 0x90]), Some((InsnKind::Nop, 1)));
        assert_eq!(kinds(&[0x0f, 0x1f, 0x00]), Some((InsnKind::Nop, 3)));
        assert_eq!(kinds(&[0x0f, 0x1f, 0x44, 0, 0]), Some((InsnKind::Nop, 5)));
        assert_eq!(
            kinds(&[0x66, 0x0f, 0x1f, 0x84, 0, 0, 0, 0, 0]),
            Some((InsnKind::Nop, 9))
        );
        assert_eq!(kinds(&[0xf3, 0x0f, 0x1e, 0xfa]), Some((InsnKind::Nop, 4)));
        assert_eq!(kinds(&[0xfc, 0xe8]), Some((InsnKind::Cld, 1)));
        assert_eq!(kinds(&[0x0f, 0x01, 0xca]), Some((InsnKind::Clac, 3)));
        assert_eq!(kinds(&[0x0f, 0x01, 0xcb]), Some((InsnKind::Stac, 3)));
        assert_eq!(kinds(&[0xcd, 0x20, 0x41]), Some((InsnKind::IntN(0x20), 2)));
        assert_eq!(decode(&[0xcd]), None);
        assert_eq!(
            kinds(&[0x0f, 0x38, 0xf0, 0xc0]),
            Some((InsnKind::Undefined, 4))
        );
        assert_eq!(decode(&[0x0f, 0x38, 0xf0, 0x00]), None); // movbe (%rax): a real one
        assert_eq!(kinds(&[0x0f, 0x01, 0xfd]), Some((InsnKind::Undefined, 3)));
        // invpcid (%rax), %rbx
        let i = decode(&[0x66, 0x0f, 0x38, 0x82, 0x18]).unwrap();
        let InsnKind::Invpcid { reg, op } = i.kind else {
            panic!("{i:?}")
        };
        let s = kvm_sregs::default();
        assert_eq!(
            (i.len, reg, op.effective_address(&regs(), &s, 0)),
            (5, 3, 0x1000)
        );
        assert_eq!(decode(&[0xf2, 0x0f, 0x38, 0xf0, 0xc0]), None); // crc32
        assert_eq!(decode(&[0xe8, 0, 0, 0, 0]), None);
    }

    #[test]
    fn ldmxcsr_and_stmxcsr_operands() {
        let s = kvm_sregs::default();
        // ldmxcsr (%rax)
        let i = decode(&[0x0f, 0xae, 0x10]).unwrap();
        let InsnKind::Ldmxcsr(op) = i.kind else {
            panic!("{i:?}")
        };
        assert_eq!((i.len, op.effective_address(&regs(), &s, 0)), (3, 0x1000));
        // stmxcsr -0x4(%rsp): SIB with base rsp, disp8
        let i = decode(&[0x0f, 0xae, 0x5c, 0x24, 0xfc]).unwrap();
        let InsnKind::Stmxcsr(op) = i.kind else {
            panic!("{i:?}")
        };
        assert_eq!((i.len, op.effective_address(&regs(), &s, 0)), (5, 0x7ffc));
        // ldmxcsr 0x10(%r12,%rbx,2): REX.B, SIB, disp8
        let i = decode(&[0x41, 0x0f, 0xae, 0x54, 0x5c, 0x10]).unwrap();
        let InsnKind::Ldmxcsr(op) = i.kind else {
            panic!("{i:?}")
        };
        assert_eq!(op.effective_address(&regs(), &s, 0), 0x3000 + 0x40 + 0x10);
        // stmxcsr 0x100(%rip)
        let i = decode(&[0x0f, 0xae, 0x1d, 0x00, 0x01, 0x00, 0x00]).unwrap();
        let InsnKind::Stmxcsr(op) = i.kind else {
            panic!("{i:?}")
        };
        assert_eq!(op.effective_address(&regs(), &s, 0x5007), 0x5107);
        // clwb (%rbx), clflushopt 8(%rax), clflush (%rdi): cache hints
        assert_eq!(
            decode(&[0x66, 0x0f, 0xae, 0x33]).map(|i| (i.kind, i.len)),
            Some((InsnKind::Nop, 4))
        );
        assert_eq!(
            decode(&[0x66, 0x0f, 0xae, 0x78, 0x08]).map(|i| i.len),
            Some(5)
        );
        assert_eq!(
            decode(&[0x0f, 0xae, 0x3f]).map(|i| i.kind),
            Some(InsnKind::Nop)
        );
        assert_eq!(decode(&[0x0f, 0xae, 0x30]), None); // xsaveopt-like /6 without 66: not ours
                                                       // fxsave (/0) and register forms are not completed
        assert_eq!(decode(&[0x0f, 0xae, 0x00]), None);
        assert_eq!(decode(&[0x0f, 0xae, 0xd0]), None);
        // truncated
        assert_eq!(decode(&[0x0f, 0xae, 0x5c, 0x24]), None);
    }
}

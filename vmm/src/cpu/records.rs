//! One vCPU's KVM structures to and from the stream's typed records, field by field.

use kvm_bindings::{kvm_debugregs, kvm_fpu, kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events};
use migration::state::{DebugRegs, DescriptorTable, Fpu, Regs, Segment, Sregs, VcpuEvents};

pub fn regs_to(r: &kvm_regs) -> Regs {
    Regs {
        gprs: [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ],
        rip: r.rip,
        rflags: r.rflags,
    }
}

pub fn regs_from(r: &Regs) -> kvm_regs {
    let g = &r.gprs;
    kvm_regs {
        rax: g[0],
        rbx: g[1],
        rcx: g[2],
        rdx: g[3],
        rsi: g[4],
        rdi: g[5],
        rsp: g[6],
        rbp: g[7],
        r8: g[8],
        r9: g[9],
        r10: g[10],
        r11: g[11],
        r12: g[12],
        r13: g[13],
        r14: g[14],
        r15: g[15],
        rip: r.rip,
        rflags: r.rflags,
    }
}

fn seg_to(s: &kvm_segment) -> Segment {
    Segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present,
        dpl: s.dpl,
        db: s.db,
        s: s.s,
        l: s.l,
        g: s.g,
        avl: s.avl,
        unusable: s.unusable,
    }
}

fn seg_from(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present,
        dpl: s.dpl,
        db: s.db,
        s: s.s,
        l: s.l,
        g: s.g,
        avl: s.avl,
        unusable: s.unusable,
        padding: 0,
    }
}

pub fn sregs_to(s: &kvm_sregs) -> Sregs {
    Sregs {
        segments: [s.cs, s.ds, s.es, s.fs, s.gs, s.ss, s.tr, s.ldt].map(|x| seg_to(&x)),
        gdt: DescriptorTable {
            base: s.gdt.base,
            limit: s.gdt.limit,
        },
        idt: DescriptorTable {
            base: s.idt.base,
            limit: s.idt.limit,
        },
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        cr8: s.cr8,
        efer: s.efer,
        apic_base: s.apic_base,
        interrupt_bitmap: s.interrupt_bitmap,
    }
}

pub fn sregs_from(s: &Sregs) -> kvm_sregs {
    let [cs, ds, es, fs, gs, ss, tr, ldt] = s.segments.map(|x| seg_from(&x));
    let mut k = kvm_sregs {
        cs,
        ds,
        es,
        fs,
        gs,
        ss,
        tr,
        ldt,
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        cr8: s.cr8,
        efer: s.efer,
        apic_base: s.apic_base,
        interrupt_bitmap: s.interrupt_bitmap,
        ..Default::default()
    };
    k.gdt.base = s.gdt.base;
    k.gdt.limit = s.gdt.limit;
    k.idt.base = s.idt.base;
    k.idt.limit = s.idt.limit;
    k
}

pub fn fpu_to(f: &kvm_fpu) -> Fpu {
    Fpu {
        fpr: f.fpr.to_vec(),
        fcw: f.fcw,
        fsw: f.fsw,
        ftwx: f.ftwx,
        last_opcode: f.last_opcode,
        last_ip: f.last_ip,
        last_dp: f.last_dp,
        xmm: f.xmm.to_vec(),
        mxcsr: f.mxcsr,
    }
}

pub fn fpu_from(f: &Fpu) -> kvm_fpu {
    let mut k = kvm_fpu {
        fcw: f.fcw,
        fsw: f.fsw,
        ftwx: f.ftwx,
        last_opcode: f.last_opcode,
        last_ip: f.last_ip,
        last_dp: f.last_dp,
        mxcsr: f.mxcsr,
        ..Default::default()
    };
    for (d, s) in k.fpr.iter_mut().zip(&f.fpr) {
        *d = *s;
    }
    for (d, s) in k.xmm.iter_mut().zip(&f.xmm) {
        *d = *s;
    }
    k
}

pub fn events_to(e: &kvm_vcpu_events) -> VcpuEvents {
    VcpuEvents {
        exception_injected: e.exception.injected,
        exception_nr: e.exception.nr,
        exception_has_error_code: e.exception.has_error_code,
        exception_pending: e.exception.pending,
        exception_error_code: e.exception.error_code,
        interrupt_injected: e.interrupt.injected,
        interrupt_nr: e.interrupt.nr,
        interrupt_soft: e.interrupt.soft,
        interrupt_shadow: e.interrupt.shadow,
        nmi_injected: e.nmi.injected,
        nmi_pending: e.nmi.pending,
        nmi_masked: e.nmi.masked,
        sipi_vector: e.sipi_vector,
        flags: e.flags,
        exception_has_payload: e.exception_has_payload,
        exception_payload: e.exception_payload,
    }
}

pub fn events_from(e: &VcpuEvents) -> kvm_vcpu_events {
    let mut k = kvm_vcpu_events::default();
    k.exception.injected = e.exception_injected;
    k.exception.nr = e.exception_nr;
    k.exception.has_error_code = e.exception_has_error_code;
    k.exception.pending = e.exception_pending;
    k.exception.error_code = e.exception_error_code;
    k.interrupt.injected = e.interrupt_injected;
    k.interrupt.nr = e.interrupt_nr;
    k.interrupt.soft = e.interrupt_soft;
    k.interrupt.shadow = e.interrupt_shadow;
    k.nmi.injected = e.nmi_injected;
    k.nmi.pending = e.nmi_pending;
    k.nmi.masked = e.nmi_masked;
    k.sipi_vector = e.sipi_vector;
    k.flags = e.flags;
    k.exception_has_payload = e.exception_has_payload;
    k.exception_payload = e.exception_payload;
    k
}

pub fn debugregs_to(d: &kvm_debugregs) -> DebugRegs {
    DebugRegs {
        db: d.db,
        dr6: d.dr6,
        dr7: d.dr7,
        flags: d.flags,
    }
}

pub fn debugregs_from(d: &DebugRegs) -> kvm_debugregs {
    kvm_debugregs {
        db: d.db,
        dr6: d.dr6,
        dr7: d.dr7,
        flags: d.flags,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_round_trip() {
        let r = kvm_regs {
            rax: 1,
            r15: 15,
            rip: 0x1000,
            rflags: 0x202,
            ..Default::default()
        };
        assert_eq!(regs_from(&regs_to(&r)), r);
        let mut s = kvm_sregs::default();
        s.cs.selector = 0x10;
        s.cs.l = 1;
        s.gdt.base = 0x500;
        s.cr3 = 0x9000;
        s.efer = 0x500;
        assert_eq!(sregs_from(&sregs_to(&s)), s);
        let mut e = kvm_vcpu_events::default();
        e.exception.nr = 14;
        e.nmi.masked = 1;
        e.sipi_vector = 8;
        assert_eq!(events_from(&events_to(&e)), e);
    }
}

//! The VM-wide interrupt controllers' and PIT's KVM structures to and from the stream's typed
//! records, field by field (one vCPU's are in `cpu/records.rs`).

use kvm_bindings::{kvm_ioapic_state, kvm_pic_state, kvm_pit_channel_state, kvm_pit_state2};
use migration::state::{IoapicState, PicState, PitChannel, PitState};

pub fn pic_to(p: &kvm_pic_state) -> PicState {
    PicState {
        last_irr: p.last_irr,
        irr: p.irr,
        imr: p.imr,
        isr: p.isr,
        priority_add: p.priority_add,
        irq_base: p.irq_base,
        read_reg_select: p.read_reg_select,
        poll: p.poll,
        special_mask: p.special_mask,
        init_state: p.init_state,
        auto_eoi: p.auto_eoi,
        rotate_on_auto_eoi: p.rotate_on_auto_eoi,
        special_fully_nested_mode: p.special_fully_nested_mode,
        init4: p.init4,
        elcr: p.elcr,
        elcr_mask: p.elcr_mask,
    }
}

pub fn pic_from(p: &PicState) -> kvm_pic_state {
    kvm_pic_state {
        last_irr: p.last_irr,
        irr: p.irr,
        imr: p.imr,
        isr: p.isr,
        priority_add: p.priority_add,
        irq_base: p.irq_base,
        read_reg_select: p.read_reg_select,
        poll: p.poll,
        special_mask: p.special_mask,
        init_state: p.init_state,
        auto_eoi: p.auto_eoi,
        rotate_on_auto_eoi: p.rotate_on_auto_eoi,
        special_fully_nested_mode: p.special_fully_nested_mode,
        init4: p.init4,
        elcr: p.elcr,
        elcr_mask: p.elcr_mask,
    }
}

pub fn ioapic_to(s: &kvm_ioapic_state) -> IoapicState {
    IoapicState {
        base_address: s.base_address,
        ioregsel: s.ioregsel,
        id: s.id,
        irr: s.irr,
        // SAFETY: each redirection entry is a u64 viewed through a bindgen union of plain data.
        redirection: s.redirtbl.iter().map(|e| unsafe { e.bits }).collect(),
    }
}

pub fn ioapic_from(s: &IoapicState) -> kvm_ioapic_state {
    let mut k = kvm_ioapic_state {
        base_address: s.base_address,
        ioregsel: s.ioregsel,
        id: s.id,
        irr: s.irr,
        ..Default::default()
    };
    for (d, bits) in k.redirtbl.iter_mut().zip(&s.redirection) {
        d.bits = *bits;
    }
    k
}

pub fn pit_to(p: &kvm_pit_state2) -> PitState {
    PitState {
        channels: p
            .channels
            .iter()
            .map(|c| PitChannel {
                count: c.count,
                latched_count: c.latched_count,
                count_latched: c.count_latched,
                status_latched: c.status_latched,
                status: c.status,
                read_state: c.read_state,
                write_state: c.write_state,
                write_latch: c.write_latch,
                rw_mode: c.rw_mode,
                mode: c.mode,
                bcd: c.bcd,
                gate: c.gate,
                count_load_time: c.count_load_time,
            })
            .collect(),
        flags: p.flags,
    }
}

pub fn pit_from(p: &PitState) -> kvm_pit_state2 {
    let mut k = kvm_pit_state2 {
        flags: p.flags,
        ..Default::default()
    };
    for (d, c) in k.channels.iter_mut().zip(&p.channels) {
        *d = kvm_pit_channel_state {
            count: c.count,
            latched_count: c.latched_count,
            count_latched: c.count_latched,
            status_latched: c.status_latched,
            status: c.status,
            read_state: c.read_state,
            write_state: c.write_state,
            write_latch: c.write_latch,
            rw_mode: c.rw_mode,
            mode: c.mode,
            bcd: c.bcd,
            gate: c.gate,
            count_load_time: c.count_load_time,
        };
    }
    k
}

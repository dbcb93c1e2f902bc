//! Capturing and restoring one vCPU's complete state (for migration and snapshots).

use kvm_bindings::{kvm_mp_state, kvm_msr_entry, kvm_xcrs, kvm_xsave, Msrs};
use kvm_ioctls::VcpuFd;
use migration::state::VcpuState;

use super::records::*;

pub const MSR_KVM_ASYNC_PF_EN: u32 = 0x4b56_4d02;
pub const MSR_KVM_ASYNC_PF_INT: u32 = 0x4b56_4d06;

#[derive(Debug, thiserror::Error)]
#[error("vcpu {id}: {what}: {source}")]
pub struct StateError {
    pub id: u8,
    pub what: &'static str,
    pub source: kvm_ioctls::Error,
}

/// What every vCPU saves the same way: the MSRs KVM can read back, and whether XSAVE state fits
/// the 4 KiB `kvm_xsave` buffer.
#[derive(Debug, Clone)]
pub struct StatePolicy {
    pub msrs: Vec<u32>,
    pub use_xsave: bool,
}

/// Order for restoring MSRs: the async PF vector (INT) must be set before async PF is enabled (EN),
/// as KVM refuses EN with delivery-as-interrupt and no vector.
pub fn restore_order(mut msrs: Vec<(u32, u64)>) -> Vec<(u32, u64)> {
    msrs.sort_by_key(|(i, _)| match *i {
        MSR_KVM_ASYNC_PF_INT => 0,
        MSR_KVM_ASYNC_PF_EN => 2,
        _ => 1,
    });
    msrs
}

/// Keeps the MSRs of `candidates` that KVM lets this vCPU read.
pub fn readable_msrs(fd: &VcpuFd, candidates: &[u32]) -> Vec<u32> {
    let mut list: Vec<u32> = candidates.to_vec();
    // KVM_GET_MSRS stops at the first MSR it cannot read and returns how many it read.
    for _ in 0..candidates.len() {
        let entries: Vec<kvm_msr_entry> = list
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let Ok(mut msrs) = Msrs::from_entries(&entries) else {
            return Vec::new();
        };
        match fd.get_msrs(&mut msrs) {
            Ok(n) if n == list.len() => return list,
            Ok(n) => {
                list.remove(n);
            }
            Err(_) => return Vec::new(),
        }
    }
    list
}

pub fn save(fd: &VcpuFd, id: u8, policy: &StatePolicy) -> Result<VcpuState, StateError> {
    let err = |what| move |source| StateError { id, what, source };
    let entries: Vec<kvm_msr_entry> = policy
        .msrs
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|_| StateError {
        id,
        what: "building the MSR list",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    let n = fd.get_msrs(&mut msrs).map_err(err("KVM_GET_MSRS"))?;
    let xsave = if policy.use_xsave {
        Some(
            fd.get_xsave()
                .map_err(err("KVM_GET_XSAVE"))?
                .region
                .to_vec(),
        )
    } else {
        None
    };
    let xcrs = fd.get_xcrs().map_err(err("KVM_GET_XCRS"))?;
    let lapic = fd.get_lapic().map_err(err("KVM_GET_LAPIC"))?;
    Ok(VcpuState {
        id,
        regs: regs_to(&fd.get_regs().map_err(err("KVM_GET_REGS"))?),
        sregs: sregs_to(&fd.get_sregs().map_err(err("KVM_GET_SREGS"))?),
        fpu: fpu_to(&fd.get_fpu().map_err(err("KVM_GET_FPU"))?),
        xsave,
        xcrs: xcrs.xcrs[..(xcrs.nr_xcrs as usize).min(xcrs.xcrs.len())]
            .iter()
            .map(|x| (x.xcr, x.value))
            .collect(),
        lapic: lapic.regs.iter().map(|b| *b as u8).collect(),
        msrs: restore_order(
            msrs.as_slice()[..n]
                .iter()
                .map(|e| (e.index, e.data))
                .collect(),
        ),
        events: events_to(&fd.get_vcpu_events().map_err(err("KVM_GET_VCPU_EVENTS"))?),
        debug_regs: debugregs_to(&fd.get_debug_regs().map_err(err("KVM_GET_DEBUGREGS"))?),
        mp_state: fd.get_mp_state().map_err(err("KVM_GET_MP_STATE"))?.mp_state,
    })
}

pub fn restore(fd: &VcpuFd, s: &VcpuState, policy: &StatePolicy) -> Result<(), StateError> {
    let id = s.id;
    let err = |what| move |source| StateError { id, what, source };
    fd.set_sregs(&sregs_from(&s.sregs))
        .map_err(err("KVM_SET_SREGS"))?;
    fd.set_regs(&regs_from(&s.regs))
        .map_err(err("KVM_SET_REGS"))?;
    match (&s.xsave, policy.use_xsave) {
        (Some(region), true) => {
            let mut x = kvm_xsave::default();
            for (d, v) in x.region.iter_mut().zip(region) {
                *d = *v;
            }
            // SAFETY: this host's XSAVE state fits kvm_xsave (policy.use_xsave checked
            // KVM_CAP_XSAVE2), so KVM reads nothing past the struct.
            unsafe { fd.set_xsave(&x) }.map_err(err("KVM_SET_XSAVE"))?;
        }
        _ => fd.set_fpu(&fpu_from(&s.fpu)).map_err(err("KVM_SET_FPU"))?,
    }
    if !s.xcrs.is_empty() {
        let mut x = kvm_xcrs::default();
        for (slot, (xcr, value)) in x.xcrs.iter_mut().zip(&s.xcrs) {
            slot.xcr = *xcr;
            slot.value = *value;
        }
        x.nr_xcrs = s.xcrs.len().min(x.xcrs.len()) as u32;
        fd.set_xcrs(&x).map_err(err("KVM_SET_XCRS"))?;
    }
    let mut lapic = fd.get_lapic().map_err(err("KVM_GET_LAPIC"))?;
    for (d, v) in lapic.regs.iter_mut().zip(&s.lapic) {
        *d = *v as _;
    }
    fd.set_lapic(&lapic).map_err(err("KVM_SET_LAPIC"))?;
    let entries: Vec<kvm_msr_entry> = restore_order(s.msrs.clone())
        .into_iter()
        .map(|(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| StateError {
        id,
        what: "building the MSR list",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    let n = fd.set_msrs(&msrs).map_err(err("KVM_SET_MSRS"))?;
    if n != entries.len() {
        return Err(StateError {
            id,
            what: "KVM_SET_MSRS (an MSR was refused)",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        });
    }
    fd.set_vcpu_events(&events_from(&s.events))
        .map_err(err("KVM_SET_VCPU_EVENTS"))?;
    fd.set_debug_regs(&debugregs_from(&s.debug_regs))
        .map_err(err("KVM_SET_DEBUGREGS"))?;
    fd.set_mp_state(kvm_mp_state {
        mp_state: s.mp_state,
    })
    .map_err(err("KVM_SET_MP_STATE"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn async_pf_int_is_restored_before_en() {
        let order = restore_order(vec![
            (0x10, 1),
            (MSR_KVM_ASYNC_PF_EN, 2),
            (MSR_KVM_ASYNC_PF_INT, 3),
        ]);
        let pos = |i| order.iter().position(|(x, _)| *x == i).unwrap();
        assert!(pos(MSR_KVM_ASYNC_PF_INT) < pos(MSR_KVM_ASYNC_PF_EN));
    }
}

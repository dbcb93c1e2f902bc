//! tern-owned paravirtual async page faults (`--async-pf tern`). Guest accesses to the async-PF
//! MSRs exit to tern (KVM_X86_SET_MSR_FILTER), which validates them as KVM would and keeps per-vCPU
//! state. The injection path: a vCPU that faults on a missing lazy page is kicked out of KVM_RUN;
//! if it is at CPL3 with IF=1 it gets PAGE_NOT_PRESENT (#PF, CR2 = token) and runs on; once the
//! page is in place it gets PAGE_READY (token in the shared area, the guest's vector through the
//! in-kernel LAPIC), one outstanding at a time until the guest ACKs.

pub mod msr;

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::kvm_msi;
use kvm_ioctls::{Cap, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VcpuFd, VmFd};
use serde::Serialize;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::lazy::FaultObserver;
use crate::memory::GuestMemory;
use msr::*;

/// A migrated async-PF MSR value this side refuses (the guest would have got #GP for it).
#[derive(Debug, thiserror::Error)]
#[error("vcpu {id}: async-PF MSR {index:#x} = {value:#x} refused: {why:?}")]
pub struct MsrRestoreError {
    pub id: u8,
    pub index: u32,
    pub value: u64,
    pub why: Refused,
}

pub const KVM_PV_REASON_PAGE_NOT_PRESENT: u32 = 1;
/// A PAGE_READY with this token wakes every waiter.
pub const WAKE_ALL: u32 = !0;
const PF_VECTOR: u8 = 14;
const RFLAGS_IF: u64 = 1 << 9;
const APIC_MSI_BASE: u32 = 0xfee0_0000;
/// KVM_MSR_EXIT_REASON_FILTER: exit to userspace on MSR accesses the filter denies.
const MSR_EXIT_REASON_FILTER: u64 = 1 << 2;

/// Who owns the async-PF protocol (`--async-pf`, parsed by clap).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum AsyncPfMode {
    /// KVM owns the protocol.
    #[default]
    Kvm,
    /// tern owns the MSRs and the PAGE_NOT_PRESENT / PAGE_READY injection.
    Tern,
    /// Not offered to the guest.
    Off,
}

#[derive(Debug, Default, Serialize)]
pub struct ApfStats {
    pub not_present: AtomicU64,
    pub ready: AtomicU64,
    pub acks: AtomicU64,
    /// Faults where the vCPU could not take an async PF (CPL0, IF=0, not enabled) and waited.
    pub blocked: AtomicU64,
}

#[derive(Default)]
struct VcpuApf {
    en: u64,
    vector: u64,
    tid: u32,
    thread: Option<libc::pthread_t>,
    next_token: u32,
    /// Faults the vCPU thread has not decided on yet: (token, gpa).
    mailbox: VecDeque<(u32, u64)>,
    /// PAGE_NOT_PRESENT injected, waiting for the page: (token, gpa).
    injected: Vec<(u32, u64)>,
    ready_queue: VecDeque<u32>,
    outstanding: bool,
}

impl VcpuApf {
    fn enabled(&self) -> bool {
        self.en & (EN_ENABLED | EN_DELIVERY_AS_INT) == EN_ENABLED | EN_DELIVERY_AS_INT
    }
    fn area(&self) -> u64 {
        self.en & AREA_MASK
    }
}

pub struct ApfController {
    vcpus: Vec<Mutex<VcpuApf>>,
    mem: GuestMemory,
    vm_fd: Arc<VmFd>,
    present: Mutex<HashSet<u64>>,
    pub stats: ApfStats,
}

/// KVM_X86_DISABLE_EXITS_HLT.
const DISABLE_EXITS_HLT: u64 = 1 << 1;

/// Prepares the VM for tern-owned async PF (before any vCPU exists): guest accesses to the
/// async-PF MSRs exit to tern, and KVM's own fallback for guests without PV async PF is turned
/// off. That fallback ("artificial halt": the vCPU halts in KVM while a kernel worker takes the
/// fault) would hide the fault from tern, which needs it on the vCPU's own thread; KVM skips it
/// when HLT does not exit.
pub fn install_msr_filter(vm_fd: &VmFd) -> Result<(), kvm_ioctls::Error> {
    let hlt = kvm_bindings::kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_X86_DISABLE_EXITS,
        args: [DISABLE_EXITS_HLT, 0, 0, 0],
        ..Default::default()
    };
    vm_fd.enable_cap(&hlt)?;
    let cap = kvm_bindings::kvm_enable_cap {
        cap: Cap::X86UserSpaceMsr as u32,
        args: [MSR_EXIT_REASON_FILTER, 0, 0, 0],
        ..Default::default()
    };
    vm_fd.enable_cap(&cap)?;
    // MSRs 0x4b564d02..=0x4b564d07: bit set = allowed to KVM; EN, INT and ACK are denied.
    let bitmap = [0b0000_1110u8];
    let range = MsrFilterRange {
        flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
        base: MSR_KVM_ASYNC_PF_EN,
        msr_count: 6,
        bitmap: &bitmap,
    };
    vm_fd.set_msr_filter(MsrFilterDefaultAction::ALLOW, &[range])
}

impl ApfController {
    pub fn new(vcpus: u8, mem: GuestMemory, vm_fd: Arc<VmFd>) -> Self {
        ApfController {
            vcpus: (0..vcpus).map(|_| Mutex::new(VcpuApf::default())).collect(),
            mem,
            vm_fd,
            present: Mutex::new(HashSet::new()),
            stats: ApfStats::default(),
        }
    }

    fn vcpu(&self, id: u8) -> Option<std::sync::MutexGuard<'_, VcpuApf>> {
        self.vcpus.get(id as usize).map(|m| devices::bus::lock(m))
    }

    /// Called by each vCPU thread as it starts, so faults can be traced back to it.
    pub fn register_thread(&self, id: u8) {
        if let Some(mut v) = self.vcpu(id) {
            // SAFETY: gettid and pthread_self have no preconditions.
            v.tid = unsafe { libc::gettid() } as u32;
            // SAFETY: as above.
            v.thread = Some(unsafe { libc::pthread_self() });
        }
    }

    pub fn rdmsr(&self, id: u8, index: u32) -> Option<u64> {
        let v = self.vcpu(id)?;
        match index {
            MSR_KVM_ASYNC_PF_EN => Some(v.en),
            MSR_KVM_ASYNC_PF_INT => Some(v.vector),
            MSR_KVM_ASYNC_PF_ACK => Some(0),
            _ => None,
        }
    }

    /// The guest-visible async-PF MSRs of vCPU `id` (INT, EN), for a migration: in tern mode
    /// KVM never sees them, so the vCPU state saved from KVM has them disabled.
    pub fn saved_msrs(&self, id: u8) -> Option<[(u32, u64); 2]> {
        let v = self.vcpu(id)?;
        Some([
            (MSR_KVM_ASYNC_PF_INT, v.vector),
            (MSR_KVM_ASYNC_PF_EN, v.en),
        ])
    }

    /// Takes over the async-PF MSRs of a migrated vCPU (INT before EN, as the guest would write
    /// them). Enabling wakes every waiter, as KVM does on restore: tasks parked at the source
    /// touch their page again and fault here if it is still missing. Like KVM, the wake-all is
    /// only queued here and delivered from the vCPU's own thread once it runs (its shared area
    /// may still be a missing postcopy page, which only a running listener can bring).
    pub fn restore_msrs(&self, id: u8, msrs: &[(u32, u64)]) -> Result<(), MsrRestoreError> {
        for index in [MSR_KVM_ASYNC_PF_INT, MSR_KVM_ASYNC_PF_EN] {
            if let Some(&(_, value)) = msrs.iter().find(|(i, _)| *i == index) {
                self.write(id, index, value, false)
                    .map_err(|why| MsrRestoreError {
                        id,
                        index,
                        value,
                        why,
                    })?;
            }
        }
        Ok(())
    }

    /// Handles a guest MSR write (on the vCPU's thread); Err means the guest gets #GP.
    pub fn wrmsr(&self, id: u8, index: u32, data: u64) -> Result<(), Refused> {
        self.write(id, index, data, true)
    }

    /// An MSR write; `deliver`: send a PAGE_READY it queues now, not at the next service.
    fn write(&self, id: u8, index: u32, data: u64, deliver: bool) -> Result<(), Refused> {
        self.update(id, index, data)?;
        if deliver {
            self.flush_ready(id);
        }
        Ok(())
    }

    /// The state change of an MSR write (under the vCPU's lock; no guest memory access here).
    fn update(&self, id: u8, index: u32, data: u64) -> Result<(), Refused> {
        let Some(mut v) = self.vcpu(id) else {
            return Err(Refused::Reserved);
        };
        match index {
            MSR_KVM_ASYNC_PF_INT => {
                check_vector(data)?;
                v.vector = data;
            }
            MSR_KVM_ASYNC_PF_EN => {
                let in_ram = |gpa: u64| {
                    self.mem.address_in_range(GuestAddress(gpa))
                        && self.mem.address_in_range(GuestAddress(gpa + 63))
                };
                check_enable(data, v.vector, in_ram)?;
                v.en = data;
                v.mailbox.clear();
                v.injected.clear();
                v.ready_queue.clear();
                v.outstanding = false;
                if v.enabled() {
                    // As KVM does on (re-)enable: wake every waiter the guest may still have.
                    v.ready_queue.push_back(WAKE_ALL);
                }
            }
            MSR_KVM_ASYNC_PF_ACK => {
                if data & 1 != 0 {
                    self.stats.acks.fetch_add(1, Ordering::Relaxed);
                    v.outstanding = false;
                }
            }
            _ => return Err(Refused::Reserved),
        }
        Ok(())
    }

    /// Sends the next queued PAGE_READY if none is outstanding. Guest memory is written without
    /// the vCPU's lock held: the shared area may be a missing page (lazy or postcopy), and the
    /// thread that brings it reports the fault to this controller first.
    fn flush_ready(&self, id: u8) {
        let (token, area, vector) = {
            let Some(mut v) = self.vcpu(id) else { return };
            if v.outstanding || !v.enabled() {
                return;
            }
            let Some(token) = v.ready_queue.pop_front() else {
                return;
            };
            v.outstanding = true;
            (token, v.area(), v.vector)
        };
        let msi = kvm_msi {
            address_lo: APIC_MSI_BASE | (u32::from(id) << 12),
            data: vector as u32,
            ..Default::default()
        };
        let sent = self
            .mem
            .write_obj(token, GuestAddress(area + 4))
            .map_err(|e| format!("async PF area write failed: {e}"))
            .and_then(|_| {
                self.vm_fd
                    .signal_msi(msi)
                    .map_err(|e| format!("PAGE_READY interrupt failed: {e}"))
            });
        match sent {
            Ok(_) => {
                self.stats.ready.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                log::warn!("vcpu {id}: {e}");
                if let Some(mut v) = self.vcpu(id) {
                    v.outstanding = false;
                }
            }
        }
    }

    fn is_present(&self, gpa: u64) -> bool {
        devices::bus::lock(&self.present).contains(&gpa)
    }

    /// Runs on the vCPU's own thread after it was kicked out of KVM_RUN: turns waiting faults into
    /// PAGE_NOT_PRESENT where the guest can take one; otherwise the vCPU simply waits.
    pub fn service(&self, id: u8, fd: &VcpuFd) {
        loop {
            let (token, gpa, area, enabled) = {
                let Some(mut v) = self.vcpu(id) else { return };
                let Some((token, gpa)) = v.mailbox.pop_front() else {
                    break;
                };
                (token, gpa, v.area(), v.enabled())
            };
            if self.is_present(gpa) {
                continue;
            }
            log::debug!("apf: vcpu {id} deciding on token {token:#x} for {gpa:#x}");
            // Unlocked: the injection writes the guest's shared area (see flush_ready).
            if !enabled || !self.page_not_present(fd, area, token) {
                self.stats.blocked.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            self.stats.not_present.fetch_add(1, Ordering::Relaxed);
            let Some(mut v) = self.vcpu(id) else { return };
            if self.is_present(gpa) {
                // It landed while we injected: `placed` has been and gone.
                v.ready_queue.push_back(token);
            } else {
                v.injected.push((token, gpa));
            }
        }
        // Also a PAGE_READY queued while this thread was away (e.g. the wake-all of a restore).
        self.flush_ready(id);
    }

    /// Injects PAGE_NOT_PRESENT if the vCPU is at CPL3 with IF=1 and no event is in flight.
    fn page_not_present(&self, fd: &VcpuFd, area: u64, token: u32) -> bool {
        let (Ok(regs), Ok(mut sregs), Ok(mut events)) =
            (fd.get_regs(), fd.get_sregs(), fd.get_vcpu_events())
        else {
            return false;
        };
        let busy = events.exception.injected != 0
            || events.exception.pending != 0
            || events.interrupt.injected != 0
            || events.nmi.injected != 0;
        if sregs.cs.selector & 3 != 3 || regs.rflags & RFLAGS_IF == 0 || busy {
            return false;
        }
        if self
            .mem
            .write_obj(KVM_PV_REASON_PAGE_NOT_PRESENT, GuestAddress(area))
            .is_err()
        {
            return false;
        }
        sregs.cr2 = u64::from(token);
        events.exception.injected = 1;
        events.exception.nr = PF_VECTOR;
        events.exception.has_error_code = 1;
        events.exception.error_code = 0;
        fd.set_sregs(&sregs).is_ok() && fd.set_vcpu_events(&events).is_ok()
    }
}

impl FaultObserver for ApfController {
    fn fault(&self, tid: u32, gpa: u64) {
        for (id, m) in self.vcpus.iter().enumerate() {
            let mut v = devices::bus::lock(m);
            if v.tid != tid || !v.enabled() {
                log::debug!(
                    "apf: fault {gpa:#x} by tid {tid}: vcpu {id} (tid {}, enabled {})",
                    v.tid,
                    v.enabled()
                );
                continue;
            }
            v.next_token = v.next_token.wrapping_add(1);
            // Like KVM: a per-vCPU counter with the vCPU id in the low bits.
            let token = (v.next_token << 12) | id as u32;
            v.mailbox.push_back((token, gpa));
            if let Some(t) = v.thread {
                // SAFETY: `t` is the live vCPU thread (it registered itself and runs until the VM
                // ends); the signal's handler does nothing.
                unsafe { libc::pthread_kill(t, vmm_sys_util::signal::SIGRTMIN()) };
            }
        }
    }

    fn async_faults(&self) -> u64 {
        self.stats.not_present.load(Ordering::Relaxed)
    }

    fn placed(&self, gpa: u64) {
        devices::bus::lock(&self.present).insert(gpa);
        for (id, m) in self.vcpus.iter().enumerate() {
            let woken = {
                let mut v = devices::bus::lock(m);
                let tokens: Vec<u32> = v
                    .injected
                    .iter()
                    .filter(|(_, g)| *g == gpa)
                    .map(|(t, _)| *t)
                    .collect();
                v.injected.retain(|(_, g)| *g != gpa);
                v.ready_queue.extend(&tokens);
                !tokens.is_empty()
            };
            if woken {
                self.flush_ready(id as u8);
            }
        }
    }
}

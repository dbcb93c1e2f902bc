//! CPUID policy: what KVM supports, with tern's topology, hypervisor leaves and masks on top.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

/// KVM paravirtual feature bits (CPUID 0x40000001 EAX) that tern offers to guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PvFeatures(pub u32);

impl PvFeatures {
    pub const CLOCKSOURCE: u32 = 1 << 0;
    pub const NOP_IO_DELAY: u32 = 1 << 1;
    pub const CLOCKSOURCE2: u32 = 1 << 3;
    pub const ASYNC_PF: u32 = 1 << 4;
    pub const STEAL_TIME: u32 = 1 << 5;
    pub const PV_EOI: u32 = 1 << 6;
    pub const PV_UNHALT: u32 = 1 << 7;
    pub const ASYNC_PF_VMEXIT: u32 = 1 << 10;
    pub const PV_SEND_IPI: u32 = 1 << 11;
    pub const POLL_CONTROL: u32 = 1 << 12;
    pub const PV_SCHED_YIELD: u32 = 1 << 13;
    pub const ASYNC_PF_INT: u32 = 1 << 14;
    pub const MSI_EXT_DEST_ID: u32 = 1 << 15;
    pub const CLOCKSOURCE_STABLE: u32 = 1 << 24;
    /// Everything the async page fault protocol needs.
    pub const ASYNC_PF_ALL: u32 = Self::ASYNC_PF | Self::ASYNC_PF_VMEXIT | Self::ASYNC_PF_INT;

    /// Features the guest uses through a hypercall (`vmcall`/`vmmcall` at CPL0): PV IPIs, PV
    /// yield and PV unhalt (spinlock kick). On this machine's host the emulator "fixes" the
    /// hypercall instruction and re-executes it forever (measured: an AP sending its first PV
    /// IPI spins on `vmcall` in `__send_ipi_mask`, and the SMP boot stalls), so they are not
    /// offered there.
    pub const HYPERCALL_BASED: u32 = Self::PV_SEND_IPI | Self::PV_SCHED_YIELD | Self::PV_UNHALT;

    /// tern's default set; the final set is this intersected with what KVM supports.
    pub fn default_set() -> Self {
        PvFeatures(
            Self::CLOCKSOURCE
                | Self::NOP_IO_DELAY
                | Self::CLOCKSOURCE2
                | Self::ASYNC_PF_ALL
                | Self::STEAL_TIME
                | Self::PV_EOI
                | Self::PV_UNHALT
                | Self::PV_SEND_IPI
                | Self::POLL_CONTROL
                | Self::PV_SCHED_YIELD
                | Self::MSI_EXT_DEST_ID
                | Self::CLOCKSOURCE_STABLE,
        )
    }
}

const LEAF_FEATURES: u32 = 1;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_HYPERVISOR: u32 = 0x4000_0000;
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;
const LEAF_TIMING: u32 = 0x4000_0010;
const ECX_CX16: u32 = 1 << 13;
const ECX_XSAVE: u32 = 1 << 26;
const ECX_OSXSAVE: u32 = 1 << 27;
const ECX_HYPERVISOR: u32 = 1 << 31;
/// The LAPIC timer runs at KVM's 1 GHz bus clock.
const APIC_BUS_KHZ: u32 = 1_000_000;

/// The CPUID template shared by all vCPUs; per-vCPU fields are patched by [`for_vcpu`].
pub fn template(kvm: &Kvm, pv: PvFeatures) -> Result<(CpuId, PvFeatures), kvm_ioctls::Error> {
    let mut cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    let mut offered = PvFeatures(0);
    let mut has_timing = false;
    for e in cpuid.as_mut_slice() {
        match e.function {
            LEAF_FEATURES => {
                // cmpxchg16b and xsave fail in this machine's instruction emulator (docs/machine-kvm.md);
                // advertising them would invite guests to use them.
                e.ecx &= !(ECX_CX16 | ECX_XSAVE | ECX_OSXSAVE);
                e.ecx |= ECX_HYPERVISOR;
            }
            LEAF_HYPERVISOR => {
                e.eax = LEAF_TIMING;
                e.ebx = u32::from_le_bytes(*b"KVMK");
                e.ecx = u32::from_le_bytes(*b"VMKV");
                e.edx = u32::from_le_bytes(*b"M\0\0\0");
            }
            LEAF_KVM_FEATURES => {
                let mut wanted = pv.0;
                if crate::compat::host_emulates_kernel_mode() {
                    wanted &= !PvFeatures::HYPERCALL_BASED;
                }
                offered = PvFeatures(e.eax & wanted);
                e.eax = offered.0;
            }
            LEAF_TIMING => has_timing = true,
            _ => {}
        }
    }
    if !has_timing {
        cpuid
            .push(kvm_cpuid_entry2 {
                function: LEAF_TIMING,
                ..Default::default()
            })
            .map_err(|_| kvm_ioctls::Error::new(libc::E2BIG))?;
    }
    Ok((cpuid, offered))
}

/// Patches the template for one vCPU: its APIC ID, the CPU count and the TSC frequency.
pub fn for_vcpu(template: &CpuId, id: u8, vcpus: u8, tsc_khz: u32) -> CpuId {
    let mut cpuid = template.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(vcpus) << 16) | (u32::from(id) << 24);
            }
            LEAF_EXT_TOPOLOGY => e.edx = u32::from(id),
            LEAF_TIMING => {
                e.eax = tsc_khz;
                e.ebx = APIC_BUS_KHZ;
            }
            _ => {}
        }
    }
    cpuid
}

//! Typed, versioned records for everything that crosses in a migration stream besides RAM.
//! They are plain serde data: the VMM converts its KVM structures to and from them field by field.

use serde::{Deserialize, Serialize};

/// What the destination needs to build the same VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfigRecord {
    /// Guest RAM regions: (guest physical address, length).
    pub ram: Vec<(u64, u64)>,
    pub memory_size: u64,
    pub mergeable: bool,
    pub vcpus: u8,
    /// KVM paravirtual features (CPUID 0x40000001 EAX) the guest was offered.
    pub pv_features: u32,
    /// The CPUID template the guest sees (before per-vCPU topology patching).
    pub cpuid: Vec<CpuidEntry>,
    /// A virtio-balloon device, if the VM has one (its state travels with the devices).
    #[serde(default)]
    pub balloon: Option<BalloonConfigRecord>,
    /// Guest RAM is a shared memfd per region (`--memory shared=on`); the destination keeps it so.
    #[serde(default)]
    pub shared: bool,
    /// Guest RAM is advised MADV_HUGEPAGE (`--memory thp=on`); the destination advises it too.
    #[serde(default)]
    pub thp: bool,
    /// A second 16550 (COM2, `--serial2`); its registers travel with the devices, and the
    /// destination must give it a backend of its own.
    #[serde(default)]
    pub serial2: bool,
    /// QEMU's pc-testdev (`--testdev on`, for kvm-unit-tests); the destination wires it too.
    #[serde(default)]
    pub testdev: bool,
}

/// The first section of a local migration: guest RAM is the descriptors sent with the header,
/// one per region, in this order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalRamRecord {
    /// (guest physical address, length) of each region, as in the configuration's `ram`.
    pub regions: Vec<(u64, u64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonConfigRecord {
    pub deflate_on_oom: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Regs {
    /// rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8..r15 in that order.
    pub gprs: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    pub type_: u8,
    pub present: u8,
    pub dpl: u8,
    pub db: u8,
    pub s: u8,
    pub l: u8,
    pub g: u8,
    pub avl: u8,
    pub unusable: u8,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sregs {
    /// cs, ds, es, fs, gs, ss, tr, ldt in that order.
    pub segments: [Segment; 8],
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
    pub interrupt_bitmap: [u64; 4],
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fpu {
    pub fpr: Vec<[u8; 16]>,
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: Vec<[u8; 16]>,
    pub mxcsr: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuEvents {
    pub exception_injected: u8,
    pub exception_nr: u8,
    pub exception_has_error_code: u8,
    pub exception_pending: u8,
    pub exception_error_code: u32,
    pub interrupt_injected: u8,
    pub interrupt_nr: u8,
    pub interrupt_soft: u8,
    pub interrupt_shadow: u8,
    pub nmi_injected: u8,
    pub nmi_pending: u8,
    pub nmi_masked: u8,
    pub sipi_vector: u32,
    pub flags: u32,
    pub exception_has_payload: u8,
    pub exception_payload: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebugRegs {
    pub db: [u64; 4],
    pub dr6: u64,
    pub dr7: u64,
    pub flags: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub regs: Regs,
    pub sregs: Sregs,
    pub fpu: Fpu,
    /// The XSAVE area (architectural layout), when KVM provides it.
    pub xsave: Option<Vec<u32>>,
    /// (XCR index, value).
    pub xcrs: Vec<(u32, u64)>,
    /// The local APIC's 1 KiB register page.
    pub lapic: Vec<u8>,
    /// (MSR index, value), in the order they must be restored (async PF INT before EN).
    pub msrs: Vec<(u32, u64)>,
    pub events: VcpuEvents,
    pub debug_regs: DebugRegs,
    pub mp_state: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PicState {
    pub last_irr: u8,
    pub irr: u8,
    pub imr: u8,
    pub isr: u8,
    pub priority_add: u8,
    pub irq_base: u8,
    pub read_reg_select: u8,
    pub poll: u8,
    pub special_mask: u8,
    pub init_state: u8,
    pub auto_eoi: u8,
    pub rotate_on_auto_eoi: u8,
    pub special_fully_nested_mode: u8,
    pub init4: u8,
    pub elcr: u8,
    pub elcr_mask: u8,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoapicState {
    pub base_address: u64,
    pub ioregsel: u32,
    pub id: u32,
    pub irr: u32,
    pub redirection: Vec<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PitChannel {
    pub count: u32,
    pub latched_count: u16,
    pub count_latched: u8,
    pub status_latched: u8,
    pub status: u8,
    pub read_state: u8,
    pub write_state: u8,
    pub write_latch: u8,
    pub rw_mode: u8,
    pub mode: u8,
    pub bcd: u8,
    pub gate: u8,
    pub count_load_time: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PitState {
    pub channels: Vec<PitChannel>,
    pub flags: u32,
}

/// The guest clock (kvmclock): restored so the guest sees no jump.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClockState {
    pub clock_ns: u64,
    pub flags: u32,
}

/// One device's migration state: its name in the VM (`com1`, `virtio-balloon`) and its record,
/// in the format the device model owns (the migration never looks inside).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    pub name: String,
    pub state: serde_json::Value,
}

/// The state of every device that has one, as a uniform list of named records.
///
/// On the wire the list keeps stream version 1's layout, so streams and snapshots from either
/// side of this change read alike: records of the 16550 ports (named `com1`..`com4`) go in
/// `serial`, every other device's in `other`, each as a `[name, record]` pair.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "DeviceStatesWire", into = "DeviceStatesWire")]
pub struct DeviceStates {
    pub records: Vec<DeviceRecord>,
}

impl DeviceStates {
    pub fn get(&self, name: &str) -> Option<&serde_json::Value> {
        self.records
            .iter()
            .find(|r| r.name == name)
            .map(|r| &r.state)
    }
}

#[derive(Serialize, Deserialize)]
struct DeviceStatesWire {
    serial: Vec<(String, serde_json::Value)>,
    #[serde(default)]
    other: Vec<(String, serde_json::Value)>,
}

fn is_serial_port(name: &str) -> bool {
    matches!(name, "com1" | "com2" | "com3" | "com4")
}

impl From<DeviceStatesWire> for DeviceStates {
    fn from(w: DeviceStatesWire) -> Self {
        let records = w
            .serial
            .into_iter()
            .chain(w.other)
            .map(|(name, state)| DeviceRecord { name, state })
            .collect();
        DeviceStates { records }
    }
}

impl From<DeviceStates> for DeviceStatesWire {
    fn from(d: DeviceStates) -> Self {
        let (serial, other): (Vec<_>, Vec<_>) = d
            .records
            .into_iter()
            .map(|r| (r.name, r.state))
            .partition(|(name, _)| is_serial_port(name));
        DeviceStatesWire { serial, other }
    }
}

/// Everything but RAM, captured while the VM is paused.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    pub vcpus: Vec<VcpuState>,
    pub clock: ClockState,
    pub pic_master: PicState,
    pub pic_slave: PicState,
    pub ioapic: IoapicState,
    pub pit: PitState,
    pub devices: DeviceStates,
}

/// The end section: when the source paused the guest (for the destination's downtime figure).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndRecord {
    pub paused_at_unix_ns: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_states_keep_the_version_1_layout() {
        let old = r#"{"serial":[["com1",{"baud_divisor_low":12,"scratch":7,"in_buffer":[]}]],
            "other":[["virtio-balloon",{"transport":{}}]]}"#;
        let d: DeviceStates = serde_json::from_str(old).unwrap();
        let names: Vec<&str> = d.records.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["com1", "virtio-balloon"]);
        assert_eq!(d.get("com1").unwrap()["scratch"], 7);
        let wire = serde_json::to_value(&d).unwrap();
        assert_eq!(wire["serial"][0][0], "com1");
        assert_eq!(wire["other"][0][0], "virtio-balloon");
        assert_eq!(serde_json::from_value::<DeviceStates>(wire).unwrap(), d);
        // A stream from before `other` existed.
        let d: DeviceStates = serde_json::from_str(r#"{"serial":[]}"#).unwrap();
        assert!(d.records.is_empty());
    }

    #[test]
    fn a_configuration_from_before_shared_and_thp_still_reads() {
        let old = r#"{"ram":[[0,536870912]],"memory_size":536870912,"mergeable":false,
            "vcpus":1,"pv_features":0,"cpuid":[]}"#;
        let rec: VmConfigRecord = serde_json::from_str(old).unwrap();
        assert!(!rec.shared && !rec.thp && rec.balloon.is_none());
    }
}

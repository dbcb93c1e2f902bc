//! What a VM is built from, split by who decides it: the machine (what a migration stream
//! carries, so both sides build the same VM), what a fresh boot loads, and what this host chooses
//! whatever the guest (never in a stream).

use std::path::PathBuf;

use migration::state::{BalloonConfigRecord, CpuidEntry};
use migration::VmConfigRecord;

use crate::apf::AsyncPfMode;
use crate::config::{self, KernelImage, MemoryConfig, Serial2Config, SerialConfig};
use crate::migrate::restore::RestoreMode;
use crate::seccomp::SeccompMode;

/// The machine: RAM, vCPUs and the devices present. A migration stream carries it
/// ([`VmConfigRecord`]) so the destination builds the same one.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    pub memory: MemoryConfig,
    pub vcpus: u8,
    pub balloon: Option<BalloonSpec>,
    /// A second 16550 (COM2, the host control channel); its backend is the host's choice.
    pub serial2: bool,
    /// QEMU's pc-testdev (`--testdev on`): kvm-unit-tests' scratch, IRQ-line and flush-page ports.
    pub testdev: bool,
}

/// A virtio-balloon device as the machine has it (its target travels with the device state).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalloonSpec {
    /// VIRTIO_BALLOON_F_DEFLATE_ON_OOM is offered.
    pub deflate_on_oom: bool,
}

/// What a fresh boot loads and starts with; a migrated guest brings all of it in its RAM and
/// state.
#[derive(Debug, Clone)]
pub struct BootConfig {
    pub kernel: KernelImage,
    pub cmdline: String,
    pub initramfs: Option<PathBuf>,
    /// The balloon's initial target in bytes (with a balloon).
    pub balloon_target: u64,
}

/// A VM to boot: the machine and what to load into it.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub machine: MachineConfig,
    pub boot: BootConfig,
}

/// What this host chooses for any VM it runs, booted or received.
#[derive(Debug, Clone)]
pub struct HostOptions {
    /// COM1's backend.
    pub serial: SerialConfig,
    /// COM2's backend: a guest with a COM2 needs one (`socket=PATH`), a guest without none.
    pub serial2: Serial2Config,
    pub async_pf: AsyncPfMode,
    /// Accept (destination) or allow (source) postcopy.
    pub postcopy: bool,
    /// `--incoming file:` snapshots: read all of RAM first, or serve it on first touch.
    pub restore: RestoreMode,
    /// `--restore-delay-us`: each stored page a lazy restore reads waits this long.
    pub restore_delay: std::time::Duration,
    pub api_socket: Option<PathBuf>,
    pub seccomp: SeccompMode,
}

/// An incoming stream's configuration this side will not build.
#[derive(Debug, thiserror::Error)]
pub enum RecordRefused {
    #[error("the stream's configuration is refused: {0}")]
    Check(#[from] config::ConfigError),
    #[error(
        "the stream's configuration is refused: RAM regions {regions:x?} do not match {size} \
bytes of memory"
    )]
    Layout { regions: Vec<(u64, u64)>, size: u64 },
}

impl MachineConfig {
    /// The machine an incoming stream describes, through the command line's checks (and one
    /// more: the RAM layout must be the one tern builds for that size), before anything is
    /// created. Host-only memory options (prefault, lazy-from) stay off.
    pub fn from_record(record: &VmConfigRecord) -> Result<Self, RecordRefused> {
        let memory = MemoryConfig {
            size: record.memory_size,
            mergeable: record.mergeable,
            shared: record.shared,
            thp: record.thp,
            ..Default::default()
        };
        memory.check()?;
        if let Some(host) = config::host_memory_bytes() {
            memory.check_host_fits(host)?;
        }
        if record.ram != ram_layout(memory.size) {
            return Err(RecordRefused::Layout {
                regions: record.ram.clone(),
                size: memory.size,
            });
        }
        let vcpus = config::check_vcpus(record.vcpus.into())?;
        Ok(MachineConfig {
            memory,
            vcpus,
            balloon: record.balloon.map(|b| BalloonSpec {
                deflate_on_oom: b.deflate_on_oom,
            }),
            serial2: record.serial2,
            testdev: record.testdev,
        })
    }

    /// The record a stream carries for this machine, with the CPUID the guest was given.
    pub fn to_record(&self, pv_features: u32, cpuid: Vec<CpuidEntry>) -> VmConfigRecord {
        VmConfigRecord {
            ram: ram_layout(self.memory.size),
            memory_size: self.memory.size,
            mergeable: self.memory.mergeable,
            shared: self.memory.shared,
            thp: self.memory.thp,
            serial2: self.serial2,
            testdev: self.testdev,
            vcpus: self.vcpus,
            pv_features,
            cpuid,
            balloon: self.balloon.map(|b| BalloonConfigRecord {
                deflate_on_oom: b.deflate_on_oom,
            }),
        }
    }
}

/// (guest physical address, length) of each RAM region tern builds for `size` bytes.
fn ram_layout(size: u64) -> Vec<(u64, u64)> {
    crate::memory::ram_ranges(size)
        .into_iter()
        .map(|(a, l)| (a.0, l))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> MachineConfig {
        MachineConfig {
            memory: MemoryConfig {
                size: 64 << 20,
                thp: true,
                ..Default::default()
            },
            vcpus: 2,
            balloon: Some(BalloonSpec {
                deflate_on_oom: true,
            }),
            serial2: true,
            testdev: true,
        }
    }

    #[test]
    fn a_machine_survives_its_record() {
        let rec = machine().to_record(0x10, Vec::new());
        let back = MachineConfig::from_record(&rec).unwrap();
        assert_eq!(back.memory, machine().memory);
        assert_eq!((back.vcpus, back.balloon), (2, machine().balloon));
        assert!(back.serial2);
    }

    #[test]
    fn a_record_with_a_foreign_layout_or_vcpu_count_is_refused() {
        let mut rec = machine().to_record(0, Vec::new());
        rec.ram = vec![(0, 32 << 20)];
        let err = MachineConfig::from_record(&rec).unwrap_err();
        assert!(matches!(err, RecordRefused::Layout { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("do not match 67108864 bytes of memory"),
            "{err}"
        );
        let mut rec = machine().to_record(0, Vec::new());
        rec.vcpus = 0;
        let err = MachineConfig::from_record(&rec).unwrap_err();
        assert!(matches!(err, RecordRefused::Check(_)), "{err}");
    }
}

//! Building a VM: `build_for_boot` (a kernel to load) and `build_for_incoming` (the machine a
//! migration stream or snapshot describes; its state arrives later). Both share KVM VM creation,
//! device wiring and vCPU spawning; they differ only in where the CPUID and the first
//! instruction come from.

mod devices;

use std::fs::File;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_cpuid_entry2, kvm_pit_config, CpuId, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use migration::progress::StatusCell;
use migration::state::CpuidEntry;
use migration::VmConfigRecord;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::apf::{install_msr_filter, ApfController, AsyncPfMode};
use crate::boot;
use crate::config::{Serial2Config, SerialConfig};
use crate::cpu::state::{readable_msrs, StatePolicy};
use crate::cpu::{cpuid, PvFeatures, Vcpu, VcpuContext, VcpuHandle};
use crate::lazy::{self, FaultObserver, FileSource, LazyMemory};
use crate::machine::{HostOptions, MachineConfig, VmConfig};
use crate::memory::{self, GuestMemory};
use crate::migrate::device_set::DeviceSet;
use crate::vm::{io_err, kvm_err, register_memory, Vm, VmError, VmInner};
use devices::Devices;

/// Where KVM may put its TSS and identity-map pages (Intel needs them below 4 GiB, outside RAM).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Builds the VM `cfg` describes, loads its kernel and starts its vCPUs.
pub fn build_for_boot(cfg: &VmConfig, host: &HostOptions, start: Instant) -> Result<Vm, VmError> {
    let machine = &cfg.machine;
    let mem = memory::create(&machine.memory)?;
    let (kvm, vm_fd) = create_kvm_vm(&mem)?;
    let devices = devices::wire(
        &vm_fd,
        &mem,
        machine,
        &host.serial,
        &host.serial2,
        cfg.boot.balloon_target,
        start,
    )?;
    let cmdline = match &devices.balloon {
        Some(_) => format!(
            "{} {}",
            cfg.boot.cmdline,
            crate::balloon::cmdline_fragment()
        ),
        None => cfg.boot.cmdline.clone(),
    };
    let mut pv = PvFeatures::default_set();
    if host.async_pf == AsyncPfMode::Off {
        pv.0 &= !PvFeatures::ASYNC_PF_ALL;
    }
    let (template, pv) = cpuid::template(&kvm, pv).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let entry = boot::load_guest(
        &mem,
        &cfg.boot.kernel,
        &cmdline,
        cfg.boot.initramfs.as_deref(),
        machine.memory.size,
        machine.vcpus,
    )?
    .entry;
    if let boot::EntryState::Multiboot32 { .. } = entry {
        devices::program_pic_like_a_bios(&vm_fd)?;
    }
    let apf = async_pf(&vm_fd, &mem, host.async_pf, machine.vcpus)?;
    // Lazy RAM is registered after loading: what tern wrote is present and never faults.
    let lazy = match &machine.memory.lazy_from {
        Some(path) => {
            let delay = Duration::from_micros(machine.memory.lazy_delay_us);
            let source = FileSource::open(path, delay).map_err(|source| VmError::Io {
                what: "opening the lazy memory file",
                source,
            })?;
            let observer = apf.clone().map(|a| a as Arc<dyn FaultObserver>);
            Some(lazy::start(
                &mem,
                Box::new(source),
                observer,
                lazy::LazyOptions::default(),
            )?)
        }
        None => None,
    };
    let record = machine.to_record(pv.0, cpuid_entries(&template));
    let parts = Parts {
        kvm,
        vm_fd,
        mem,
        devices,
        apf,
        async_pf: host.async_pf,
        lazy,
        console_input: host.serial == SerialConfig::Tty,
    };
    parts.spawn(&template, Some(entry), record, false)
}

/// Builds the VM an incoming stream's `record` describes, its vCPUs paused until the state is
/// restored. `handed_over`: a local migration's RAM (one memfd per region) to build it on.
pub fn build_for_incoming(
    record: &VmConfigRecord,
    host: &HostOptions,
    handed_over: Option<Vec<File>>,
    start: Instant,
) -> Result<Vm, VmError> {
    let machine = MachineConfig::from_record(record)?;
    let backend = host.serial2 != Serial2Config::Off;
    if machine.serial2 != backend {
        return Err(VmError::Incompatible(if machine.serial2 {
            "the guest has a COM2 (--serial2): give this side --serial2 socket=PATH".into()
        } else {
            "the guest has no COM2: --serial2 must be off".into()
        }));
    }
    let mem = match handed_over {
        // Counts and sizes of the descriptors are checked against the regions there.
        Some(files) => memory::from_files(&machine.memory, files)?,
        None => memory::create(&machine.memory)?,
    };
    let (kvm, vm_fd) = create_kvm_vm(&mem)?;
    // The balloon's target comes with its state.
    let devices = devices::wire(
        &vm_fd,
        &mem,
        &machine,
        &host.serial,
        &host.serial2,
        0,
        start,
    )?;
    let template = incoming_cpuid(&kvm, record)?;
    let apf = async_pf(&vm_fd, &mem, host.async_pf, machine.vcpus)?;
    let parts = Parts {
        kvm,
        vm_fd,
        mem,
        devices,
        apf,
        async_pf: host.async_pf,
        lazy: None,
        console_input: host.serial == SerialConfig::Tty,
    };
    parts.spawn(&template, None, record.clone(), true)
}

/// A KVM VM with its in-kernel interrupt controllers, PIT and RAM.
fn create_kvm_vm(mem: &GuestMemory) -> Result<(Kvm, Arc<VmFd>), VmError> {
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    let vm_fd = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
    vm_fd
        .set_tss_address(KVM_TSS_ADDRESS)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm_fd
        .set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
        .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm_fd
        .create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm_fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    register_memory(&vm_fd, mem, false)?;
    Ok((kvm, vm_fd))
}

/// tern-owned async page faults (`--async-pf tern`): the MSR filter and the controller.
fn async_pf(
    vm_fd: &Arc<VmFd>,
    mem: &GuestMemory,
    mode: AsyncPfMode,
    vcpus: u8,
) -> Result<Option<Arc<ApfController>>, VmError> {
    if mode != AsyncPfMode::Tern {
        return Ok(None);
    }
    install_msr_filter(vm_fd).map_err(kvm_err("async-PF MSR filter (KVM_X86_SET_MSR_FILTER)"))?;
    Ok(Some(Arc::new(ApfController::new(
        vcpus,
        mem.clone(),
        vm_fd.clone(),
    ))))
}

/// Everything but the vCPUs, built.
struct Parts {
    kvm: Kvm,
    vm_fd: Arc<VmFd>,
    mem: GuestMemory,
    devices: Devices,
    apf: Option<Arc<ApfController>>,
    async_pf: AsyncPfMode,
    lazy: Option<LazyMemory>,
    console_input: bool,
}

impl Parts {
    /// Creates and configures the vCPUs (the boot vCPU at `entry`), starts their threads
    /// (`paused`: waiting for a resume) and assembles the VM.
    fn spawn(
        self,
        template: &CpuId,
        entry: Option<boot::EntryState>,
        record: VmConfigRecord,
        paused: bool,
    ) -> Result<Vm, VmError> {
        let count = record.vcpus;
        if !(1..=crate::config::MAX_VCPUS).contains(&count) {
            return Err(VmError::Incompatible(format!("{count} vCPUs")));
        }
        let mut fds = Vec::new();
        for id in 0..count {
            fds.push(Vcpu::create_fd(&self.vm_fd, id)?);
        }
        let policy = StatePolicy {
            msrs: self
                .kvm
                .get_msr_index_list()
                .ok()
                .zip(fds.first())
                .map(|(l, fd)| readable_msrs(fd, l.as_slice()))
                .unwrap_or_default(),
            use_xsave: xsave_fits(&self.vm_fd),
        };
        log::debug!(
            "vCPU state: {} MSRs, xsave {}",
            policy.msrs.len(),
            policy.use_xsave
        );
        let Devices {
            exit,
            pio,
            mmio,
            com1,
            com2,
            serial2,
            balloon,
        } = self.devices;
        let mut stateful = DeviceSet::default();
        let com1_name = ::devices::bus::lock(&com1).name();
        stateful.add(com1_name, com1.clone());
        if let Some(com2) = &com2 {
            let com2_name = ::devices::bus::lock(com2).name();
            stateful.add(com2_name, com2.clone());
        }
        if let Some(b) = &balloon {
            stateful.add(crate::balloon::STATE_NAME, b.clone());
        }
        let tids = Arc::new(Mutex::new(vec![0u32; count as usize]));
        let ctx = Arc::new(VcpuContext {
            pio,
            mmio,
            exit: exit.clone(),
            mem: self.mem.clone(),
            state_policy: policy,
            apf: self.apf.clone(),
            tids: tids.clone(),
        });
        let mut vcpus = Vec::new();
        for (id, fd) in (0..count).zip(fds) {
            let vcpu = Vcpu::new(id, fd, ctx.clone());
            vcpu.configure(template, count, if id == 0 { entry } else { None })?;
            vcpus.push(vcpu);
        }
        register_kick_signal()?;
        let mut handles = Vec::new();
        for vcpu in vcpus {
            handles
                .push(VcpuHandle::spawn(vcpu, paused).map_err(io_err("starting a vCPU thread"))?);
        }
        Ok(Vm {
            inner: Arc::new(VmInner {
                vm_fd: self.vm_fd,
                mem: self.mem,
                exit,
                com1,
                record,
                vcpus: handles,
                migration: StatusCell::default(),
                dirty_logging: AtomicBool::new(false),
                dirty_mode: std::sync::atomic::AtomicU8::new(0),
                paused: AtomicBool::new(paused),
                apf: self.apf,
                async_pf: self.async_pf,
                lazy: self.lazy,
                vcpu_tids: tids,
                balloon,
                devices: stateful,
                postcopy_paused: Mutex::new(None),
                restore_lazy: Mutex::new(None),
                pagemap: crate::pagemap::Pagemap::open()
                    .inspect_err(|e| log::warn!("/proc/self/pagemap: {e}; every page is sent"))
                    .ok(),
            }),
            console_input: self.console_input,
            serial2,
        })
    }
}

/// Whether this host's XSAVE state fits the 4 KiB `kvm_xsave` (KVM_CAP_XSAVE2 reports the size
/// when it is larger; 0 when the capability is absent).
fn xsave_fits(vm_fd: &VmFd) -> bool {
    vm_fd.check_extension(Cap::Xsave) && vm_fd.check_extension_int(Cap::Xsave2) <= 4096
}

/// The CPUID template as the stream carries it.
fn cpuid_entries(template: &CpuId) -> Vec<CpuidEntry> {
    template
        .as_slice()
        .iter()
        .map(|e| CpuidEntry {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        })
        .collect()
}

/// The CPUID template of an incoming VM: the source's, if this host's KVM can honour it.
fn incoming_cpuid(kvm: &Kvm, rec: &VmConfigRecord) -> Result<CpuId, VmError> {
    let (_, here) =
        cpuid::template(kvm, PvFeatures(u32::MAX)).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let missing = rec.pv_features & !here.0;
    if missing != 0 {
        return Err(VmError::Incompatible(format!(
            "the guest uses KVM PV features {missing:#x} this host's KVM does not offer"
        )));
    }
    let entries: Vec<kvm_cpuid_entry2> = rec
        .cpuid
        .iter()
        .map(|e| kvm_cpuid_entry2 {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
            ..Default::default()
        })
        .collect();
    CpuId::from_entries(&entries)
        .map_err(|_| VmError::Incompatible(format!("{} CPUID entries are too many", entries.len())))
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal that kicks a vCPU thread out of KVM_RUN.
fn register_kick_signal() -> Result<(), VmError> {
    register_signal_handler(SIGRTMIN(), on_kick).map_err(|e| VmError::Io {
        what: "registering the vCPU kick signal",
        source: std::io::Error::from_raw_os_error(e.errno()),
    })
}

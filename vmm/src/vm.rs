//! The VM: KVM VM, guest memory, interrupt controllers, devices and vCPU threads.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::legacy::{
    BootTimer, FwCfg, IsaDebugExit, SerialDevice, SerialOutput, SocketClient, TestDevData,
    TestDevFlush, TestDevHost, TestDevIoMem, TestDevIrq, TestExit, I8042, TESTDEV_IOMEM_LEN,
    TESTDEV_IRQ_LINES,
};
use devices::{BusError, ExitRequest, IrqLine, MmioBus, PioBus, VmExitReason};
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_irqchip, kvm_pit_config, kvm_userspace_memory_region, CpuId,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use migration::progress::StatusCell;
use migration::state::{BalloonConfigRecord, CpuidEntry};
use migration::VmConfigRecord;
use thiserror::Error;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::apf::{install_msr_filter, ApfController, AsyncPfMode};
use crate::boot::{self, BootError};
use crate::config::{BalloonConfig, Serial2Config, SerialConfig, VmConfig};
use crate::cpu::state::{readable_msrs, StatePolicy};
use crate::cpu::vcpu::VcpuError;
use crate::cpu::{cpuid, PvFeatures, Vcpu, VcpuContext, VcpuHandle};
use crate::event_loop::{self, ConsoleInput, SignalWatcher, Subscriber};
use crate::layout::{irqs, ports};
use crate::lazy::{self, FaultObserver, FileSource, LazyMemory};
use crate::memory::{self, GuestMemory, MemoryError};
use crate::serial_socket::SerialSocket;

#[derive(Debug, Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0} (is KVM available and accessible to this user?)")]
    OpenKvm(kvm_ioctls::Error),
    #[error("{what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("device setup: {0}")]
    Bus(#[from] BusError),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("event loop: {0:?}")]
    EventLoop(event_manager::Error),
    #[error(transparent)]
    Lazy(#[from] lazy::LazyError),
    #[error("the incoming VM cannot be built here: {0}")]
    Incompatible(String),
    #[error("{0}")]
    Seccomp(String),
}

pub(crate) fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

fn io_err(what: &'static str) -> impl Fn(std::io::Error) -> VmError {
    move |source| VmError::Io { what, source }
}

/// Where KVM may put its TSS and identity-map pages (Intel needs them below 4 GiB, outside RAM).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// How the VM gets its initial state.
pub enum Origin<'a> {
    /// Load a kernel and boot it.
    Boot,
    /// Build the VM a migration stream describes; its state arrives later.
    Incoming(&'a VmConfigRecord),
}

/// The parts of a VM that the vCPU controller, the migration and the control API share.
pub struct VmInner {
    pub vm_fd: Arc<VmFd>,
    pub mem: GuestMemory,
    pub exit: Arc<ExitRequest>,
    pub com1: Arc<Mutex<SerialDevice>>,
    pub record: VmConfigRecord,
    pub vcpus: Vec<VcpuHandle>,
    pub migration: StatusCell,
    pub dirty_logging: AtomicBool,
    /// How dirty pages are fetched and re-armed (`migrate::dirty::DirtyLogMode` as u8).
    pub dirty_mode: std::sync::atomic::AtomicU8,
    pub paused: AtomicBool,
    pub apf: Option<Arc<ApfController>>,
    pub lazy: Option<LazyMemory>,
    pub vcpu_tids: Arc<Mutex<Vec<u32>>>,
    pub balloon: Option<crate::balloon::SharedBalloon>,
    /// A destination's postcopy machinery while postcopy is paused (broken connection), kept
    /// for `migrate-recover`.
    pub postcopy_paused: Mutex<Option<migration::postcopy::Listener>>,
    /// A lazy snapshot restore's fault thread (`--incoming file: --restore lazy`).
    pub restore_lazy: Mutex<Option<LazyMemory>>,
}

pub struct Vm {
    pub inner: Arc<VmInner>,
    console_input: bool,
    /// COM2's socket side (`--serial2 socket=PATH`), for the caller to add to the event loop.
    pub serial2: Option<SerialSocket>,
}

impl Vm {
    pub fn create(cfg: &VmConfig, origin: Origin, start: Instant) -> Result<Self, VmError> {
        let mem = memory::create(&cfg.memory)?;
        Self::create_on(cfg, origin, start, mem)
    }

    /// Builds the VM on guest RAM that exists already (handed over by a local migration).
    pub fn create_on(
        cfg: &VmConfig,
        origin: Origin,
        start: Instant,
        mem: GuestMemory,
    ) -> Result<Self, VmError> {
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

        register_memory(&vm_fd, &mem, false)?;

        let exit = ExitRequest::new().map_err(io_err("exit eventfd"))?;
        let mut pio = PioBus::new();
        let (com1, serial2) =
            add_legacy_devices(&vm_fd, &mut pio, &exit, &cfg.serial, &cfg.serial2)?;
        let timer = BootTimer::new(start, ports::BOOT_TIMER_MAGIC);
        pio.insert(ports::BOOT_TIMER, 1, Arc::new(Mutex::new(timer)))?;
        let fw_cfg = FwCfg::new(cfg.vcpus.into(), cfg.memory.size);
        pio.insert(ports::FW_CFG, 2, Arc::new(Mutex::new(fw_cfg)))?;
        let mut mmio = MmioBus::new();
        add_testdev(&mut pio, &mut mmio, &vm_fd, &mem)?;
        let balloon_cfg = match origin {
            Origin::Boot => cfg.balloon.clone(),
            // Its size comes with the device state.
            Origin::Incoming(rec) => rec.balloon.map(|b| BalloonConfig {
                size: 0,
                deflate_on_oom: b.deflate_on_oom,
            }),
        };
        let balloon = balloon_cfg
            .as_ref()
            .map(|b| crate::balloon::create(&vm_fd, &mem, b, &mut mmio))
            .transpose()?;
        let cmdline = match &balloon {
            Some(_) => format!("{} {}", cfg.cmdline, crate::balloon::cmdline_fragment()),
            None => cfg.cmdline.clone(),
        };

        let (template, pv) = match origin {
            Origin::Boot => {
                let mut pv = PvFeatures::default_set();
                if cfg.async_pf == AsyncPfMode::Off {
                    pv.0 &= !PvFeatures::ASYNC_PF_ALL;
                }
                cpuid::template(&kvm, pv).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?
            }
            Origin::Incoming(rec) => incoming_cpuid(&kvm, rec)?,
        };
        let entry = match origin {
            Origin::Boot => Some(
                boot::load_guest(
                    &mem,
                    &cfg.kernel,
                    &cmdline,
                    cfg.initramfs.as_deref(),
                    cfg.memory.size,
                    cfg.vcpus,
                )?
                .entry,
            ),
            Origin::Incoming(_) => None,
        };
        if let Some(boot::EntryState::Multiboot32 { .. }) = entry {
            program_pic_like_a_bios(&vm_fd)?;
        }
        let apf = match cfg.async_pf {
            AsyncPfMode::Tern => {
                install_msr_filter(&vm_fd)
                    .map_err(kvm_err("async-PF MSR filter (KVM_X86_SET_MSR_FILTER)"))?;
                Some(Arc::new(ApfController::new(
                    cfg.vcpus,
                    mem.clone(),
                    vm_fd.clone(),
                )))
            }
            _ => None,
        };
        // Lazy RAM is registered after loading: what tern wrote is present and never faults.
        let lazy = match &cfg.memory.lazy_from {
            Some(path) => {
                let delay = Duration::from_micros(cfg.memory.lazy_delay_us);
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

        if !(1..=crate::config::MAX_VCPUS).contains(&cfg.vcpus) {
            return Err(VmError::Incompatible(format!("{} vCPUs", cfg.vcpus)));
        }
        let mut fds = Vec::new();
        for id in 0..cfg.vcpus {
            fds.push(Vcpu::create_fd(&vm_fd, id)?);
        }
        let policy = StatePolicy {
            msrs: kvm
                .get_msr_index_list()
                .ok()
                .zip(fds.first())
                .map(|(l, fd)| readable_msrs(fd, l.as_slice()))
                .unwrap_or_default(),
            use_xsave: xsave_fits(&vm_fd),
        };
        log::debug!(
            "vCPU state: {} MSRs, xsave {}",
            policy.msrs.len(),
            policy.use_xsave
        );
        let tids = Arc::new(Mutex::new(vec![0u32; cfg.vcpus as usize]));
        let ctx = Arc::new(VcpuContext {
            pio,
            mmio,
            exit: exit.clone(),
            mem: mem.clone(),
            state_policy: policy,
            apf: apf.clone(),
            tids: tids.clone(),
        });
        let mut vcpus = Vec::new();
        for (id, fd) in (0..cfg.vcpus).zip(fds) {
            let vcpu = Vcpu::new(id, fd, ctx.clone());
            vcpu.configure(&template, cfg.vcpus, if id == 0 { entry } else { None })?;
            vcpus.push(vcpu);
        }
        register_kick_signal()?;
        let paused = matches!(origin, Origin::Incoming(_));
        let mut handles = Vec::new();
        for vcpu in vcpus {
            handles
                .push(VcpuHandle::spawn(vcpu, paused).map_err(io_err("starting a vCPU thread"))?);
        }
        let record = VmConfigRecord {
            ram: memory::ram_ranges(cfg.memory.size)
                .into_iter()
                .map(|(a, l)| (a.0, l))
                .collect(),
            memory_size: cfg.memory.size,
            mergeable: cfg.memory.mergeable,
            shared: cfg.memory.shared,
            thp: cfg.memory.thp,
            vcpus: cfg.vcpus,
            pv_features: pv.0,
            cpuid: template
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
                .collect(),
            balloon: balloon_cfg.map(|b| BalloonConfigRecord {
                deflate_on_oom: b.deflate_on_oom,
            }),
        };
        Ok(Vm {
            inner: Arc::new(VmInner {
                vm_fd,
                mem,
                exit,
                com1,
                record,
                vcpus: handles,
                migration: StatusCell::default(),
                dirty_logging: AtomicBool::new(false),
                dirty_mode: std::sync::atomic::AtomicU8::new(0),
                paused: AtomicBool::new(paused),
                apf,
                lazy,
                vcpu_tids: tids,
                balloon,
                postcopy_paused: Mutex::new(None),
                restore_lazy: Mutex::new(None),
            }),
            console_input: matches!(cfg.serial, SerialConfig::Tty),
            serial2,
        })
    }

    /// Runs the event loop until the guest (or the host) ends the VM; returns why it ended.
    pub fn run(self, mut extra: Vec<Subscriber>) -> Result<VmExitReason, VmError> {
        let inner = self.inner;
        extra.push(Arc::new(Mutex::new(
            SignalWatcher::install(inner.exit.clone()).map_err(io_err("signal handlers"))?,
        )));
        if self.console_input {
            extra.push(Arc::new(Mutex::new(ConsoleInput::new(inner.com1.clone()))));
        }
        crate::seccomp::install(crate::seccomp::ThreadKind::Main)
            .map_err(|e| VmError::Seccomp(e.to_string()))?;
        let result = event_loop::run(inner.exit.clone(), extra);
        if result.is_err() {
            inner
                .exit
                .request(VmExitReason::Crash("event loop failed".into()));
        }
        for v in &inner.vcpus {
            v.stop();
        }
        report_lazy(&inner);
        result.map_err(VmError::EventLoop)
    }
}

/// Whether this host's XSAVE state fits the 4 KiB `kvm_xsave` (KVM_CAP_XSAVE2 reports the size
/// when it is larger; 0 when the capability is absent).
fn xsave_fits(vm_fd: &VmFd) -> bool {
    vm_fd.check_extension(Cap::Xsave) && vm_fd.check_extension_int(Cap::Xsave2) <= 4096
}

/// Figures for lazy memory and tern's async page faults, printed when the VM ends.
fn report_lazy(inner: &VmInner) {
    use std::sync::atomic::Ordering::Relaxed;
    let Some(lazy) = &inner.lazy else { return };
    let s = &lazy.stats;
    eprintln!(
        "tern: lazy memory: {} faults, {} pages placed, mean fault-to-ready {:.1} us",
        s.faults.load(Relaxed),
        s.pages.load(Relaxed),
        lazy::mean_latency(s).as_secs_f64() * 1e6
    );
    if let Some(apf) = &inner.apf {
        let a = &apf.stats;
        eprintln!(
            "tern: async PF (tern): {} not-present, {} ready, {} acks, {} faults the vCPU waited out",
            a.not_present.load(Relaxed),
            a.ready.load(Relaxed),
            a.acks.load(Relaxed),
            a.blocked.load(Relaxed)
        );
    }
}

/// The CPUID template of an incoming VM: the source's, if this host's KVM can honour it.
fn incoming_cpuid(kvm: &Kvm, rec: &VmConfigRecord) -> Result<(CpuId, PvFeatures), VmError> {
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
    let cpuid = CpuId::from_entries(&entries).map_err(|_| {
        VmError::Incompatible(format!("{} CPUID entries are too many", entries.len()))
    })?;
    Ok((cpuid, PvFeatures(rec.pv_features)))
}

/// Registers (or re-registers, to switch dirty logging) every RAM region with KVM.
pub fn register_memory(vm_fd: &VmFd, mem: &GuestMemory, log_dirty: bool) -> Result<(), VmError> {
    for (slot, region) in mem.iter().enumerate() {
        let region_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: if log_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
        };
        // SAFETY: the host range is a live mapping owned by `mem`; the VM and its memory live in
        // the same VmInner and go away together.
        unsafe { vm_fd.set_user_memory_region(region_desc) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

fn add_legacy_devices(
    vm_fd: &VmFd,
    pio: &mut PioBus,
    exit: &Arc<ExitRequest>,
    serial: &SerialConfig,
    serial2: &Serial2Config,
) -> Result<(Arc<Mutex<SerialDevice>>, Option<SerialSocket>), VmError> {
    let output = match serial {
        SerialConfig::Tty => SerialOutput::Stdout,
        SerialConfig::Off => SerialOutput::Off,
        SerialConfig::File(path) => SerialOutput::File(
            std::fs::File::create(path).map_err(io_err("creating the serial output file"))?,
        ),
    };
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("serial irq eventfd"))?;
    vm_fd
        .register_irqfd(&irq, irqs::COM1)
        .map_err(kvm_err("KVM_IRQFD (COM1)"))?;
    let com1 = Arc::new(Mutex::new(
        SerialDevice::new("com1", IrqLine::new(irq), output).map_err(io_err("serial device"))?,
    ));
    pio.insert(ports::COM1, 8, com1.clone())?;
    let com2 = match serial2 {
        Serial2Config::Off => None,
        Serial2Config::Socket(path) => {
            let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("COM2 irq eventfd"))?;
            vm_fd
                .register_irqfd(&irq, irqs::COM2)
                .map_err(kvm_err("KVM_IRQFD (COM2)"))?;
            let client = SocketClient::new();
            let output = SerialOutput::Writer(Box::new(client.output()));
            let dev = SerialDevice::new("com2", IrqLine::new(irq), output)
                .map_err(io_err("COM2 device"))?;
            let dev = Arc::new(Mutex::new(dev));
            pio.insert(ports::COM2, 8, dev.clone())?;
            Some(
                SerialSocket::bind(path, client, dev)
                    .map_err(io_err("--serial2: binding the socket"))?,
            )
        }
    };
    pio.insert(
        ports::I8042_DATA,
        5,
        Arc::new(Mutex::new(I8042::new(exit.clone()))),
    )?;
    pio.insert(
        ports::TEST_EXIT,
        4,
        Arc::new(Mutex::new(TestExit::new(exit.clone()))),
    )?;
    pio.insert(
        ports::ISA_DEBUG_EXIT,
        4,
        Arc::new(Mutex::new(IsaDebugExit::new(exit.clone()))),
    )?;
    Ok((com1, com2))
}

/// A multiboot kernel comes after a BIOS, which leaves the 8259s initialised with vector bases
/// 0x08 (IRQ 0-7) and 0x70 (IRQ 8-15); kvm-unit-tests' real-mode test relies on that (IRQ 11 at
/// vector 0x73). KVM's reset state has base 0 and would deliver IRQs on exception vectors.
fn program_pic_like_a_bios(vm_fd: &VmFd) -> Result<(), VmError> {
    for (chip_id, base) in [
        (KVM_IRQCHIP_PIC_MASTER, 0x08),
        (KVM_IRQCHIP_PIC_SLAVE, 0x70),
    ] {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        vm_fd
            .get_irqchip(&mut chip)
            .map_err(kvm_err("KVM_GET_IRQCHIP (PIC)"))?;
        // SAFETY: KVM filled the `pic` member for a PIC chip id; it is plain data.
        let mut pic = unsafe { chip.chip.pic };
        pic.irq_base = base;
        pic.init4 = 1;
        pic.init_state = 0;
        chip.chip.pic = pic;
        vm_fd
            .set_irqchip(&chip)
            .map_err(kvm_err("KVM_SET_IRQCHIP (PIC)"))?;
    }
    Ok(())
}

/// QEMU's pc-testdev, which kvm-unit-tests uses (ioapic drives IRQ lines through it).
fn add_testdev(
    pio: &mut PioBus,
    mmio: &mut MmioBus,
    vm_fd: &Arc<VmFd>,
    mem: &GuestMemory,
) -> Result<(), VmError> {
    let host: Arc<dyn TestDevHost> =
        Arc::new(crate::testdev::KvmTestDev::new(vm_fd.clone(), mem.clone()));
    pio.insert(
        ports::TESTDEV_DATA,
        4,
        Arc::new(Mutex::new(TestDevData::default())),
    )?;
    pio.insert(
        ports::TESTDEV_FLUSH,
        4,
        Arc::new(Mutex::new(TestDevFlush::new(host.clone()))),
    )?;
    pio.insert(
        ports::TESTDEV_IRQ,
        TESTDEV_IRQ_LINES,
        Arc::new(Mutex::new(TestDevIrq::new(host))),
    )?;
    mmio.insert(
        crate::layout::TESTDEV_IOMEM,
        TESTDEV_IOMEM_LEN,
        Arc::new(Mutex::new(TestDevIoMem::default())),
    )?;
    Ok(())
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal that kicks a vCPU thread out of KVM_RUN.
fn register_kick_signal() -> Result<(), VmError> {
    register_signal_handler(SIGRTMIN(), on_kick).map_err(|e| VmError::Io {
        what: "registering the vCPU kick signal",
        source: std::io::Error::from_raw_os_error(e.errno()),
    })
}

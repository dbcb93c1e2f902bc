//! The VM: KVM VM, guest memory, interrupt controllers, devices and vCPU threads.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::legacy::{BootTimer, I8042, IsaDebugExit, SerialDevice, SerialOutput, TestExit};
use devices::{BusError, ExitRequest, IrqLine, PioBus, VmExitReason};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use thiserror::Error;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::boot::{self, BootError};
use crate::config::{SerialConfig, VmConfig};
use crate::cpu::vcpu::VcpuError;
use crate::cpu::{cpuid, PvFeatures, Vcpu, VcpuContext};
use crate::event_loop::{self, ConsoleInput, SignalWatcher, Subscriber};
use crate::layout::{irqs, ports};
use crate::memory::{self, GuestMemory, MemoryError};

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
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

fn io_err(what: &'static str) -> impl Fn(std::io::Error) -> VmError {
    move |source| VmError::Io { what, source }
}

/// Where KVM may put its TSS and identity-map pages (Intel needs them below 4 GiB, outside RAM).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

pub struct Vm {
    vm_fd: VmFd,
    mem: GuestMemory,
    vcpus: Vec<Vcpu>,
    exit: Arc<ExitRequest>,
    console: Option<Arc<Mutex<SerialDevice>>>,
    boot_timer: Arc<Mutex<Option<Duration>>>,
    pub pv_features: PvFeatures,
}

impl Vm {
    pub fn create(cfg: &VmConfig, start: Instant) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let vm_fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        vm_fd
            .set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm_fd
            .set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        vm_fd.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

        let mem = memory::create(&cfg.memory)?;
        register_memory(&vm_fd, &mem)?;

        let exit = ExitRequest::new().map_err(io_err("exit eventfd"))?;
        let mut pio = PioBus::new();
        let console = add_legacy_devices(&vm_fd, &mut pio, &exit, &cfg.serial)?;
        let timer = BootTimer::new(start, ports::BOOT_TIMER_MAGIC);
        let boot_timer = timer.recorded();
        pio.insert(ports::BOOT_TIMER, 1, Arc::new(Mutex::new(timer)))?;

        let loaded = boot::load_guest(
            &mem,
            &cfg.kernel,
            &cfg.cmdline,
            cfg.initramfs.as_deref(),
            cfg.memory.size,
            cfg.vcpus,
        )?;

        let (template, pv_features) =
            cpuid::template(&kvm, PvFeatures::default_set()).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let ctx = Arc::new(VcpuContext {
            pio,
            exit: exit.clone(),
            mem: mem.clone(),
        });
        let mut vcpus = Vec::new();
        for id in 0..cfg.vcpus {
            let vcpu = Vcpu::new(&vm_fd, id, ctx.clone())?;
            vcpu.configure(&template, cfg.vcpus, (id == 0).then_some(loaded.entry))?;
            vcpus.push(vcpu);
        }
        Ok(Vm {
            vm_fd,
            mem,
            vcpus,
            exit,
            console,
            boot_timer,
            pv_features,
        })
    }

    /// When the guest wrote the boot-timer port, relative to tern's start.
    pub fn boot_timer(&self) -> Arc<Mutex<Option<Duration>>> {
        self.boot_timer.clone()
    }

    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    pub fn vm_fd(&self) -> &VmFd {
        &self.vm_fd
    }

    /// Runs the guest until it (or the host) ends the VM; returns why it ended.
    pub fn run(self) -> Result<VmExitReason, VmError> {
        register_kick_signal()?;
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        for vcpu in self.vcpus {
            let name = format!("vcpu{}", vcpu.id);
            let handle = std::thread::Builder::new()
                .name(name)
                .spawn(move || vcpu.run())
                .map_err(io_err("spawning a vCPU thread"))?;
            threads.push(handle);
        }
        let mut subscribers: Vec<Subscriber> = vec![Arc::new(Mutex::new(
            SignalWatcher::install(self.exit.clone()).map_err(io_err("signal handlers"))?,
        ))];
        if let Some(serial) = &self.console {
            subscribers.push(Arc::new(Mutex::new(ConsoleInput::new(serial.clone()))));
        }
        let result = event_loop::run(self.exit.clone(), subscribers);
        if result.is_err() {
            self.exit
                .request(VmExitReason::Crash("event loop failed".into()));
        }
        stop_vcpus(threads);
        result.map_err(VmError::EventLoop)
    }
}

fn register_memory(vm_fd: &VmFd, mem: &GuestMemory) -> Result<(), VmError> {
    for (slot, region) in mem.iter().enumerate() {
        let region_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the host range is a live mapping owned by `mem`, which outlives the VM fd's use
        // of it (the Vm holds both and drops the VM fd first... or together at process exit).
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
) -> Result<Option<Arc<Mutex<SerialDevice>>>, VmError> {
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
    let com1 = Arc::new(Mutex::new(SerialDevice::new("com1", IrqLine::new(irq), output)));
    pio.insert(ports::COM1, 8, com1.clone())?;
    pio.insert(ports::I8042_DATA, 5, Arc::new(Mutex::new(I8042::new(exit.clone()))))?;
    pio.insert(ports::TEST_EXIT, 4, Arc::new(Mutex::new(TestExit::new(exit.clone()))))?;
    pio.insert(
        ports::ISA_DEBUG_EXIT,
        4,
        Arc::new(Mutex::new(IsaDebugExit::new(exit.clone()))),
    )?;
    Ok(matches!(serial, SerialConfig::Tty).then_some(com1))
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal that kicks a vCPU thread out of KVM_RUN.
fn register_kick_signal() -> Result<(), VmError> {
    register_signal_handler(SIGRTMIN(), on_kick).map_err(|e| VmError::Io {
        what: "registering the vCPU kick signal",
        source: std::io::Error::from_raw_os_error(e.errno()),
    })
}

/// Kicks every vCPU thread until it leaves KVM_RUN and sees the exit request, then joins it.
fn stop_vcpus(threads: Vec<JoinHandle<()>>) {
    for t in &threads {
        // Repeated: a kick that lands just before KVM_RUN is entered is lost.
        for _ in 0..500 {
            if t.is_finished() {
                break;
            }
            let _ = t.kill(0);
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    for t in threads {
        if t.join().is_err() {
            log::error!("a vCPU thread panicked");
        }
    }
}

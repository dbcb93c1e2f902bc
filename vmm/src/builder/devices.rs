//! Device wiring shared by every VM tern builds: the legacy ports, pc-testdev, fw_cfg, the boot
//! timer and the balloon, each with its interrupt routed through an irqfd.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::legacy::{
    BootTimer, FwCfg, IsaDebugExit, SerialDevice, SerialOutput, SocketClient, TestDevData,
    TestDevFlush, TestDevHost, TestDevIoMem, TestDevIrq, TestExit, I8042, TESTDEV_IOMEM_LEN,
    TESTDEV_IRQ_LINES,
};
use devices::{ExitRequest, IrqLine, MmioBus, PioBus};
use kvm_bindings::{kvm_irqchip, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use crate::balloon::SharedBalloon;
use crate::config::{Serial2Config, SerialConfig};
use crate::layout::{irqs, ports};
use crate::machine::MachineConfig;
use crate::memory::GuestMemory;
use crate::serial_socket::SerialSocket;
use crate::vm::{io_err, kvm_err, VmError};

/// The devices of a VM, wired to its buses.
pub(super) struct Devices {
    pub exit: Arc<ExitRequest>,
    pub pio: PioBus,
    pub mmio: MmioBus,
    pub com1: Arc<Mutex<SerialDevice>>,
    /// COM2 (`--serial2`), whose state migrates like COM1's.
    pub com2: Option<Arc<Mutex<SerialDevice>>>,
    /// COM2's socket side, for the event loop.
    pub serial2: Option<SerialSocket>,
    pub balloon: Option<SharedBalloon>,
}

/// Creates the machine's devices: COM1 on `serial`, COM2 on `serial2` (the caller checked it
/// against the machine), and the balloon (if the machine has one) asking for `balloon_target`
/// bytes.
pub(super) fn wire(
    vm_fd: &Arc<VmFd>,
    mem: &GuestMemory,
    machine: &MachineConfig,
    serial: &SerialConfig,
    serial2: &Serial2Config,
    balloon_target: u64,
    start: Instant,
) -> Result<Devices, VmError> {
    let exit = ExitRequest::new().map_err(io_err("exit eventfd"))?;
    let mut pio = PioBus::new();
    let (com1, com2, serial2) = add_legacy_devices(vm_fd, &mut pio, &exit, serial, serial2)?;
    let timer = BootTimer::new(start, ports::BOOT_TIMER_MAGIC);
    pio.insert(ports::BOOT_TIMER, 1, Arc::new(Mutex::new(timer)))?;
    let fw_cfg = FwCfg::new(machine.vcpus.into(), machine.memory.size);
    pio.insert(ports::FW_CFG, 2, Arc::new(Mutex::new(fw_cfg)))?;
    let mut mmio = MmioBus::new();
    if machine.testdev {
        add_testdev(&mut pio, &mut mmio, vm_fd, mem)?;
    }
    let balloon = machine
        .balloon
        .as_ref()
        .map(|b| crate::balloon::create(vm_fd, mem, b, balloon_target, &mut mmio))
        .transpose()?;
    Ok(Devices {
        exit,
        pio,
        mmio,
        com1,
        com2,
        serial2,
        balloon,
    })
}

fn add_legacy_devices(
    vm_fd: &VmFd,
    pio: &mut PioBus,
    exit: &Arc<ExitRequest>,
    serial: &SerialConfig,
    serial2: &Serial2Config,
) -> Result<LegacyDevices, VmError> {
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
            let socket = SerialSocket::bind(path, client, dev.clone())
                .map_err(io_err("--serial2: binding the socket"))?;
            Some((dev, socket))
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
    let (com2, socket) = com2.unzip();
    Ok((com1, com2, socket))
}

/// COM1, COM2 if configured, and COM2's socket side.
type LegacyDevices = (
    Arc<Mutex<SerialDevice>>,
    Option<Arc<Mutex<SerialDevice>>>,
    Option<SerialSocket>,
);

/// A multiboot kernel comes after a BIOS, which leaves the 8259s initialised with vector bases
/// 0x08 (IRQ 0-7) and 0x70 (IRQ 8-15); kvm-unit-tests' real-mode test relies on that (IRQ 11 at
/// vector 0x73). KVM's reset state has base 0 and would deliver IRQs on exception vectors.
pub(super) fn program_pic_like_a_bios(vm_fd: &VmFd) -> Result<(), VmError> {
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

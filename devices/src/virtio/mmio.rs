//! The virtio-mmio transport (virtio 1.x, register layout version 2): one 4 KiB window per
//! device, 32-bit registers below 0x100, the device's config space from 0x100 on. The driver
//! finds the window through the kernel command line (`virtio_mmio.device=4K@ADDR:IRQ`).

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_superio::Trigger;

use super::{GuestMem, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::bus::MmioDevice;
use crate::IrqLine;

/// Size of one device's register window.
pub const WINDOW_SIZE: u64 = 0x1000;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x6e72_6574; // "tern"

mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits (virtio 1.x §2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const FAILED: u32 = 128;
}

/// InterruptStatus bits.
pub const INT_VRING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// The transport's registers and queues, as they cross in a migration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    pub status: u32,
    pub driver_features: u64,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub queue_sel: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub queues: Vec<QueueRecord>,
}

/// One virtqueue (the fields of virtio-queue's `QueueState`, which is not serde).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRecord {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
}

impl From<QueueState> for QueueRecord {
    fn from(q: QueueState) -> Self {
        QueueRecord {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
        }
    }
}

/// A virtio device behind its MMIO window.
pub struct VirtioMmio<D: VirtioDevice> {
    device: D,
    queues: Vec<Queue>,
    mem: GuestMem,
    irq: IrqLine,
    state: MmioTransportState,
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("virtio queue: {0}")]
    Queue(#[from] virtio_queue::Error),
    #[error("restored state has {got} queues, the device has {want}")]
    QueueCount { got: usize, want: usize },
}

impl<D: VirtioDevice> VirtioMmio<D> {
    pub fn new(device: D, mem: GuestMem, irq: IrqLine) -> Result<Self, TransportError> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&n| Queue::new(n))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(VirtioMmio {
            device,
            queues,
            mem,
            irq,
            state: MmioTransportState::default(),
        })
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The device changed its config space (e.g. the host set a new balloon target): tell the
    /// driver, if one is running.
    pub fn config_changed(&mut self) {
        self.state.config_generation = self.state.config_generation.wrapping_add(1);
        if self.state.status & status::DRIVER_OK != 0 {
            self.raise(INT_CONFIG);
        }
    }

    /// The transport's half of a virtio device's migration record.
    pub fn save_transport(&self) -> MmioTransportState {
        let mut s = self.state.clone();
        s.queues = self.queues.iter().map(|q| q.state().into()).collect();
        s
    }

    pub fn restore_transport(&mut self, s: &MmioTransportState) -> Result<(), TransportError> {
        if s.queues.len() != self.queues.len() {
            return Err(TransportError::QueueCount {
                got: s.queues.len(),
                want: self.queues.len(),
            });
        }
        // Every queue is checked before any is replaced: a refused record changes nothing.
        let queues = s
            .queues
            .iter()
            .map(|r| {
                Queue::try_from(QueueState {
                    max_size: r.max_size,
                    next_avail: r.next_avail,
                    next_used: r.next_used,
                    event_idx_enabled: false,
                    size: r.size,
                    ready: r.ready,
                    desc_table: r.desc_table,
                    avail_ring: r.avail_ring,
                    used_ring: r.used_ring,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.queues = queues;
        self.state = MmioTransportState {
            queues: Vec::new(),
            ..s.clone()
        };
        Ok(())
    }

    fn raise(&mut self, bit: u32) {
        self.state.interrupt_status |= bit;
        if let Err(e) = self.irq.trigger() {
            log::warn!("virtio-mmio: interrupt: {e}");
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.state.queue_sel as usize)
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.state = MmioTransportState::default();
        self.device.reset();
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        let s = &self.state;
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR,
            reg::DEVICE_FEATURES => match s.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            reg::INTERRUPT_STATUS => s.interrupt_status,
            reg::STATUS => s.status,
            reg::CONFIG_GENERATION => s.config_generation,
            _ => {
                log::debug!("virtio-mmio: read of register {offset:#x}");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        // Queue layout may only change before the driver is done setting up (spec 4.2.3.2).
        let setting_up = self.state.status & status::DRIVER_OK == 0;
        match offset {
            reg::DEVICE_FEATURES_SEL => self.state.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.state.driver_features_sel = v,
            reg::DRIVER_FEATURES => match self.state.driver_features_sel {
                0 => {
                    self.state.driver_features =
                        (self.state.driver_features & !0xffff_ffff) | u64::from(v)
                }
                1 => {
                    self.state.driver_features =
                        (self.state.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                }
                _ => {}
            },
            reg::QUEUE_SEL => self.state.queue_sel = v,
            reg::QUEUE_NUM if setting_up => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(v as u16);
                }
            }
            reg::QUEUE_READY if setting_up => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH
                if setting_up =>
            {
                let high = offset & 4 != 0;
                let (lo, hi) = if high {
                    (None, Some(v))
                } else {
                    (Some(v), None)
                };
                if let Some(q) = self.selected_queue() {
                    match offset & !4 {
                        reg::QUEUE_DESC_LOW => q.set_desc_table_address(lo, hi),
                        reg::QUEUE_DRIVER_LOW => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            reg::QUEUE_NOTIFY => self.notify(v as usize),
            reg::INTERRUPT_ACK => self.state.interrupt_status &= !v,
            reg::STATUS => self.set_status(v),
            _ => log::debug!("virtio-mmio: ignored write {v:#x} to register {offset:#x}"),
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let mut v = v;
        let newly = v & !self.state.status;
        if newly & status::FEATURES_OK != 0 {
            // Features the device never offered, or a legacy driver: refuse (the driver reads
            // the status back and gives up).
            let d = self.state.driver_features;
            if d & !self.device.features() != 0 || d & VIRTIO_F_VERSION_1 == 0 {
                log::warn!("virtio-mmio: driver features {d:#x} refused");
                v &= !status::FEATURES_OK;
            }
        }
        if newly & status::DRIVER_OK != 0 {
            let bad = self
                .queues
                .iter()
                .position(|q| q.ready() && !q.is_valid(&self.mem));
            if let Some(i) = bad {
                log::warn!("virtio-mmio: queue {i} is not valid at DRIVER_OK");
                v = (v & !status::DRIVER_OK) | status::FAILED;
            }
        }
        self.state.status = v;
    }

    fn notify(&mut self, index: usize) {
        if self.state.status & status::DRIVER_OK == 0 {
            log::debug!("virtio-mmio: notify before DRIVER_OK");
            return;
        }
        let Some(q) = self.queues.get_mut(index) else {
            log::warn!("virtio-mmio: notify for queue {index}, which does not exist");
            return;
        };
        if !q.ready() {
            return;
        }
        let used = self.device.process_queue(index, q, &self.mem);
        let wanted = used && q.needs_notification(&self.mem).unwrap_or(true);
        if wanted {
            self.raise(INT_VRING);
        }
    }
}

impl<D: VirtioDevice> MmioDevice for VirtioMmio<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
        } else {
            log::debug!("virtio-mmio: {}-byte read at {offset:#x}", data.len());
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
        } else if let (Ok(b), true) = (<[u8; 4]>::try_from(data), offset.is_multiple_of(4)) {
            self.write_reg(offset, u32::from_le_bytes(b));
        } else {
            log::debug!("virtio-mmio: {}-byte write at {offset:#x}", data.len());
        }
    }
}

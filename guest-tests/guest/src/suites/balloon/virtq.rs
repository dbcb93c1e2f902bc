//! A minimal virtio-mmio (version 2) driver side: device setup and split virtqueues that carry
//! one buffer at a time, polled (no interrupts).

use core::sync::atomic::{fence, Ordering};

use crate::rt::{cpu, Fail};

const MAGIC: u32 = 0x7472_6976;
const VERSION_1: u64 = 1 << 32;
pub const QUEUE_SIZE: usize = 16;

mod reg {
    pub const MAGIC: usize = 0x000;
    pub const VERSION: usize = 0x004;
    pub const DEVICE_ID: usize = 0x008;
    pub const DEVICE_FEATURES: usize = 0x010;
    pub const DEVICE_FEATURES_SEL: usize = 0x014;
    pub const DRIVER_FEATURES: usize = 0x020;
    pub const DRIVER_FEATURES_SEL: usize = 0x024;
    pub const QUEUE_SEL: usize = 0x030;
    pub const QUEUE_NUM_MAX: usize = 0x034;
    pub const QUEUE_NUM: usize = 0x038;
    pub const QUEUE_READY: usize = 0x044;
    pub const QUEUE_NOTIFY: usize = 0x050;
    pub const STATUS: usize = 0x070;
    pub const QUEUE_DESC: usize = 0x080;
    pub const QUEUE_DRIVER: usize = 0x090;
    pub const QUEUE_DEVICE: usize = 0x0a0;
    pub const CONFIG: usize = 0x100;
}

const ACKNOWLEDGE: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;

/// One split virtqueue's memory (virtio 1.x §2.7): descriptors, available and used rings.
#[repr(C, align(4096))]
pub struct Ring {
    desc: [[u64; 2]; QUEUE_SIZE],
    avail_flags: u16,
    avail_idx: u16,
    avail: [u16; QUEUE_SIZE],
    _pad: [u8; 2048 - 4 - 2 * QUEUE_SIZE - 16 * QUEUE_SIZE],
    used_flags: u16,
    used_idx: u16,
    used: [[u32; 2]; QUEUE_SIZE],
}

impl Ring {
    pub const fn new() -> Ring {
        Ring {
            desc: [[0; 2]; QUEUE_SIZE],
            avail_flags: 0,
            avail_idx: 0,
            avail: [0; QUEUE_SIZE],
            _pad: [0; 2048 - 4 - 2 * QUEUE_SIZE - 16 * QUEUE_SIZE],
            used_flags: 0,
            used_idx: 0,
            used: [[0; 2]; QUEUE_SIZE],
        }
    }
}

/// The device at an MMIO window (identity mapped, user-accessible, uncached).
pub struct Device {
    base: usize,
}

impl Device {
    fn read(&self, off: usize) -> u32 {
        // SAFETY: an aligned register of the virtio-mmio window (identity mapped, USER).
        unsafe { core::ptr::read_volatile((self.base + off) as *const u32) }
    }

    fn write(&self, off: usize, v: u32) {
        // SAFETY: as in `read`.
        unsafe { core::ptr::write_volatile((self.base + off) as *mut u32, v) }
    }

    pub fn config_read(&self, off: usize) -> u32 {
        self.read(reg::CONFIG + off)
    }

    pub fn config_write(&self, off: usize, v: u32) {
        self.write(reg::CONFIG + off, v)
    }

    /// Resets the device at `base`, checks it is a modern virtio device of type `id`, and
    /// negotiates VERSION_1 only.
    pub fn probe(base: usize, id: u32) -> Result<Device, Fail> {
        let d = Device { base };
        if d.read(reg::MAGIC) != MAGIC || d.read(reg::VERSION) != 2 {
            return Err(crate::fail!("no virtio-mmio v2 device at {base:#x}"));
        }
        let got = d.read(reg::DEVICE_ID);
        if got != id {
            return Err(crate::fail!("virtio device {got} at {base:#x}, expected {id}"));
        }
        d.write(reg::STATUS, 0);
        d.write(reg::STATUS, ACKNOWLEDGE);
        d.write(reg::STATUS, ACKNOWLEDGE | DRIVER);
        d.write(reg::DEVICE_FEATURES_SEL, 1);
        let high = u64::from(d.read(reg::DEVICE_FEATURES)) << 32;
        if high & VERSION_1 == 0 {
            return Err(crate::fail!("device does not offer VIRTIO_F_VERSION_1"));
        }
        d.write(reg::DRIVER_FEATURES_SEL, 0);
        d.write(reg::DRIVER_FEATURES, 0);
        d.write(reg::DRIVER_FEATURES_SEL, 1);
        d.write(reg::DRIVER_FEATURES, (VERSION_1 >> 32) as u32);
        d.write(reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        if d.read(reg::STATUS) & FEATURES_OK == 0 {
            return Err(crate::fail!("device refused our features"));
        }
        Ok(d)
    }

    /// Hands queue `index` its rings.
    pub fn setup_queue(&self, index: u32, ring: &'static mut Ring) -> Result<Queue, Fail> {
        self.write(reg::QUEUE_SEL, index);
        let max = self.read(reg::QUEUE_NUM_MAX) as usize;
        if max < QUEUE_SIZE {
            return Err(crate::fail!("queue {index}: max size {max} < {QUEUE_SIZE}"));
        }
        self.write(reg::QUEUE_NUM, QUEUE_SIZE as u32);
        let base = ring as *mut Ring as u64;
        let desc = core::ptr::addr_of!(ring.desc) as u64;
        let avail = core::ptr::addr_of!(ring.avail_flags) as u64;
        let used = core::ptr::addr_of!(ring.used_flags) as u64;
        debug_assert!(desc == base);
        for (reg, addr) in [
            (reg::QUEUE_DESC, desc),
            (reg::QUEUE_DRIVER, avail),
            (reg::QUEUE_DEVICE, used),
        ] {
            self.write(reg, addr as u32);
            self.write(reg + 4, (addr >> 32) as u32);
        }
        self.write(reg::QUEUE_READY, 1);
        Ok(Queue { index, ring })
    }

    pub fn driver_ok(&self) -> Result<(), Fail> {
        self.write(reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        if self.read(reg::STATUS) & DRIVER_OK == 0 {
            return Err(crate::fail!("device did not accept DRIVER_OK"));
        }
        Ok(())
    }
}

pub struct Queue {
    index: u32,
    ring: &'static mut Ring,
}

impl Queue {
    /// Offers one device-readable buffer and waits (polling, at most `timeout` TSC ticks) until
    /// the device has used it.
    pub fn send(&mut self, dev: &Device, addr: u64, len: u32, timeout: u64) -> Result<(), Fail> {
        let r = &mut *self.ring;
        // SAFETY (all volatile accesses below): fields of this queue's ring, which the device
        // reads and writes concurrently through guest memory.
        unsafe {
            let idx = core::ptr::read_volatile(&r.avail_idx);
            let slot = idx as usize % QUEUE_SIZE;
            core::ptr::write_volatile(&mut r.desc[slot], [addr, u64::from(len)]);
            core::ptr::write_volatile(&mut r.avail[slot], slot as u16);
            fence(Ordering::SeqCst);
            core::ptr::write_volatile(&mut r.avail_idx, idx.wrapping_add(1));
            fence(Ordering::SeqCst);
            dev.write(reg::QUEUE_NOTIFY, self.index);
            let t0 = cpu::rdtsc();
            while core::ptr::read_volatile(&r.used_idx) != idx.wrapping_add(1) {
                if cpu::rdtsc().wrapping_sub(t0) > timeout {
                    return Err(crate::fail!("queue {}: buffer never used", self.index));
                }
                cpu::pause();
            }
        }
        Ok(())
    }
}

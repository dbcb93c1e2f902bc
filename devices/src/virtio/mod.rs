//! Virtio devices over the virtio-mmio transport (virtio 1.x, "modern" register layout only).
//!
//! The transport (`mmio.rs`) owns the registers, the negotiated features and the virtqueues;
//! a device (`balloon.rs`) owns its config space and what its queues mean.

pub mod balloon;
pub mod mmio;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::GuestMemoryMmap;

pub use balloon::{Balloon, BalloonDeviceState, BalloonState, DiscardError, DiscardRam};
pub use mmio::{MmioTransportState, VirtioMmio};

/// Guest memory as tern maps it (dirty tracking in the bitmap, for migration).
pub type GuestMem = GuestMemoryMmap<AtomicBitmap>;

/// Feature bit every modern device offers and every modern driver must accept.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// What a device behind the transport provides.
pub trait VirtioDevice: Send {
    /// The virtio device ID (5 = memory balloon).
    fn device_type(&self) -> u32;
    /// Feature bits offered to the driver.
    fn features(&self) -> u64;
    /// Maximum size of each of the device's queues (their count is the queue count).
    fn queue_max_sizes(&self) -> &[u16];
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver made buffers available on queue `index`: consume them, return whether any
    /// were used (the transport then interrupts the driver if it wants that).
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut virtio_queue::Queue,
        mem: &GuestMem,
    ) -> bool;
    /// The driver reset the device.
    fn reset(&mut self);
}

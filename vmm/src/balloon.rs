//! The virtio-balloon device as tern wires it: one virtio-mmio window in the MMIO hole, an irqfd
//! on an ISA IRQ the command line names, and discards done with MADV_DONTNEED on guest RAM.

use std::sync::{Arc, Mutex};

use devices::bus::lock;
use devices::virtio::{Balloon, DiscardError, DiscardRam, VirtioMmio};
use devices::{IrqLine, MmioBus};
use kvm_ioctls::VmFd;
use serde_json::{json, Value};
use vm_memory::{GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::layout::{irqs, VIRTIO_BALLOON_MMIO};
use crate::machine::BalloonSpec;
use crate::memory::GuestMemory;
use crate::vm::{kvm_err, VmError};

pub type BalloonDevice = VirtioMmio<Balloon>;
pub type SharedBalloon = Arc<Mutex<BalloonDevice>>;

/// Its name in the migration stream's device list.
pub const STATE_NAME: &str = "virtio-balloon";
const PAGE: u64 = 4096;

/// What a Linux guest needs on its command line to find the device (CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES);
/// the built-in guest reads the same parameter.
pub fn cmdline_fragment() -> String {
    format!(
        "virtio_mmio.device=4K@{:#x}:{}",
        VIRTIO_BALLOON_MMIO,
        irqs::BALLOON
    )
}

/// Discards guest RAM pages by dropping their host memory.
struct GuestRamDiscard(GuestMemory);

impl DiscardRam for GuestRamDiscard {
    fn is_ram(&self, gpa: u64, len: u64) -> bool {
        self.0
            .find_region(GuestAddress(gpa))
            .is_some_and(|r| gpa + len <= r.start_addr().0 + r.len())
    }

    fn discard(&self, gpa: u64, len: u64) -> Result<(), DiscardError> {
        let not_ram = DiscardError::NotRam { gpa, len };
        if !self.is_ram(gpa, len) || !gpa.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) {
            return Err(not_ram);
        }
        let host = self
            .0
            .get_host_address(GuestAddress(gpa))
            .map_err(|_| not_ram)?;
        // MADV_DONTNEED on a shared mapping only unmaps: the memfd keeps the page (and its
        // old contents). MADV_REMOVE frees it there.
        let shared = self
            .0
            .find_region(GuestAddress(gpa))
            .is_some_and(|r| r.file_offset().is_some());
        let advice = if shared {
            libc::MADV_REMOVE
        } else {
            libc::MADV_DONTNEED
        };
        // SAFETY: [host, host + len) lies inside one live guest RAM mapping (checked above);
        // either advice only drops contents, the next touch reads zeros. The guest gave these
        // pages up, nothing in tern holds references into them.
        let rc = unsafe { libc::madvise(host.cast(), len as usize, advice) };
        if rc != 0 {
            return Err(DiscardError::Host(std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

/// Creates the device, wires its interrupt and puts it on the MMIO bus.
pub fn create(
    vm_fd: &VmFd,
    mem: &GuestMemory,
    device: &BalloonSpec,
    target_bytes: u64,
    mmio: &mut MmioBus,
) -> Result<SharedBalloon, VmError> {
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmError::Io {
        what: "balloon irq eventfd",
        source,
    })?;
    vm_fd
        .register_irqfd(&evt, irqs::BALLOON)
        .map_err(kvm_err("KVM_IRQFD (balloon)"))?;
    let target = u32::try_from(target_bytes / PAGE)
        .map_err(|_| VmError::Incompatible(format!("balloon size {target_bytes} is too large")))?;
    let balloon = Balloon::new(
        target,
        device.deflate_on_oom,
        Box::new(GuestRamDiscard(mem.clone())),
    );
    let dev = VirtioMmio::new(balloon, mem.clone(), IrqLine::new(evt))
        .map_err(|e| VmError::Incompatible(format!("balloon device: {e}")))?;
    let dev = Arc::new(Mutex::new(dev));
    mmio.insert(
        VIRTIO_BALLOON_MMIO,
        devices::virtio::mmio::WINDOW_SIZE,
        dev.clone(),
    )?;
    Ok(dev)
}

/// Why a balloon target was refused.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("balloon size {bytes} is larger than guest RAM ({ram_bytes} bytes)")]
    LargerThanRam { bytes: u64, ram_bytes: u64 },
    #[error("balloon size too large")]
    TooLarge,
}

/// Sets a new target size in bytes (rounded down to pages) and tells the driver.
pub fn set_target(dev: &SharedBalloon, bytes: u64, ram_bytes: u64) -> Result<Value, TargetError> {
    if bytes > ram_bytes {
        return Err(TargetError::LargerThanRam { bytes, ram_bytes });
    }
    let pages = u32::try_from(bytes / PAGE).map_err(|_| TargetError::TooLarge)?;
    let mut d = lock(dev);
    d.device_mut().set_target(pages);
    d.config_changed();
    Ok(status(&d))
}

/// Target, actual size and counters, for the API.
pub fn status(d: &BalloonDevice) -> Value {
    let b = d.device();
    json!({
        "target_bytes": u64::from(b.target_pages()) * PAGE,
        "actual_bytes": u64::from(b.actual_pages()) * PAGE,
        "deflate_on_oom": b.deflate_on_oom(),
        "discards_inhibited": b.inhibited(),
        "deferred_pages": b.deferred_pages(),
        "stats": b.stats(),
    })
}

/// Postcopy: stops discards (recording them instead), or resumes them and applies what was
/// recorded. Returns the number of pages discarded at a release.
pub fn inhibit_discards(dev: &SharedBalloon, on: bool) -> u64 {
    let mut d = lock(dev);
    if on {
        d.device_mut().inhibit();
        0
    } else {
        let n = d.device_mut().release();
        if n > 0 {
            eprintln!("tern: balloon: {n} pages inflated during postcopy discarded now");
        }
        n
    }
}

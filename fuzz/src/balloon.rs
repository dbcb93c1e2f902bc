//! virtio-mmio + balloon over real guest memory: the input is a guest-memory image (descriptor
//! tables, rings, PFN buffers wherever the input puts them) and a sequence of register reads and
//! writes (the driver), with some host-side actions (new target, postcopy inhibit/release,
//! save/restore) mixed in.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use devices::virtio::{Balloon, DiscardError, DiscardRam, GuestMem, VirtioMmio};
use devices::{IrqLine, MmioDevice, Stateful};
use vm_memory::{Bytes as _, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bytes::Bytes;

/// Guest RAM: small, so the fuzzer's addresses land in it often.
pub const RAM: u64 = 64 << 10;
/// Where the seed puts queue 0's used ring, and queue 1's above it (16 entries: 134 bytes).
pub const USED_SEED: u64 = 0x300;
pub const USED_STRIDE: u64 = 0x400;
/// The register window and a little config space past it.
const WINDOW: u16 = 0x1ff;

/// Discards are checked against RAM (the device must only ask for RAM it validated) and counted.
struct Ram(Arc<AtomicU64>);

impl DiscardRam for Ram {
    fn discard(&self, gpa: u64, len: u64) -> Result<(), DiscardError> {
        assert!(
            gpa.is_multiple_of(4096) && len.is_multiple_of(4096) && len > 0,
            "discard {gpa:#x}+{len:#x}: not whole pages"
        );
        assert!(
            self.is_ram(gpa, len),
            "discard {gpa:#x}+{len:#x} outside RAM"
        );
        self.0.fetch_add(len / 4096, Ordering::Relaxed);
        Ok(())
    }

    fn is_ram(&self, gpa: u64, len: u64) -> bool {
        gpa.checked_add(len).is_some_and(|end| end <= RAM)
    }
}

/// Input: image length u16, the image (copied to guest address 0), the initial target u16,
/// then operations of 7 bytes: op u8 (bit 0 write; bits 1-2 size 1/2/4/8; bit 7 a host action
/// chosen by the value instead), offset u16 (within the window), value u32.
pub fn run(data: &[u8]) {
    drive(data);
}

/// As [`run`]: the pages the balloon discarded and the used-ring index of each queue after
/// the operations, for the tests of the seeds.
pub fn drive(data: &[u8]) -> (u64, [u16; 2]) {
    let discarded = Arc::new(AtomicU64::new(0));
    let mut b = Bytes::new(data);
    let image_len = usize::from(b.u16());
    let image = b.take(image_len);
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), RAM as usize)]).expect("guest RAM");
    mem.write_slice(image, GuestAddress(0))
        .expect("the image fits RAM");
    let irq = IrqLine::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"));
    let balloon = Balloon::new(u32::from(b.u16()), true, Box::new(Ram(discarded.clone())));
    let mut dev = VirtioMmio::new(balloon, mem.clone(), irq).expect("the balloon's queues");
    while !b.is_empty() {
        let op = b.u8();
        let offset = u64::from(b.u16() & WINDOW);
        let value = b.u32();
        if op & 0x80 != 0 {
            host_action(&mut dev, value);
            continue;
        }
        let size = 1usize << ((op >> 1) & 3);
        let bytes = u64::from(value).to_le_bytes();
        if op & 1 != 0 {
            dev.write(offset, &bytes[..size]);
        } else {
            let mut out = [0u8; 8];
            dev.read(offset, &mut out[..size]);
        }
    }
    let used = |queue: u64| -> u16 {
        mem.read_obj(GuestAddress(USED_SEED + queue * USED_STRIDE + 2))
            .unwrap_or(0)
    };
    (discarded.load(Ordering::Relaxed), [used(0), used(1)])
}

fn host_action(dev: &mut VirtioMmio<Balloon>, value: u32) {
    match value & 3 {
        0 => {
            dev.device_mut().set_target(value >> 2);
            dev.config_changed();
        }
        1 => dev.device_mut().inhibit(),
        2 => {
            dev.device_mut().release();
        }
        _ => {
            // What a migration carries must load back as it was.
            let saved = dev.save();
            dev.restore(&saved)
                .expect("a saved balloon device restores");
            assert_eq!(dev.save(), saved);
        }
    }
}

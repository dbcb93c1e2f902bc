//! QEMU's pc-testdev, which kvm-unit-tests expects next to isa-debug-exit: a 4-byte scratch
//! register at 0xe0 (any width, read back as written), a "flush page" port at 0xe4 (the host
//! drops its mapping of that guest page, so the next access faults into KVM again), and 24 IRQ
//! line ports at 0x2000 (a write sets ISA/IOAPIC input N to the value's truth), and 64 KiB of
//! MMIO "iomem" at 0xff000000 that reads back what was written (every access exits, so the
//! guest's instructions on it go through KVM's emulator: kvm-unit-tests' emulator test).

use std::sync::Arc;

use crate::bus::{MmioDevice, PioDevice};

/// What the test device asks of the VMM.
pub trait TestDevHost: Send + Sync {
    /// Drives interrupt input `line` (GSI) high or low.
    fn set_irq_line(&self, line: u32, high: bool);
    /// Makes the host forget its mapping of the page at guest physical address `gpa`.
    fn flush_page(&self, gpa: u64);
}

/// Number of IRQ line ports (QEMU: one per IOAPIC input).
pub const IRQ_LINES: u16 = 24;

/// The scratch register at 0xe0.
#[derive(Default)]
pub struct TestDevData {
    value: u32,
}

impl PioDevice for TestDevData {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let bytes = self.value.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(usize::from(offset) + i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        let mut bytes = self.value.to_le_bytes();
        for (i, b) in data.iter().enumerate() {
            if let Some(slot) = bytes.get_mut(usize::from(offset) + i) {
                *slot = *b;
            }
        }
        self.value = u32::from_le_bytes(bytes);
    }
}

/// The flush-page port at 0xe4: a 32-bit write of a guest physical address.
pub struct TestDevFlush {
    host: Arc<dyn TestDevHost>,
}

impl TestDevFlush {
    pub fn new(host: Arc<dyn TestDevHost>) -> Self {
        TestDevFlush { host }
    }
}

impl PioDevice for TestDevFlush {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if offset == 0 && data.len() == 4 {
            let gpa = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.host.flush_page(u64::from(gpa));
        }
    }
}

/// The IRQ line ports at 0x2000..0x2018.
pub struct TestDevIrq {
    host: Arc<dyn TestDevHost>,
}

impl TestDevIrq {
    pub fn new(host: Arc<dyn TestDevHost>) -> Self {
        TestDevIrq { host }
    }
}

impl PioDevice for TestDevIrq {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if offset < IRQ_LINES {
            let high = data.iter().any(|b| *b != 0);
            self.host.set_irq_line(u32::from(offset), high);
        }
    }
}

/// Size of the iomem window.
pub const IOMEM_LEN: u64 = 0x10000;

/// The iomem window: plain bytes behind MMIO exits.
pub struct TestDevIoMem {
    bytes: Vec<u8>,
}

impl Default for TestDevIoMem {
    fn default() -> Self {
        TestDevIoMem {
            bytes: vec![0; IOMEM_LEN as usize],
        }
    }
}

impl TestDevIoMem {
    fn range(&self, offset: u64, len: usize) -> Option<std::ops::Range<usize>> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(len)?;
        (end <= self.bytes.len()).then_some(start..end)
    }
}

impl MmioDevice for TestDevIoMem {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.range(offset, data.len()) {
            Some(r) => data.copy_from_slice(&self.bytes[r]),
            None => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(r) = self.range(offset, data.len()) {
            self.bytes[r].copy_from_slice(data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl TestDevHost for Recorder {
        fn set_irq_line(&self, line: u32, high: bool) {
            self.0.lock().unwrap().push(format!("irq {line} {high}"));
        }
        fn flush_page(&self, gpa: u64) {
            self.0.lock().unwrap().push(format!("flush {gpa:#x}"));
        }
    }

    #[test]
    fn data_register_reads_back_any_width() {
        let mut d = TestDevData::default();
        d.write(0, &0x1234_5678u32.to_le_bytes());
        let mut b = [0u8; 1];
        d.read(3, &mut b);
        assert_eq!(b, [0x12]);
        d.write(1, &[0xab, 0xcd]);
        let mut w = [0u8; 4];
        d.read(0, &mut w);
        assert_eq!(u32::from_le_bytes(w), 0x12cd_ab78);
    }

    #[test]
    fn iomem_reads_back_and_ignores_out_of_range() {
        let mut m = TestDevIoMem::default();
        m.write(0x10, &[1, 2, 3, 4, 5, 6, 7, 8]);
        let mut q = [0u8; 8];
        m.read(0x10, &mut q);
        assert_eq!(q, [1, 2, 3, 4, 5, 6, 7, 8]);
        m.write(IOMEM_LEN - 2, &[9; 4]);
        m.read(IOMEM_LEN - 2, &mut q[..4]);
        assert_eq!(q[..4], [0; 4]);
    }

    #[test]
    fn irq_and_flush_ports_reach_the_host() {
        let host = Arc::new(Recorder::default());
        let mut irq = TestDevIrq::new(host.clone());
        irq.write(14, &[1]);
        irq.write(14, &[0]);
        irq.write(IRQ_LINES, &[1]);
        let mut flush = TestDevFlush::new(host.clone());
        flush.write(0, &0x40_1000u32.to_le_bytes());
        let log = host.0.lock().unwrap().clone();
        assert_eq!(log, ["irq 14 true", "irq 14 false", "flush 0x401000"]);
    }
}

//! A minimal QEMU fw_cfg (the legacy port interface): the guest writes a 16-bit key to the selector
//! port, then reads the item's bytes one at a time from the data port. kvm-unit-tests reads its CPU
//! count (key 0x05) and RAM size (0x03) this way. No DMA interface, no file directory, no writes.

use std::collections::BTreeMap;

use crate::bus::PioDevice;

/// Well-known keys (QEMU's `include/standard-headers/linux/qemu_fw_cfg.h`).
pub mod keys {
    pub const SIGNATURE: u16 = 0x00;
    pub const ID: u16 = 0x01;
    pub const RAM_SIZE: u16 = 0x03;
    pub const NB_CPUS: u16 = 0x05;
    pub const MAX_CPUS: u16 = 0x0f;
}

/// Port offsets inside the device's 2-port range (selector 0x510, data 0x511 on a PC).
const SELECTOR: u16 = 0;
const DATA: u16 = 1;

pub struct FwCfg {
    items: BTreeMap<u16, Vec<u8>>,
    selected: u16,
    offset: usize,
}

impl FwCfg {
    /// The items a PC guest expects: signature, interface ID 1 (port I/O only), CPU counts and RAM.
    pub fn new(cpus: u16, ram_size: u64) -> Self {
        let mut items = BTreeMap::new();
        items.insert(keys::SIGNATURE, b"QEMU".to_vec());
        items.insert(keys::ID, 1u32.to_le_bytes().to_vec());
        items.insert(keys::RAM_SIZE, ram_size.to_le_bytes().to_vec());
        items.insert(keys::NB_CPUS, cpus.to_le_bytes().to_vec());
        items.insert(keys::MAX_CPUS, cpus.to_le_bytes().to_vec());
        FwCfg {
            items,
            selected: 0,
            offset: 0,
        }
    }

    fn next_byte(&mut self) -> u8 {
        // Unknown keys and reads past an item's end give 0, as QEMU does.
        let byte = self
            .items
            .get(&self.selected)
            .and_then(|item| item.get(self.offset))
            .copied()
            .unwrap_or(0);
        self.offset = self.offset.saturating_add(1);
        byte
    }
}

impl PioDevice for FwCfg {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        match offset {
            // A wide read of the data port returns consecutive bytes (QEMU does the same).
            DATA => data.iter_mut().for_each(|b| *b = self.next_byte()),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if offset == SELECTOR {
            let lo = data.first().copied().unwrap_or(0);
            let hi = data.get(1).copied().unwrap_or(0);
            self.selected = u16::from_le_bytes([lo, hi]);
            self.offset = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_item(dev: &mut FwCfg, key: u16, len: usize) -> Vec<u8> {
        dev.write(SELECTOR, &key.to_le_bytes());
        let mut out = vec![0u8; len];
        for b in out.iter_mut() {
            let mut one = [0u8];
            dev.read(DATA, &mut one);
            *b = one[0];
        }
        out
    }

    #[test]
    fn reads_cpu_count_ram_and_signature() {
        let mut dev = FwCfg::new(3, 256 << 20);
        assert_eq!(read_item(&mut dev, keys::NB_CPUS, 2), vec![3, 0]);
        assert_eq!(read_item(&mut dev, keys::SIGNATURE, 4), b"QEMU".to_vec());
        let ram = read_item(&mut dev, keys::RAM_SIZE, 8);
        assert_eq!(ram, (256u64 << 20).to_le_bytes().to_vec());
    }

    #[test]
    fn unknown_keys_and_reads_past_the_end_are_zero() {
        let mut dev = FwCfg::new(1, 1 << 20);
        assert_eq!(read_item(&mut dev, 0x11, 8), vec![0; 8]);
        assert_eq!(read_item(&mut dev, keys::NB_CPUS, 4), vec![1, 0, 0, 0]);
    }

    #[test]
    fn selecting_restarts_the_item_and_wide_reads_stream() {
        let mut dev = FwCfg::new(2, 0);
        dev.write(SELECTOR, &[keys::SIGNATURE as u8]);
        let mut two = [0u8; 2];
        dev.read(DATA, &mut two);
        assert_eq!(&two, b"QE");
        dev.write(SELECTOR, &keys::SIGNATURE.to_le_bytes());
        dev.read(DATA, &mut two);
        assert_eq!(&two, b"QE");
    }
}

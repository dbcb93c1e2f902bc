//! Address buses: map port-I/O ranges and MMIO ranges to devices. One generic bus serves both;
//! only the address width differs.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on the port-I/O bus. `offset` is relative to the start of the device's range.
pub trait PioDevice: Send {
    fn read(&mut self, offset: u16, data: &mut [u8]);
    fn write(&mut self, offset: u16, data: &[u8]);
}

/// A device on the MMIO bus. `offset` is relative to the start of the device's range.
pub trait MmioDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("range {base:#x}+{len} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
    #[error("range {base:#x}+{len} is empty or wraps")]
    BadRange { base: u64, len: u64 },
}

/// Address ranges (base, len) to devices. Lookups happen on every exit, from every vCPU thread.
pub struct Bus<A, D: ?Sized> {
    ranges: BTreeMap<A, (A, Arc<Mutex<D>>)>,
}

pub type PioBus = Bus<u16, dyn PioDevice>;
pub type MmioBus = Bus<u64, dyn MmioDevice>;

impl<A, D: ?Sized> Default for Bus<A, D> {
    fn default() -> Self {
        Bus {
            ranges: BTreeMap::new(),
        }
    }
}

impl<A, D: ?Sized> Clone for Bus<A, D>
where
    A: Clone,
{
    fn clone(&self) -> Self {
        Bus {
            ranges: self.ranges.clone(),
        }
    }
}

impl<A, D: ?Sized> Bus<A, D>
where
    A: Copy + Ord + Into<u64> + std::ops::Sub<Output = A> + BusAddress,
{
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, base: A, len: A, device: Arc<Mutex<D>>) -> Result<(), BusError> {
        let (b, l) = (base.into(), len.into());
        // The range must be non-empty and fit the bus's own address width.
        let end = l
            .checked_sub(1)
            .and_then(|l| b.checked_add(l))
            .filter(|&e| A::fits(e))
            .ok_or(BusError::BadRange { base: b, len: l })?;
        let last = |start: A, len: A| start.into() + (len.into() - 1);
        let overlaps = self
            .ranges
            .range(..=base)
            .next_back()
            .is_some_and(|(&pb, &(pl, _))| last(pb, pl) >= b)
            || self
                .ranges
                .range(base..)
                .next()
                .is_some_and(|(&nb, _)| nb.into() <= end);
        if overlaps {
            return Err(BusError::Overlap { base: b, len: l });
        }
        self.ranges.insert(base, (len, device));
        Ok(())
    }

    fn find(&self, addr: A) -> Option<(A, &Arc<Mutex<D>>)> {
        let (&base, (len, dev)) = self.ranges.range(..=addr).next_back()?;
        (addr.into() - base.into() < (*len).into()).then_some((addr - base, dev))
    }
}

/// Address types a bus can use: whether an address fits the width.
pub trait BusAddress {
    fn fits(v: u64) -> bool;
}

impl BusAddress for u16 {
    fn fits(v: u64) -> bool {
        u16::try_from(v).is_ok()
    }
}

impl BusAddress for u64 {
    fn fits(_: u64) -> bool {
        true
    }
}

macro_rules! bus_access {
    ($addr:ty, $dev:ident) => {
        impl Bus<$addr, dyn $dev> {
            /// Reads from the device at `addr`; returns false (and all-ones data) when nothing is
            /// there.
            pub fn read(&self, addr: $addr, data: &mut [u8]) -> bool {
                match self.find(addr) {
                    Some((offset, dev)) => {
                        lock(dev).read(offset, data);
                        true
                    }
                    None => {
                        data.fill(0xff);
                        false
                    }
                }
            }

            /// Writes to the device at `addr`; returns false when nothing is there.
            pub fn write(&self, addr: $addr, data: &[u8]) -> bool {
                match self.find(addr) {
                    Some((offset, dev)) => {
                        lock(dev).write(offset, data);
                        true
                    }
                    None => false,
                }
            }
        }
    };
}

bus_access!(u16, PioDevice);
bus_access!(u64, MmioDevice);

/// Locks a device, recovering from a poisoned lock: a device's state is plain data, so a panic in
/// another thread must not take the whole VM down with it.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl PioDevice for Echo {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(self.0.wrapping_add(offset as u8));
        }
        fn write(&mut self, _offset: u16, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn routes_by_range_and_rejects_overlap() {
        let mut bus = PioBus::new();
        bus.insert(0x3f8, 8, Arc::new(Mutex::new(Echo(1)))).unwrap();
        assert_eq!(
            bus.insert(0x3fc, 8, Arc::new(Mutex::new(Echo(2)))),
            Err(BusError::Overlap {
                base: 0x3fc,
                len: 8
            })
        );
        assert!(bus.insert(0x400, 1, Arc::new(Mutex::new(Echo(2)))).is_ok());
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b[0], 3);
        assert!(bus.write(0x3f8, &[7]));
        assert!(bus.read(0x3f8, &mut b));
        assert_eq!(b[0], 7);
        assert!(!bus.read(0x3f7, &mut b));
        assert_eq!(b[0], 0xff);
        assert!(!bus.read(0x401, &mut b));
        assert_eq!(
            bus.insert(0xfff0, 0x20, Arc::new(Mutex::new(Echo(2)))),
            Err(BusError::BadRange {
                base: 0xfff0,
                len: 0x20
            })
        );
    }

    struct Reg(u64);
    impl MmioDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.copy_from_slice(&(self.0 + offset).to_le_bytes()[..data.len()]);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = u64::from(data[0]);
        }
    }

    #[test]
    fn mmio_ranges_route_and_an_overlap_from_below_is_refused() {
        let mut bus = MmioBus::new();
        bus.insert(0xd000_0000, 0x1000, Arc::new(Mutex::new(Reg(0))))
            .unwrap();
        // Starts below, reaches into the existing device.
        assert!(matches!(
            bus.insert(0xcfff_f000, 0x2000, Arc::new(Mutex::new(Reg(0)))),
            Err(BusError::Overlap { .. })
        ));
        assert!(bus.write(0xd000_0000, &[5]));
        let mut b = [0u8; 4];
        assert!(bus.read(0xd000_0010, &mut b));
        assert_eq!(u32::from_le_bytes(b), 0x15);
        assert!(!bus.read(0xd000_1000, &mut b));
        assert!(bus
            .insert(u64::MAX - 0xfff, 0x1000, Arc::new(Mutex::new(Reg(0))))
            .is_ok());
        assert!(bus.read(u64::MAX - 3, &mut b));
    }
}

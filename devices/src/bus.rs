//! A port-I/O bus: maps port ranges to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on the port-I/O bus. `offset` is relative to the start of the device's range.
pub trait PioDevice: Send {
    fn read(&mut self, offset: u16, data: &mut [u8]);
    fn write(&mut self, offset: u16, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("port range {base:#x}+{len} overlaps an existing device")]
    Overlap { base: u16, len: u16 },
    #[error("port range {base:#x}+{len} is empty or wraps")]
    BadRange { base: u16, len: u16 },
}

type SharedDevice = Arc<Mutex<dyn PioDevice>>;

/// Port ranges (base, len) to devices. Lookups happen on every port exit, from every vCPU thread.
#[derive(Default, Clone)]
pub struct PioBus {
    ranges: BTreeMap<u16, (u16, SharedDevice)>,
}

impl PioBus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, base: u16, len: u16, device: SharedDevice) -> Result<(), BusError> {
        let end = len.checked_sub(1).and_then(|l| base.checked_add(l));
        let Some(end) = end else {
            return Err(BusError::BadRange { base, len });
        };
        let overlaps = self
            .ranges
            .range(..=end)
            .next_back()
            .is_some_and(|(&b, &(l, _))| u32::from(b) + u32::from(l) > u32::from(base));
        if overlaps {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.insert(base, (len, device));
        Ok(())
    }

    fn find(&self, port: u16) -> Option<(u16, &SharedDevice)> {
        let (&base, (len, dev)) = self.ranges.range(..=port).next_back()?;
        (u32::from(port) < u32::from(base) + u32::from(*len)).then_some((port - base, dev))
    }

    /// Reads from the device at `port`; returns false (and all-ones data) when nothing is there.
    pub fn read(&self, port: u16, data: &mut [u8]) -> bool {
        match self.find(port) {
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

    /// Writes to the device at `port`; returns false when nothing is there.
    pub fn write(&self, port: u16, data: &[u8]) -> bool {
        match self.find(port) {
            Some((offset, dev)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

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
    }
}

//! Emulated devices and the buses that route guest port I/O and MMIO to them.
//!
//! Lock order: a vCPU thread holds at most one device lock at a time, taken by [`Bus`] for the
//! duration of one access; devices never take another device's lock.

pub mod boot_timer;
pub mod i8042;
pub mod serial;
pub mod virtio;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable through a [`Bus`].
pub trait BusDevice: Send {
    /// Guest reads `data.len()` bytes at `offset` into the range registered at `base`.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    /// Guest writes `data` at `offset` into the range registered at `base`.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

/// A device shared between the bus and its owner.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Two ranges on one bus overlap.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bus range {base:#x}+{len:#x} overlaps another device or is empty")]
pub struct BusOverlap {
    /// Start of the refused range.
    pub base: u64,
    /// Its length.
    pub len: u64,
}

struct BusRange {
    len: u64,
    device: SharedDevice,
}

/// An address space (port I/O or MMIO): non-overlapping ranges, each owned by one device.
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, BusRange>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Bus::default()
    }

    /// Routes `[base, base + len)` to `device`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusOverlap> {
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(BusOverlap { base, len })?;
        let before = self.ranges.range(..end).next_back();
        if let Some((b, r)) = before {
            if b + r.len > base {
                return Err(BusOverlap { base, len });
            }
        }
        self.ranges.insert(base, BusRange { len, device });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &BusRange)> {
        let (base, range) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset.checked_add(size as u64)? <= range.len).then_some((*base, range))
    }

    /// Dispatches a guest read. Returns `false` (and leaves `data` alone) if nothing is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((base, range)) => {
                lock(&range.device).read(base, addr - base, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a guest write. Returns `false` if nothing is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((base, range)) => {
                lock(&range.device).write(base, addr - base, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device; a poisoned lock (a panic elsewhere) still yields the device, since device
/// state stays consistent between accesses.
fn lock(device: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    struct Probe(Vec<(u64, u64, u8)>);
    impl BusDevice for Probe {
        fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.0.push((base, offset, data[0]));
        }
    }

    #[test]
    fn routes_and_refuses_overlaps() {
        let dev: SharedDevice = Arc::new(Mutex::new(Probe(Vec::new())));
        let mut bus = Bus::new();
        bus.insert(0x100, 0x10, dev.clone()).unwrap();
        assert!(bus.insert(0x10f, 1, dev.clone()).is_err());
        assert!(bus.insert(0xf8, 0x10, dev.clone()).is_err());
        assert!(bus.insert(0x200, 0, dev.clone()).is_err());
        assert!(bus.insert(u64::MAX, 2, dev.clone()).is_err());
        assert!(bus.insert(0x110, 1, dev.clone()).is_ok());
        let mut b = [0u8; 2];
        assert!(bus.read(0x104, &mut b));
        assert_eq!(b, [4, 4]);
        // An access that runs past the end of the range is not routed.
        assert!(!bus.read(0x10f, &mut b));
        assert!(!bus.write(0x0, &[1]));
        assert!(bus.write(0x101, &[7]));
    }
}

//! Emulated devices and the buses that route guest port I/O and MMIO to them.
//!
//! Lock order: a vCPU thread holds at most one device lock at a time, taken by [`Bus`] for the
//! duration of one access; devices never take another device's lock.

pub mod acpi_sleep;
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
    /// The device's state for a snapshot; `None`: it keeps none (a restored VM gets the
    /// device as built).
    fn save_state(&mut self) -> Option<serde_json::Value> {
        None
    }
    /// Takes back what [`BusDevice::save_state`] gave, or says why it cannot.
    fn restore_state(&mut self, _state: &serde_json::Value) -> Result<(), String> {
        Ok(())
    }
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
    /// Index of the owning device in [`Bus::device_ids`].
    index: usize,
    device: SharedDevice,
}

/// An address space (port I/O or MMIO): non-overlapping ranges, each owned by one device.
/// Devices are numbered in the order they were first inserted; a device with several ranges
/// keeps one index, so per-device statistics can live in fixed-size arrays.
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, BusRange>,
    ids: Vec<String>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Bus::default()
    }

    /// Routes `[base, base + len)` to `device`, known as `id`. Inserting the same device
    /// (the same `Arc`) again adds a range to it and keeps its index and first id.
    pub fn insert(
        &mut self,
        id: &str,
        base: u64,
        len: u64,
        device: SharedDevice,
    ) -> Result<(), BusOverlap> {
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(BusOverlap { base, len })?;
        let before = self.ranges.range(..end).next_back();
        if let Some((b, r)) = before {
            if b + r.len > base {
                return Err(BusOverlap { base, len });
            }
        }
        let known = self.ranges.values().find(|r| Arc::ptr_eq(&r.device, &device));
        let index = match known {
            Some(r) => r.index,
            None => {
                self.ids.push(id.to_owned());
                self.ids.len() - 1
            }
        };
        self.ranges.insert(base, BusRange { len, index, device });
        Ok(())
    }

    /// The ids of the devices on this bus, by device index.
    pub fn device_ids(&self) -> &[String] {
        &self.ids
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &BusRange)> {
        let (base, range) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset.checked_add(size as u64)? <= range.len).then_some((*base, range))
    }

    /// Dispatches a guest read. Returns the index of the device that answered, or `None` (and
    /// leaves `data` alone) if nothing is there.
    pub fn read_at(&self, addr: u64, data: &mut [u8]) -> Option<usize> {
        let (base, range) = self.find(addr, data.len())?;
        lock(&range.device).read(base, addr - base, data);
        Some(range.index)
    }

    /// Dispatches a guest write. Returns the index of the device that took it, or `None` if
    /// nothing is there.
    pub fn write_at(&self, addr: u64, data: &[u8]) -> Option<usize> {
        let (base, range) = self.find(addr, data.len())?;
        lock(&range.device).write(base, addr - base, data);
        Some(range.index)
    }

    /// Dispatches a guest read. Returns `false` (and leaves `data` alone) if nothing is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        self.read_at(addr, data).is_some()
    }

    /// Dispatches a guest write. Returns `false` if nothing is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        self.write_at(addr, data).is_some()
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
        bus.insert("probe", 0x100, 0x10, dev.clone()).unwrap();
        assert!(bus.insert("x", 0x10f, 1, dev.clone()).is_err());
        assert!(bus.insert("x", 0xf8, 0x10, dev.clone()).is_err());
        assert!(bus.insert("x", 0x200, 0, dev.clone()).is_err());
        assert!(bus.insert("x", u64::MAX, 2, dev.clone()).is_err());
        assert!(bus.insert("probe", 0x110, 1, dev.clone()).is_ok());
        let other: SharedDevice = Arc::new(Mutex::new(Probe(Vec::new())));
        bus.insert("other", 0x300, 1, other).unwrap();
        // One index per device, however many ranges it has.
        assert_eq!(bus.device_ids(), ["probe", "other"]);
        assert_eq!(bus.write_at(0x110, &[1]), Some(0));
        assert_eq!(bus.write_at(0x300, &[1]), Some(1));
        assert_eq!(bus.write_at(0x301, &[1]), None);
        let mut b = [0u8; 2];
        assert!(bus.read(0x104, &mut b));
        assert_eq!(b, [4, 4]);
        // An access that runs past the end of the range is not routed.
        assert!(!bus.read(0x10f, &mut b));
        assert!(!bus.write(0x0, &[1]));
        assert!(bus.write(0x101, &[7]));
    }
}

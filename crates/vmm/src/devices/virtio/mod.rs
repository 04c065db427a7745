//! Virtio devices on the MMIO transport.

pub mod block;
pub mod mmio;
pub mod rng;
pub mod vsock;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

/// Size of one virtio-mmio register window.
pub const MMIO_WINDOW_LEN: u64 = 0x1000;

/// A virtio device model, independent of its transport.
pub trait VirtioDevice: Send {
    /// The virtio device id (2 = block, 4 = entropy, ...).
    fn device_type(&self) -> u32;
    /// The maximum size of each of the device's queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers.
    fn offered_features(&self) -> u64;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Handles the buffers the driver made available on queue `index` (of `queues`, all the
    /// device's queues); returns whether any buffer was returned to the driver (so an interrupt
    /// may be due).
    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool;
    /// Handles work from the device's host-side backend (called from its event thread);
    /// `active` says whether the driver has set the device up, so queues may be used.
    fn process_backend(
        &mut self,
        _active: bool,
        _queues: &mut [Queue],
        _mem: &GuestMemoryMmap,
    ) -> bool {
        false
    }
}

/// Reads `data.len()` bytes of a config space held as bytes; out-of-range bytes read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}

/// Names of the feature bits in `features`, for the device manifest.
pub fn feature_names(device_type: u32, features: u64) -> Vec<String> {
    let mut names = Vec::new();
    for bit in 0..64u32 {
        if features & (1u64 << bit) == 0 {
            continue;
        }
        let name = match (device_type, bit) {
            (_, VIRTIO_F_VERSION_1) => "VIRTIO_F_VERSION_1".to_owned(),
            (block::DEVICE_TYPE, VIRTIO_BLK_F_RO) => "VIRTIO_BLK_F_RO".to_owned(),
            (block::DEVICE_TYPE, VIRTIO_BLK_F_FLUSH) => "VIRTIO_BLK_F_FLUSH".to_owned(),
            _ => format!("bit{bit}"),
        };
        names.push(name);
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_are_bounded() {
        let mut out = [0xffu8; 4];
        read_config_bytes(&[1, 2, 3], 1, &mut out);
        assert_eq!(out, [2, 3, 0, 0]);
        read_config_bytes(&[1, 2, 3], u64::MAX, &mut out);
        assert_eq!(out, [0; 4]);
    }

    #[test]
    fn names_features() {
        let f = (1u64 << 32) | (1 << 5) | (1 << 9);
        assert_eq!(
            feature_names(2, f),
            ["VIRTIO_BLK_F_RO", "VIRTIO_BLK_F_FLUSH", "VIRTIO_F_VERSION_1"]
        );
    }
}

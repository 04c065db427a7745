//! Virtio devices on the MMIO transport.

pub mod block;
pub mod mmio;
pub mod rng;
pub mod vsock;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

pub use isocell_vmm_model::devices::virtio::{feature_names, MMIO_WINDOW_LEN};

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
    fn model_feature_bits_match_virtio_bindings() {
        use isocell_vmm_model::devices::virtio as model;
        use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO};
        use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
        assert_eq!(model::VIRTIO_F_VERSION_1, VIRTIO_F_VERSION_1);
        assert_eq!(model::VIRTIO_BLK_F_RO, VIRTIO_BLK_F_RO);
        assert_eq!(model::VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_FLUSH);
    }
}

//! virtio-rng: device type, queue size and offered features.

use super::VIRTIO_F_VERSION_1;

/// virtio device id of an entropy device.
pub const DEVICE_TYPE: u32 = 4;
/// Size of the one request queue.
pub const QUEUE_SIZE: u16 = 256;

/// The feature bits the entropy device offers.
pub fn offered_features() -> u64 {
    1u64 << VIRTIO_F_VERSION_1
}

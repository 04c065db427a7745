//! virtio-vsock: device type, queue size and offered features.

use super::VIRTIO_F_VERSION_1;

/// virtio device id of a socket device.
pub const DEVICE_TYPE: u32 = 19;
/// Size of each of the three queues (receive, transmit, event).
pub const QUEUE_SIZE: u16 = 256;

/// The feature bits the socket device offers.
pub fn offered_features() -> u64 {
    1u64 << VIRTIO_F_VERSION_1
}

//! virtio-blk: device type, queue size and offered features.

use super::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_F_VERSION_1};

/// virtio device id of a block device.
pub const DEVICE_TYPE: u32 = 2;
/// Size of the one request queue.
pub const QUEUE_SIZE: u16 = 256;

/// The feature bits a block device offers.
pub fn offered_features(read_only: bool) -> u64 {
    let mut f = (1u64 << VIRTIO_F_VERSION_1) | (1u64 << VIRTIO_BLK_F_FLUSH);
    if read_only {
        f |= 1u64 << VIRTIO_BLK_F_RO;
    }
    f
}

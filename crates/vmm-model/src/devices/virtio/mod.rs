//! Virtio devices on the MMIO transport: window size, feature bits and their names.

pub mod block;
pub mod rng;
pub mod vsock;

/// Size of one virtio-mmio register window.
pub const MMIO_WINDOW_LEN: u64 = 0x1000;

/// Feature bit: the device follows virtio 1.0 or later (`VIRTIO_F_VERSION_1`).
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// Feature bit: the block device is read-only (`VIRTIO_BLK_F_RO`).
pub const VIRTIO_BLK_F_RO: u32 = 5;
/// Feature bit: the block device takes flush requests (`VIRTIO_BLK_F_FLUSH`).
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;

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
    fn names_features() {
        let f = (1u64 << 32) | (1 << 5) | (1 << 9);
        assert_eq!(
            feature_names(2, f),
            ["VIRTIO_BLK_F_RO", "VIRTIO_BLK_F_FLUSH", "VIRTIO_F_VERSION_1"]
        );
        assert_eq!(feature_names(rng::DEVICE_TYPE, f), ["bit5", "bit9", "VIRTIO_F_VERSION_1"]);
    }
}

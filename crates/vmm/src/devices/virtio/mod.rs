//! Virtio devices on the MMIO transport.

pub mod block;
pub mod mmio;
pub mod rng;
pub mod vsock;
pub mod worker;

use std::os::unix::io::RawFd;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};
use vm_memory::GuestMemoryMmap;

pub use isocell_vmm_model::devices::virtio::{feature_names, MMIO_WINDOW_LEN};

use crate::seccomp::ThreadKind;

/// A virtio device model, independent of its transport. It lives on its own worker thread
/// ([`worker`]); the transport on the vCPU threads only sees what [`DeviceInfo`] captured.
pub trait VirtioDevice: Send {
    /// Type, queue sizes, features and configuration space: fixed for the device's life.
    fn info(&self) -> DeviceInfo;
    /// The seccomp allow-list its worker thread runs under.
    fn thread_kind(&self) -> ThreadKind;
    /// The driver set `DRIVER_OK` with `features` accepted; queues may be used from now on.
    fn activate(&mut self, _features: u64) {}
    /// The driver reset the device: back to the state it was created in (connections dropped,
    /// nothing in flight), so that a driver can bind again.
    fn reset(&mut self);
    /// Handles the buffers the driver made available on queue `index` (of `queues`, all the
    /// device's queues); returns whether any buffer was returned to the driver (so an interrupt
    /// may be due).
    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool;
    /// A descriptor the worker waits on for host-side work, if the device has a backend.
    fn backend_fd(&self) -> Option<RawFd> {
        None
    }
    /// How long the worker may wait before calling [`VirtioDevice::process_backend`] even if
    /// nothing is ready (a timer of the device's own).
    fn backend_timeout(&self) -> Option<Duration> {
        None
    }
    /// Handles host-side work; `queues` is `None` while the driver has not set the device up.
    fn process_backend(&mut self, _queues: Option<&mut [Queue]>, _mem: &GuestMemoryMmap) -> bool {
        false
    }
    /// The device's own state, for a snapshot.
    fn save(&self) -> DeviceState;
    /// Takes back state saved by [`VirtioDevice::save`] from a device built for the same
    /// backing; refuses state of another kind or for another backing.
    fn restore(&mut self, state: &DeviceState) -> Result<(), RestoreError>;
}

/// What the transport needs to know of a device: it never changes while the device lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The virtio device id (2 = block, 4 = entropy, 19 = socket).
    pub device_type: u32,
    /// The maximum size of each queue.
    pub queue_max_sizes: Vec<u16>,
    /// Feature bits offered.
    pub offered_features: u64,
    /// The device-specific configuration space (read-only for every device here).
    pub config: Vec<u8>,
}

/// A device's saved state, by kind: plain serde data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DeviceState {
    /// virtio-blk: what the backing must still be.
    Block(block::BlockState),
    /// virtio-rng: nothing of its own.
    Rng,
    /// virtio-vsock: the guest's context id, the next host port, the guest's connections.
    Vsock(vsock::VsockState),
}

/// State that does not fit the device it is restored into.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RestoreError {
    /// Saved from another kind of device.
    #[error("saved state of a {saved} device cannot be restored into a {device} device")]
    Kind {
        /// The saved kind.
        saved: &'static str,
        /// The device's kind.
        device: &'static str,
    },
    /// The backing differs (another disk size, another context id, ...).
    #[error("saved state does not match the device: {0}")]
    Mismatch(String),
    /// A saved queue is not one this device can have.
    #[error("saved queue {0} is invalid: {1}")]
    Queue(usize, String),
}

impl DeviceState {
    /// The kind's name, for errors.
    pub fn kind_name(&self) -> &'static str {
        match self {
            DeviceState::Block(_) => "block",
            DeviceState::Rng => "rng",
            DeviceState::Vsock(_) => "vsock",
        }
    }
}

/// One virtqueue's state: its configuration and how far the device got in its rings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        QueueSnapshot {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
        }
    }
}

impl QueueSnapshot {
    /// The queue again; `virtio_queue` refuses sizes and a maximum it could not have made.
    pub fn to_queue(self) -> Result<Queue, virtio_queue::Error> {
        Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
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

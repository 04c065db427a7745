//! virtio-rng: fills the guest's buffers from the host's /dev/urandom.

use std::fs::File;
use std::io::Read;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::{DeviceInfo, DeviceState, RestoreError, VirtioDevice};
use crate::seccomp::ThreadKind;

pub use isocell_vmm_model::devices::virtio::rng::{offered_features, DEVICE_TYPE, QUEUE_SIZE};
/// At most this many bytes per request, however large the guest's buffers are.
const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;

/// A virtio entropy device.
pub struct Rng {
    source: File,
    buffer: Vec<u8>,
}

impl Rng {
    /// Opens the host's entropy source.
    pub fn new() -> std::io::Result<Self> {
        Ok(Rng::with_source(File::open("/dev/urandom")?))
    }

    /// A device that answers from `source` (the fuzz targets use /dev/zero).
    pub(crate) fn with_source(source: File) -> Self {
        Rng { source, buffer: vec![0; MAX_BYTES_PER_REQUEST] }
    }
}

impl VirtioDevice for Rng {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            device_type: DEVICE_TYPE,
            queue_max_sizes: vec![QUEUE_SIZE],
            offered_features: offered_features(),
            config: Vec::new(),
        }
    }

    fn thread_kind(&self) -> ThreadKind {
        ThreadKind::VirtioRng
    }

    fn reset(&mut self) {
        // Stateless: each request is answered whole.
    }

    fn save(&self) -> DeviceState {
        DeviceState::Rng
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), RestoreError> {
        match state {
            DeviceState::Rng => Ok(()),
            other => Err(RestoreError::Kind { saved: other.kind_name(), device: "rng" }),
        }
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        let Some(queue) = queues.get_mut(index) else { return false };
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let mut total = 0usize;
            for d in chain.filter(|d| d.is_write_only()) {
                let n = (d.len() as usize).min(MAX_BYTES_PER_REQUEST - total);
                if n == 0 {
                    break;
                }
                let buf = &mut self.buffer[..n];
                if self.source.read_exact(buf).is_err() || mem.write_slice(buf, d.addr()).is_err() {
                    break;
                }
                total += n;
            }
            if queue.add_used(mem, head, total as u32).is_err() {
                break;
            }
            used = true;
        }
        used
    }
}

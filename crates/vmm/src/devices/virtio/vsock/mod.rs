//! virtio-vsock: the guest's stream sockets to the host, carried by Unix sockets on the host
//! (see [`muxer`]). Everything runs on the device's worker: queue notifies, and the host sockets
//! (the muxer's epoll set is the worker's backend descriptor).

pub mod muxer;

use std::os::unix::io::RawFd;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::GuestMemoryMmap;

use super::{DeviceInfo, DeviceState, RestoreError, VirtioDevice};
use crate::seccomp::ThreadKind;
use muxer::{Header, Muxer, SavedConnection};

pub use isocell_vmm_model::devices::virtio::vsock::{offered_features, DEVICE_TYPE, QUEUE_SIZE};
/// Largest payload of one packet, either way (the Linux driver sends at most 64 KiB).
const MAX_PKT_DATA: u32 = 64 * 1024;
const RX: usize = 0;
const TX: usize = 1;

/// A virtio socket device.
pub struct Vsock {
    guest_cid: u64,
    muxer: Muxer,
    buf: Vec<u8>,
}

/// A vsock device's saved state. The host sockets cannot be saved, but a snapshot is taken at
/// a quiet point, when the only connections are idle ones the guest opened (its agent's): each
/// is saved with its counters and, on restore, connected to the new host's listener on the
/// same port, so the guest's socket goes on as it was (no transport reset, no new dial).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// The guest's context id.
    pub guest_cid: u64,
    /// The next host-side port for host-initiated connections.
    pub next_local_port: u32,
    /// The guest's connections.
    pub connections: Vec<SavedConnection>,
    /// Why the device could not be saved faithfully (a busy connection, a packet owed to the
    /// guest): such a state is never restored, and the VMM refuses to write the snapshot.
    pub busy: Option<String>,
}

impl Vsock {
    /// A device for a guest with context id `guest_cid`, listening for host connections at
    /// `uds_path`.
    pub fn new(guest_cid: u64, uds_path: &std::path::Path) -> std::io::Result<Self> {
        Ok(Vsock {
            guest_cid,
            muxer: Muxer::new(guest_cid, uds_path)?,
            buf: vec![0; MAX_PKT_DATA as usize],
        })
    }

    fn process_tx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while let Some(mut chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            // A malformed chain is returned unread: the packet is lost, only to its sender.
            if let Ok(pkt) = VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                let len = match pkt.data_slice() {
                    Some(data) => data.len().min(self.buf.len()),
                    None => 0,
                };
                let copied = match pkt.data_slice() {
                    Some(data) => data.copy_to(&mut self.buf[..len]),
                    None => 0,
                };
                let h = Header {
                    src_cid: pkt.src_cid(),
                    dst_cid: pkt.dst_cid(),
                    src_port: pkt.src_port(),
                    dst_port: pkt.dst_port(),
                    len: pkt.len(),
                    type_: pkt.type_(),
                    op: pkt.op(),
                    flags: pkt.flags(),
                    buf_alloc: pkt.buf_alloc(),
                    fwd_cnt: pkt.fwd_cnt(),
                };
                self.muxer.guest_packet(&h, &self.buf[..copied]);
            }
            if queue.add_used(mem, head, 0).is_err() {
                break;
            }
            used = true;
        }
        used
    }

    fn fill_rx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while self.muxer.has_packet() {
            let Some(mut chain) = queue.pop_descriptor_chain(mem) else { break };
            let head = chain.head_index();
            let written = match VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                Ok(mut pkt) => {
                    let room = pkt.data_slice().map_or(0, |d| d.len()).min(self.buf.len());
                    let Some(h) = self.muxer.next_packet(&mut self.buf[..room]) else {
                        // Nothing after all (the host socket had no data): keep the buffer.
                        queue.go_to_previous_position();
                        break;
                    };
                    let len = (h.len as usize).min(room);
                    if let Some(data) = pkt.data_slice() {
                        data.copy_from(&self.buf[..len]);
                    }
                    pkt.set_src_cid(h.src_cid)
                        .set_dst_cid(h.dst_cid)
                        .set_src_port(h.src_port)
                        .set_dst_port(h.dst_port)
                        .set_len(len as u32)
                        .set_type(h.type_)
                        .set_op(h.op)
                        .set_flags(h.flags)
                        .set_buf_alloc(h.buf_alloc)
                        .set_fwd_cnt(h.fwd_cnt);
                    (PKT_HEADER_SIZE + len) as u32
                }
                // A receive buffer the device cannot use is handed back empty.
                Err(_) => 0,
            };
            if queue.add_used(mem, head, written).is_err() {
                break;
            }
            used = true;
        }
        used
    }
}

impl VirtioDevice for Vsock {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            device_type: DEVICE_TYPE,
            queue_max_sizes: vec![QUEUE_SIZE; 3],
            offered_features: offered_features(),
            config: self.guest_cid.to_le_bytes().to_vec(),
        }
    }

    fn thread_kind(&self) -> ThreadKind {
        ThreadKind::VirtioVsock
    }

    fn reset(&mut self) {
        // The driver's sockets are gone with its reset; so are ours.
        self.muxer.clear();
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        if index == TX {
            if let Some(q) = queues.get_mut(TX) {
                used |= self.process_tx(q, mem);
            }
        }
        // Whatever the guest did may have produced replies, or given us receive buffers.
        if let Some(q) = queues.get_mut(RX).filter(|q| q.ready()) {
            used |= self.fill_rx(q, mem);
        }
        used
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.muxer.epoll_fd())
    }

    fn backend_timeout(&self) -> Option<Duration> {
        self.muxer.next_deadline()
    }

    fn process_backend(&mut self, queues: Option<&mut [Queue]>, mem: &GuestMemoryMmap) -> bool {
        self.muxer.poll();
        let Some(queues) = queues else { return false };
        match queues.get_mut(RX).filter(|q| q.ready()) {
            Some(q) => self.fill_rx(q, mem),
            None => false,
        }
    }

    fn save(&self) -> DeviceState {
        let (connections, busy) = match self.muxer.save_connections() {
            Ok(c) => (c, None),
            Err(why) => (Vec::new(), Some(why)),
        };
        DeviceState::Vsock(VsockState {
            guest_cid: self.guest_cid,
            next_local_port: self.muxer.next_local_port(),
            connections,
            busy,
        })
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), RestoreError> {
        let DeviceState::Vsock(saved) = state else {
            return Err(RestoreError::Kind { saved: state.kind_name(), device: "vsock" });
        };
        if saved.guest_cid != self.guest_cid {
            return Err(RestoreError::Mismatch(format!(
                "saved for guest cid {}, the device has {}",
                saved.guest_cid, self.guest_cid
            )));
        }
        if let Some(why) = &saved.busy {
            return Err(RestoreError::Mismatch(format!("saved while busy: {why}")));
        }
        self.muxer.clear();
        self.muxer.set_next_local_port(saved.next_local_port);
        self.muxer.restore_connections(&saved.connections).map_err(RestoreError::Mismatch)
    }
}

//! virtio-vsock: the guest's stream sockets to the host, carried by Unix sockets on the host
//! (see [`muxer`]). Everything runs on the device's worker: queue notifies, and the host sockets
//! (the muxer's epoll set is the worker's backend descriptor).

pub mod muxer;

use std::os::unix::io::RawFd;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::{DeviceInfo, DeviceState, RestoreError, VirtioDevice};
use crate::seccomp::ThreadKind;
use muxer::{Header, Muxer};

pub use isocell_vmm_model::devices::virtio::vsock::{offered_features, DEVICE_TYPE, QUEUE_SIZE};
/// Largest payload of one packet, either way (the Linux driver sends at most 64 KiB).
const MAX_PKT_DATA: u32 = 64 * 1024;
const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`: the guest's connections are gone (after a restore).
const EVENT_TRANSPORT_RESET: u32 = 0;

/// A virtio socket device.
pub struct Vsock {
    guest_cid: u64,
    muxer: Muxer,
    buf: Vec<u8>,
    /// A transport-reset event is owed to the guest (its connections did not survive a restore).
    reset_event_due: bool,
}

/// A vsock device's saved state. Connections are host sockets, which a snapshot cannot hold:
/// a restored device has none and tells the guest so with a transport-reset event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// The guest's context id.
    pub guest_cid: u64,
    /// The next host-side port for host-initiated connections.
    pub next_local_port: u32,
}

impl Vsock {
    /// A device for a guest with context id `guest_cid`, listening for host connections at
    /// `uds_path`.
    pub fn new(guest_cid: u64, uds_path: &std::path::Path) -> std::io::Result<Self> {
        Ok(Vsock {
            guest_cid,
            muxer: Muxer::new(guest_cid, uds_path)?,
            buf: vec![0; MAX_PKT_DATA as usize],
            reset_event_due: false,
        })
    }

    /// Sends the owed transport-reset event, if the guest gave a buffer for it.
    fn send_reset_event(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        let Some(q) = queues.get_mut(EVENT).filter(|q| self.reset_event_due && q.ready()) else {
            return false;
        };
        let Some(chain) = q.pop_descriptor_chain(mem) else { return false };
        let head = chain.head_index();
        let event = EVENT_TRANSPORT_RESET.to_le_bytes();
        let written = chain
            .filter(|d| d.is_write_only() && d.len() >= 4)
            .take(1)
            .map(|d| mem.write_slice(&event, d.addr()).is_ok())
            .next()
            .unwrap_or(false);
        self.reset_event_due = false;
        q.add_used(mem, head, if written { 4 } else { 0 }).is_ok()
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
        self.reset_event_due = false;
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        if index == TX {
            if let Some(q) = queues.get_mut(TX) {
                used |= self.process_tx(q, mem);
            }
        }
        used |= self.send_reset_event(queues, mem);
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
        let mut used = self.send_reset_event(queues, mem);
        if let Some(q) = queues.get_mut(RX).filter(|q| q.ready()) {
            used |= self.fill_rx(q, mem);
        }
        used
    }

    fn save(&self) -> DeviceState {
        DeviceState::Vsock(VsockState {
            guest_cid: self.guest_cid,
            next_local_port: self.muxer.next_local_port(),
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
        self.muxer.clear();
        self.muxer.set_next_local_port(saved.next_local_port);
        self.reset_event_due = true;
        Ok(())
    }
}

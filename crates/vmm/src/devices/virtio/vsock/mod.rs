//! virtio-vsock: the guest's stream sockets to the host, carried by Unix sockets on the host
//! (see [`muxer`]). Queue work triggered by the guest runs on the vCPU thread that notified; work
//! triggered by the host sockets runs on the device's own event thread. Both take the transport's
//! lock, so the device is never entered twice at once.

pub mod muxer;

use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{Epoll, EpollEvent};

use super::mmio::MmioTransport;
use super::{read_config_bytes, VirtioDevice};
use muxer::{Header, Muxer};

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

    /// The epoll set of the host sockets, for the event thread.
    pub fn epoll(&self) -> Arc<Epoll> {
        self.muxer.epoll()
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
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn offered_features(&self) -> u64 {
        offered_features()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
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

    fn process_backend(
        &mut self,
        active: bool,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> bool {
        self.muxer.poll();
        match queues.get_mut(RX).filter(|q| active && q.ready()) {
            Some(q) => self.fill_rx(q, mem),
            None => false,
        }
    }
}

/// Starts the thread that waits on the host sockets and lets the device act on them.
pub fn spawn_event_thread(
    transport: Arc<Mutex<MmioTransport>>,
    epoll: Arc<Epoll>,
) -> std::io::Result<()> {
    let (installed_tx, installed) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new().name("vsock".into()).spawn(move || {
        // The filter is in place before this thread touches anything the guest controls.
        let installed = crate::seccomp::install(crate::seccomp::ThreadKind::Vsock);
        let failed = installed.is_err();
        let _ = installed_tx.send(installed);
        if failed {
            return;
        }
        let mut events = [EpollEvent::default(); 1];
        loop {
            match epoll.wait(-1, &mut events) {
                Ok(_) => transport.lock().unwrap_or_else(|p| p.into_inner()).process_backend(),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    })?;
    match installed.recv() {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(std::io::Error::other(format!("vsock thread: {e}"))),
        Err(_) => Err(std::io::Error::other("the vsock thread ended before installing its filter")),
    }
}

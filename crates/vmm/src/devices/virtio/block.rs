//! virtio-blk backed by a raw image file: read, write (unless read-only), flush, get-id.
//! Every request is checked against the descriptor layout and the disk's capacity; a malformed
//! request fails that request only.

use std::fs::File;
use std::os::unix::fs::FileExt;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use serde::{Deserialize, Serialize};

use super::{DeviceInfo, DeviceState, RestoreError, VirtioDevice};
use crate::seccomp::ThreadKind;

pub use isocell_vmm_model::devices::virtio::block::{offered_features, DEVICE_TYPE, QUEUE_SIZE};
/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
const HEADER_LEN: u32 = 16;
/// Bounce buffer for file I/O; requests are copied through it in chunks of this size.
const CHUNK: usize = 64 * 1024;

/// A virtio-blk device.
pub struct Block {
    id: String,
    file: File,
    read_only: bool,
    capacity: u64,
    config: [u8; 8],
    buffer: Vec<u8>,
}

/// Any failure while moving data becomes an I/O error status for the guest.
fn io_error<E>(_: E) -> RequestError {
    RequestError::Status(VIRTIO_BLK_S_IOERR)
}

/// Which way a data transfer goes.
#[derive(Clone, Copy)]
enum Direction {
    DiskToGuest,
    GuestToDisk,
}

/// Why one request failed; the guest sees only the status byte.
#[derive(Debug)]
enum RequestError {
    /// Not even a status descriptor to report through.
    Malformed,
    /// Report `status` to the guest.
    Status(u32),
}

impl Block {
    /// A device for `file` (already opened read-only or read-write as `read_only` says).
    pub fn new(id: String, file: File, read_only: bool) -> std::io::Result<Self> {
        let len = file.metadata()?.len();
        let capacity = len - len % SECTOR_SIZE;
        Ok(Block {
            id,
            file,
            read_only,
            capacity,
            config: (capacity / SECTOR_SIZE).to_le_bytes(),
            buffer: vec![0; CHUNK],
        })
    }

    /// Makes written data durable; called when the VM stops.
    pub fn flush(&self) -> std::io::Result<()> {
        if self.read_only {
            Ok(())
        } else {
            self.file.sync_data()
        }
    }

    fn disk_range(&self, sector: u64, done: u64, len: u32) -> Result<u64, RequestError> {
        let start = sector
            .checked_mul(SECTOR_SIZE)
            .and_then(|s| s.checked_add(done))
            .ok_or(RequestError::Status(VIRTIO_BLK_S_IOERR))?;
        let end =
            start.checked_add(u64::from(len)).ok_or(RequestError::Status(VIRTIO_BLK_S_IOERR))?;
        if end > self.capacity {
            return Err(RequestError::Status(VIRTIO_BLK_S_IOERR));
        }
        Ok(start)
    }

    /// Copies `len` bytes between the disk at `offset` and guest memory at `addr`, through
    /// the bounce buffer.
    fn copy(
        &mut self,
        mem: &GuestMemoryMmap,
        direction: Direction,
        offset: u64,
        addr: GuestAddress,
        len: u32,
    ) -> Result<(), RequestError> {
        let len = len as usize;
        let mut done = 0usize;
        while done < len {
            let n = (len - done).min(CHUNK);
            let buf = &mut self.buffer[..n];
            let disk_at = offset + done as u64;
            let guest_at =
                addr.0.checked_add(done as u64).ok_or(RequestError::Status(VIRTIO_BLK_S_IOERR))?;
            match direction {
                Direction::DiskToGuest => {
                    self.file.read_exact_at(buf, disk_at).map_err(io_error)?;
                    mem.write_slice(buf, GuestAddress(guest_at)).map_err(io_error)?;
                }
                Direction::GuestToDisk => {
                    mem.read_slice(buf, GuestAddress(guest_at)).map_err(io_error)?;
                    self.file.write_all_at(buf, disk_at).map_err(io_error)?;
                }
            }
            done += n;
        }
        Ok(())
    }

    /// Executes one request; returns the number of bytes written into guest buffers.
    fn execute(
        &mut self,
        mem: &GuestMemoryMmap,
        header: [u8; 16],
        data: &[Descriptor],
    ) -> Result<u32, RequestError> {
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector_bytes = [0u8; 8];
        sector_bytes.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector_bytes);
        let ioerr = RequestError::Status(VIRTIO_BLK_S_IOERR);
        match kind {
            VIRTIO_BLK_T_IN => {
                let mut done = 0u64;
                for d in data {
                    if !d.is_write_only() {
                        return Err(ioerr);
                    }
                    let offset = self.disk_range(sector, done, d.len())?;
                    self.copy(mem, Direction::DiskToGuest, offset, d.addr(), d.len())?;
                    done += u64::from(d.len());
                }
                u32::try_from(done).map_err(|_| RequestError::Status(VIRTIO_BLK_S_IOERR))
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    return Err(ioerr);
                }
                let mut done = 0u64;
                for d in data {
                    if d.is_write_only() {
                        return Err(ioerr);
                    }
                    let offset = self.disk_range(sector, done, d.len())?;
                    self.copy(mem, Direction::GuestToDisk, offset, d.addr(), d.len())?;
                    done += u64::from(d.len());
                }
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => self.flush().map(|_| 0).map_err(|_| ioerr),
            VIRTIO_BLK_T_GET_ID => {
                let d = data.first().filter(|d| d.is_write_only()).ok_or(ioerr)?;
                let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
                let n = self.id.len().min(id.len());
                id[..n].copy_from_slice(&self.id.as_bytes()[..n]);
                let len = (d.len() as usize).min(id.len());
                mem.write_slice(&id[..len], d.addr())
                    .map_err(|_| RequestError::Status(VIRTIO_BLK_S_IOERR))?;
                Ok(len as u32)
            }
            _ => Err(RequestError::Status(VIRTIO_BLK_S_UNSUPP)),
        }
    }

    /// Parses and executes one descriptor chain; returns the used length.
    fn handle_chain(&mut self, mem: &GuestMemoryMmap, descs: &[Descriptor]) -> u32 {
        let (Some(head), Some(status)) = (descs.first(), descs.last()) else { return 0 };
        if descs.len() < 2 || !status.is_write_only() || status.len() < 1 {
            return 0;
        }
        let header = if head.is_write_only() || head.len() < HEADER_LEN {
            Err(RequestError::Malformed)
        } else {
            mem.read_obj::<[u8; 16]>(head.addr()).map_err(|_| RequestError::Malformed)
        };
        let result = header.and_then(|h| self.execute(mem, h, &descs[1..descs.len() - 1]));
        let (code, written) = match result {
            Ok(n) => (VIRTIO_BLK_S_OK, n),
            Err(RequestError::Status(s)) => (s, 0),
            Err(RequestError::Malformed) => (VIRTIO_BLK_S_IOERR, 0),
        };
        match mem.write_obj(code as u8, status.addr()) {
            Ok(()) => written.saturating_add(1),
            Err(_) => 0,
        }
    }
}

/// What a block device's backing must still be when its state is restored (requests are
/// carried out whole on the worker, so none is ever in flight at a save).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// The id the guest reads with GET_ID.
    pub id: String,
    /// Usable bytes of the image.
    pub capacity: u64,
    /// Whether writes are refused.
    pub read_only: bool,
}

impl VirtioDevice for Block {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            device_type: DEVICE_TYPE,
            queue_max_sizes: vec![QUEUE_SIZE],
            offered_features: offered_features(self.read_only),
            config: self.config.to_vec(),
        }
    }

    fn thread_kind(&self) -> ThreadKind {
        ThreadKind::VirtioBlock
    }

    fn reset(&mut self) {
        // Nothing is kept between requests: every request completes before the next is taken.
    }

    fn save(&self) -> DeviceState {
        DeviceState::Block(BlockState {
            id: self.id.clone(),
            capacity: self.capacity,
            read_only: self.read_only,
        })
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), RestoreError> {
        let DeviceState::Block(saved) = state else {
            return Err(RestoreError::Kind { saved: state.kind_name(), device: "block" });
        };
        let current =
            BlockState { id: self.id.clone(), capacity: self.capacity, read_only: self.read_only };
        if *saved != current {
            return Err(RestoreError::Mismatch(format!(
                "saved for {saved:?}, the disk is {current:?}"
            )));
        }
        Ok(())
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        let Some(queue) = queues.get_mut(index) else { return false };
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let descs: Vec<Descriptor> = chain.collect();
            let len = self.handle_chain(mem, &descs);
            if queue.add_used(mem, head, len).is_err() {
                break;
            }
            used = true;
        }
        used
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::io::Write;

    use virtio_bindings::virtio_blk::VIRTIO_BLK_F_RO;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    use super::*;

    const VRING_DESC_F_NEXT: u16 = 1;
    const VRING_DESC_F_WRITE: u16 = 2;

    fn disk(bytes: &[u8], read_only: bool) -> Block {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("isocell-blk-{}-{n}", std::process::id()));
        File::create(&path).unwrap().write_all(bytes).unwrap();
        let file = std::fs::OpenOptions::new().read(true).write(!read_only).open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        Block::new("disk0".into(), file, read_only).unwrap()
    }

    /// Places a request (header, data buffers, status) on a mock queue and runs the device.
    fn run(
        blk: &mut Block,
        kind: u32,
        sector: u64,
        data: &[(u32, bool)],
    ) -> (GuestMemoryMmap, Vec<GuestAddress>, u8) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&kind.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&header, GuestAddress(0x10000)).unwrap();
        let mut descs =
            vec![RawDescriptor::from(Descriptor::new(0x10000, 16, VRING_DESC_F_NEXT, 1))];
        let mut addrs = Vec::new();
        for (i, (len, write)) in data.iter().enumerate() {
            let addr = 0x20000 + 0x10000 * i as u64;
            addrs.push(GuestAddress(addr));
            let flags = VRING_DESC_F_NEXT | if *write { VRING_DESC_F_WRITE } else { 0 };
            descs.push(RawDescriptor::from(Descriptor::new(addr, *len, flags, (i + 2) as u16)));
        }
        descs.push(RawDescriptor::from(Descriptor::new(0xf0000, 1, VRING_DESC_F_WRITE, 0)));
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(blk.process_queue(0, std::slice::from_mut(&mut q), &mem));
        let status: u8 = mem.read_obj(GuestAddress(0xf0000)).unwrap();
        (mem, addrs, status)
    }

    #[test]
    fn reads_and_writes_sectors() {
        let mut image = vec![0u8; 4096];
        image[512..1024].fill(0xab);
        let mut blk = disk(&image, false);
        let (mem, addrs, status) = run(&mut blk, VIRTIO_BLK_T_IN, 1, &[(512, true)]);
        assert_eq!(status as u32, VIRTIO_BLK_S_OK);
        let mut got = [0u8; 512];
        mem.read_slice(&mut got, addrs[0]).unwrap();
        assert!(got.iter().all(|b| *b == 0xab));

        let (_, _, status) = run(&mut blk, VIRTIO_BLK_T_OUT, 7, &[(512, false)]);
        assert_eq!(status as u32, VIRTIO_BLK_S_OK);
        let (_, _, status) = run(&mut blk, VIRTIO_BLK_T_FLUSH, 0, &[]);
        assert_eq!(status as u32, VIRTIO_BLK_S_OK);
    }

    #[test]
    fn refuses_out_of_range_and_read_only_writes() {
        let mut blk = disk(&[0u8; 4096], true);
        assert_ne!(blk.info().offered_features & (1 << VIRTIO_BLK_F_RO), 0);
        let (_, _, status) = run(&mut blk, VIRTIO_BLK_T_OUT, 0, &[(512, false)]);
        assert_eq!(status as u32, VIRTIO_BLK_S_IOERR);
        let (_, _, status) = run(&mut blk, VIRTIO_BLK_T_IN, 8, &[(512, true)]);
        assert_eq!(status as u32, VIRTIO_BLK_S_IOERR);
        let (_, _, status) = run(&mut blk, VIRTIO_BLK_T_IN, u64::MAX / 2, &[(512, true)]);
        assert_eq!(status as u32, VIRTIO_BLK_S_IOERR);
        let (_, _, status) = run(&mut blk, 99, 0, &[]);
        assert_eq!(status as u32, VIRTIO_BLK_S_UNSUPP);
        // A read into a buffer the device may not write.
        let (_, _, status) = run(&mut blk, VIRTIO_BLK_T_IN, 0, &[(512, false)]);
        assert_eq!(status as u32, VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn reports_id_and_capacity() {
        let mut blk = disk(&[0u8; 4096 + 100], true);
        assert_eq!(blk.info().config, 8u64.to_le_bytes());
        let (mem, addrs, status) = run(&mut blk, VIRTIO_BLK_T_GET_ID, 0, &[(20, true)]);
        assert_eq!(status as u32, VIRTIO_BLK_S_OK);
        let mut id = [0u8; 5];
        mem.read_slice(&mut id, addrs[0]).unwrap();
        assert_eq!(&id, b"disk0");
    }
}

//! Entry points for fuzzing what a guest controls. Each takes arbitrary bytes, builds a small
//! guest memory from them, lays out virtqueues (descriptor tables, available rings, chained and
//! indirect descriptors, addresses and lengths pointing anywhere, including outside guest
//! memory), and drives the real device code through its virtio-mmio transport, exactly as a
//! vCPU thread does when the guest writes `QueueNotify`.
//!
//! The cargo-fuzz targets in `crates/vmm/fuzz` call these functions; so do the unit tests below,
//! which replay every input saved in `crates/*/fuzz/regressions/` and run random inputs, so
//! plain `cargo test` keeps exercising them. None of them may panic, whatever the input.
//!
//! Guest memory: region 0 is `[0, 0x10000)`, region 1 is `[0x20000, 0x24000)`; between them is a
//! hole. Queue A's rings sit at 0x0 (descriptors), 0x1000 (available) and 0x2000 (used), queue
//! B's at 0x3000, 0x4000 and 0x5000, and whatever the input has left after the queue layout is
//! copied to the data area at 0x6000 (request headers, vsock headers, indirect tables).

use std::fs::File;
use std::os::unix::io::FromRawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::VirtioDevice;
use crate::devices::BusDevice;

/// A fuzz entry point.
pub type EntryPoint = fn(&[u8]);

/// Every fuzz entry point, by the name of its cargo-fuzz target.
pub const TARGETS: &[(&str, EntryPoint)] = &[
    ("block_queue", block_queue),
    ("rng_queue", rng_queue),
    ("vsock_queue", vsock_queue),
    ("mmio_registers", mmio_registers),
];

const REGION0: (u64, usize) = (0, 0x10000);
const REGION1: (u64, usize) = (0x20000, 0x4000);
/// Where queue A's and queue B's rings start (descriptors; available ring +0x1000, used +0x2000).
const QUEUE_A: u64 = 0x0;
const QUEUE_B: u64 = 0x3000;
/// The data area: the rest of the input lands here.
const DATA: u64 = 0x6000;
/// Size of the block device's backing file (128 sectors).
const DISK_LEN: u64 = 64 * 1024;
/// The guest context id of the fuzzed vsock device.
const GUEST_CID: u64 = 3;
/// Host port with a listening socket behind it when the input asks for one.
const LISTENING_PORT: u32 = 1024;

// Descriptor flags as the descriptor's 16-bit field holds them (the bindings' are u32).
const VRING_DESC_F_NEXT: u16 = virtio_ring::VRING_DESC_F_NEXT as u16;
const VRING_DESC_F_WRITE: u16 = virtio_ring::VRING_DESC_F_WRITE as u16;
const VRING_DESC_F_INDIRECT: u16 = virtio_ring::VRING_DESC_F_INDIRECT as u16;

/// The transport's registers, so the fuzzer reaches them with one byte.
const REGISTERS: [u32; 24] = [
    VIRTIO_MMIO_MAGIC_VALUE,
    VIRTIO_MMIO_VERSION,
    VIRTIO_MMIO_DEVICE_ID,
    VIRTIO_MMIO_VENDOR_ID,
    VIRTIO_MMIO_DEVICE_FEATURES,
    VIRTIO_MMIO_DEVICE_FEATURES_SEL,
    VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL,
    VIRTIO_MMIO_QUEUE_SEL,
    VIRTIO_MMIO_QUEUE_NUM_MAX,
    VIRTIO_MMIO_QUEUE_NUM,
    VIRTIO_MMIO_QUEUE_READY,
    VIRTIO_MMIO_QUEUE_NOTIFY,
    VIRTIO_MMIO_INTERRUPT_STATUS,
    VIRTIO_MMIO_INTERRUPT_ACK,
    VIRTIO_MMIO_STATUS,
    VIRTIO_MMIO_QUEUE_DESC_LOW,
    VIRTIO_MMIO_QUEUE_DESC_HIGH,
    VIRTIO_MMIO_QUEUE_AVAIL_LOW,
    VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
    VIRTIO_MMIO_QUEUE_USED_LOW,
    VIRTIO_MMIO_QUEUE_USED_HIGH,
    VIRTIO_MMIO_CONFIG_GENERATION,
    VIRTIO_MMIO_CONFIG,
];

/// Reads the input front to back; past its end every read yields zeros.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        head
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let got = self.take(N);
        out[..got.len()].copy_from_slice(got);
        out
    }

    fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn rest(&mut self) -> &'a [u8] {
        self.take(self.0.len())
    }
}

fn memory() -> Option<GuestMemoryMmap> {
    GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(REGION0.0), REGION0.1),
        (GuestAddress(REGION1.0), REGION1.1),
    ])
    .ok()
}

/// An anonymous in-memory file of `len` bytes, the block device's backing.
fn memfd(len: u64) -> Option<File> {
    // SAFETY: memfd_create reads only the NUL-terminated name and returns a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(c"isocell-fuzz-disk".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len).ok()?;
    Some(file)
}

/// An entropy device reading /dev/zero: the same code path as /dev/urandom, without spending
/// the fuzzer's time on cryptography.
fn zero_rng() -> std::io::Result<Rng> {
    Ok(Rng::with_source(File::open("/dev/zero")?))
}

fn transport(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap) -> Option<MmioTransport> {
    let irq = EventFd::new(EFD_NONBLOCK).ok()?;
    MmioTransport::new(device, mem, irq).ok()
}

fn write32(t: &mut MmioTransport, offset: u32, value: u32) {
    t.write(0, u64::from(offset), &value.to_le_bytes());
}

fn read32(t: &mut MmioTransport, offset: u32) -> u32 {
    let mut b = [0u8; 4];
    t.read(0, u64::from(offset), &mut b);
    u32::from_le_bytes(b)
}

/// Queue size and ring addresses as the driver programs them.
#[derive(Clone, Copy)]
struct QueueLayout {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
}

/// The queue size and ring addresses: a power of two and the fixed rings at `base`, or, when the
/// input says so, any size and any addresses.
fn queue_layout(input: &mut Input, base: u64) -> QueueLayout {
    let mode = input.u8();
    let size = if mode & 1 == 0 { 1u16 << (input.u8() % 9) } else { input.u16() };
    if mode & 2 == 0 {
        QueueLayout { size, desc: base, avail: base + 0x1000, used: base + 0x2000 }
    } else {
        QueueLayout { size, desc: input.u64(), avail: input.u64(), used: input.u64() }
    }
}

/// A descriptor address: mostly in the data area, sometimes in region 1, across the end of
/// region 0, in the hole, or anywhere at all.
fn descriptor_addr(input: &mut Input, mode: u8) -> u64 {
    match mode & 7 {
        3 => REGION1.0 + u64::from(input.u16()) % REGION1.1 as u64,
        4 => REGION0.1 as u64 - u64::from(input.u8()),
        5 => REGION0.1 as u64 + u64::from(input.u16()),
        6 => input.u64(),
        7 => u64::MAX - u64::from(input.u8()),
        _ => DATA + u64::from(input.u16()) % (REGION0.1 as u64 - DATA),
    }
}

/// Writes descriptors and available-ring entries from the input into the rings of `q` (writes
/// that fall outside guest memory are simply lost, as they would be for a guest).
fn lay_chains(input: &mut Input, mem: &GuestMemoryMmap, q: QueueLayout) {
    let size = u64::from(q.size.clamp(1, 256));
    let count = u64::from(input.u8()) % (size + 1);
    for i in 0..count {
        let mode = input.u8();
        let addr = descriptor_addr(input, mode);
        let len = if mode & 8 == 0 { u32::from(input.u16()) } else { input.u32() };
        let flags = if mode & 0x10 == 0 { u16::from(input.u8() & 7) } else { input.u16() };
        let next =
            if mode & 0x20 == 0 { u16::from(input.u8()) % q.size.max(1) } else { input.u16() };
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..].copy_from_slice(&next.to_le_bytes());
        let _ = mem.write_slice(&raw, GuestAddress(q.desc.wrapping_add(16 * i)));
    }
    let heads = input.u8();
    let idx = if heads & 0x80 == 0 {
        // At most the queue size (the modulus is computed wide: the size may be 0xffff).
        (u32::from(heads) % (u32::from(q.size) + 1)) as u16
    } else {
        input.u16()
    };
    let _ = mem.write_obj(0u16, GuestAddress(q.avail));
    let _ = mem.write_obj(idx, GuestAddress(q.avail.wrapping_add(2)));
    for i in 0..u64::from(idx.min(256)) {
        let head = u16::from(input.u8());
        let _ = mem.write_obj(head, GuestAddress(q.avail.wrapping_add(4 + 2 * i)));
    }
}

/// What must hold after any guest access: the transport never runs a queue it did not accept.
fn check(t: &MmioTransport) {
    assert!(t.consistent(), "a live transport holds a queue that failed validation");
}

/// Does what a driver does to bring the device up: acknowledge, negotiate `VERSION_1`, program
/// each queue in `queues` (by index) and set `DRIVER_OK`.
fn bring_up(t: &mut MmioTransport, queues: &[(u32, QueueLayout)]) {
    let split = |a: u64| (a as u32, (a >> 32) as u32);
    write32(t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
    write32(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    write32(t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
    let status = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
    write32(t, VIRTIO_MMIO_STATUS, status);
    for (index, q) in queues {
        write32(t, VIRTIO_MMIO_QUEUE_SEL, *index);
        write32(t, VIRTIO_MMIO_QUEUE_NUM, u32::from(q.size));
        for (low, high, addr) in [
            (VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH, q.desc),
            (VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, q.avail),
            (VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_QUEUE_USED_HIGH, q.used),
        ] {
            let (lo, hi) = split(addr);
            write32(t, low, lo);
            write32(t, high, hi);
        }
        write32(t, VIRTIO_MMIO_QUEUE_READY, 1);
    }
    write32(t, VIRTIO_MMIO_STATUS, status | VIRTIO_CONFIG_S_DRIVER_OK);
    check(t);
}

/// A block device over an in-memory disk; one request queue laid out from the input.
pub fn block_queue(data: &[u8]) {
    let mut input = Input(data);
    let opts = input.u8();
    let (Some(mem), Some(disk)) = (memory(), memfd(DISK_LEN)) else { return };
    let Ok(blk) = Block::new("fuzz0".into(), disk, opts & 4 != 0) else { return };
    let q = queue_layout(&mut input, QUEUE_A);
    lay_chains(&mut input, &mem, q);
    let _ = mem.write_slice(input.take(REGION0.1 - DATA as usize), GuestAddress(DATA));
    let Some(mut t) = transport(Box::new(blk), mem) else { return };
    bring_up(&mut t, &[(0, q)]);
    for _ in 0..=(opts & 3) {
        write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        check(&t);
    }
}

/// An entropy device; one request queue laid out from the input.
pub fn rng_queue(data: &[u8]) {
    let mut input = Input(data);
    let opts = input.u8();
    let Some(mem) = memory() else { return };
    let Ok(rng) = zero_rng() else { return };
    let q = queue_layout(&mut input, QUEUE_A);
    lay_chains(&mut input, &mem, q);
    let _ = mem.write_slice(input.take(REGION0.1 - DATA as usize), GuestAddress(DATA));
    let Some(mut t) = transport(Box::new(rng), mem) else { return };
    bring_up(&mut t, &[(0, q)]);
    for _ in 0..=(opts & 3) {
        write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        check(&t);
    }
}

/// A vsock device with its host side in a private temporary directory, removed on drop.
struct VsockHost {
    dir: std::path::PathBuf,
    uds: std::path::PathBuf,
}

impl VsockHost {
    fn new() -> Option<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("isocell-fz-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let uds = dir.join("v");
        Some(VsockHost { dir, uds })
    }
}

impl Drop for VsockHost {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A vsock device: the transmit queue (A) and the receive queue (B) laid out from the input.
/// Depending on the options, a host process listens at port 1024 (so guest connections there
/// succeed) and/or a host process connects and asks for a guest port.
pub fn vsock_queue(data: &[u8]) {
    let mut input = Input(data);
    let opts = input.u8();
    let host_port = input.u32();
    let Some(mem) = memory() else { return };
    let Some(host) = VsockHost::new() else { return };
    let _listener = (opts & 4 != 0).then(|| {
        let mut path = host.uds.clone().into_os_string();
        path.push(format!("_{LISTENING_PORT}"));
        std::os::unix::net::UnixListener::bind(path).ok()
    });
    let Ok(vsock) = Vsock::new(GUEST_CID, &host.uds) else { return };
    let _client = (opts & 8 != 0).then(|| {
        let mut s = std::os::unix::net::UnixStream::connect(&host.uds).ok()?;
        std::io::Write::write_all(&mut s, format!("CONNECT {host_port}\n").as_bytes()).ok()?;
        Some(s)
    });
    let tx = queue_layout(&mut input, QUEUE_A);
    lay_chains(&mut input, &mem, tx);
    let rx = queue_layout(&mut input, QUEUE_B);
    lay_chains(&mut input, &mem, rx);
    let _ = mem.write_slice(input.take(REGION0.1 - DATA as usize), GuestAddress(DATA));
    let Some(mut t) = transport(Box::new(vsock), mem) else { return };
    bring_up(&mut t, &[(1, tx), (0, rx)]);
    for i in 0..=(opts & 3) {
        write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, u32::from(i % 2 == 0));
        t.process_backend();
        check(&t);
    }
}

/// Register reads and writes in any order, of any width, at any offset of the register window,
/// on a block, entropy or vsock device whose guest memory the input fills.
pub fn mmio_registers(data: &[u8]) {
    let mut input = Input(data);
    let kind = input.u8();
    let Some(mem) = memory() else { return };
    let image = input.u16();
    let _ = mem.write_slice(input.take(usize::from(image)), GuestAddress(0));
    let host = if kind % 3 == 2 { VsockHost::new() } else { None };
    let device: Box<dyn VirtioDevice> = match kind % 3 {
        0 => match memfd(DISK_LEN).map(|f| Block::new("fuzz0".into(), f, kind & 4 != 0)) {
            Some(Ok(b)) => Box::new(b),
            _ => return,
        },
        1 => match zero_rng() {
            Ok(r) => Box::new(r),
            Err(_) => return,
        },
        _ => match host.as_ref().map(|h| Vsock::new(GUEST_CID, &h.uds)) {
            Some(Ok(v)) => Box::new(v),
            _ => return,
        },
    };
    let Some(mut t) = transport(device, mem.clone()) else { return };
    while !input.is_empty() {
        let op = input.u8();
        let width = [1usize, 2, 4, 8][usize::from(op >> 3) & 3];
        match op & 7 {
            0..=2 => {
                let reg = REGISTERS[usize::from(input.u8()) % REGISTERS.len()];
                write32(&mut t, reg, input.u32());
            }
            3 => {
                let reg = REGISTERS[usize::from(input.u8()) % REGISTERS.len()];
                let _ = read32(&mut t, reg);
            }
            4 => {
                let offset = u64::from(input.u16()) % 0x1000;
                let mut buf = [0u8; 8];
                t.read(0, offset, &mut buf[..width]);
            }
            5 => {
                let offset = u64::from(input.u16()) % 0x1000;
                let bytes = input.array::<8>();
                t.write(0, offset, &bytes[..width]);
            }
            6 => {
                // The guest changes its memory (rings, descriptors) between register accesses.
                let addr = u64::from(input.u16());
                let len = usize::from(input.u8());
                let _ = mem.write_slice(input.take(len), GuestAddress(addr));
            }
            _ => t.process_backend(),
        }
        check(&t);
    }
    let _ = input.rest();
}

/// Well-formed inputs for each target (a driver doing the ordinary thing), used as the fuzzers'
/// seed corpus and as the starting points of the random tests.
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    match target {
        "block_queue" => {
            let mut out = Vec::new();
            // IN 2 sectors from sector 1; OUT 1 sector at 3; FLUSH; GET_ID.
            for (kind, sector, write_only) in [(0u32, 1u64, true), (1, 3, false)] {
                let mut d = vec![0u8, 0, 3]; // opts, layout mode 0, size 8
                d.extend(seed_chain(&[
                    (DATA, 16, VRING_DESC_F_NEXT, 1),
                    (
                        DATA + 0x100,
                        1024,
                        VRING_DESC_F_NEXT | if write_only { VRING_DESC_F_WRITE } else { 0 },
                        2,
                    ),
                    (DATA + 0x1000, 1, VRING_DESC_F_WRITE, 0),
                ]));
                let mut header = kind.to_le_bytes().to_vec();
                header.extend([0; 4]);
                header.extend(sector.to_le_bytes());
                d.extend(header);
                out.push(d);
            }
            for kind in [4u32, 8] {
                let mut d = vec![0u8, 0, 3];
                d.extend(seed_chain(&[
                    (DATA, 16, VRING_DESC_F_NEXT, 1),
                    (DATA + 0x100, 20, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2),
                    (DATA + 0x1000, 1, VRING_DESC_F_WRITE, 0),
                ]));
                d.extend(kind.to_le_bytes());
                d.extend([0; 12]);
                out.push(d);
            }
            // An indirect table at DATA + 0x20 holding the same IN request.
            let mut d = vec![0u8, 0, 3];
            d.extend(seed_chain(&[(DATA + 0x20, 48, VRING_DESC_F_INDIRECT, 0)]));
            let mut area = vec![0u8; 0x20];
            area.extend(seed_raw_desc(DATA, 16, VRING_DESC_F_NEXT, 1));
            area.extend(seed_raw_desc(
                DATA + 0x100,
                512,
                VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
                2,
            ));
            area.extend(seed_raw_desc(DATA + 0x1000, 1, VRING_DESC_F_WRITE, 0));
            area[..4].copy_from_slice(&0u32.to_le_bytes());
            d.extend(area);
            out.push(d);
            out
        }
        "rng_queue" => {
            let mut d = vec![0u8, 0, 3];
            d.extend(seed_chain(&[
                (DATA, 64, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 1),
                (REGION1.0, 4096, VRING_DESC_F_WRITE, 0),
            ]));
            vec![d]
        }
        "vsock_queue" => {
            let mut out = Vec::new();
            // op REQUEST (1), then RW (5) with 4 bytes, to the listening port; an RX buffer.
            for (op, len) in [(1u16, 0u32), (5, 4)] {
                let mut d = vec![0x04 | 1u8];
                d.extend(5000u32.to_le_bytes()); // host port for a host-initiated connection
                d.push(0);
                d.push(3);
                d.extend(seed_chain(&[
                    (DATA, 44, VRING_DESC_F_NEXT, 1),
                    (DATA + 0x100, len, 0, 0),
                ]));
                d.push(0);
                d.push(3);
                d.extend(seed_chain(&[(DATA + 0x1000, 44 + 4096, VRING_DESC_F_WRITE, 0)]));
                let mut header = Vec::new();
                header.extend(GUEST_CID.to_le_bytes());
                header.extend(2u64.to_le_bytes());
                header.extend(40000u32.to_le_bytes());
                header.extend(LISTENING_PORT.to_le_bytes());
                header.extend(len.to_le_bytes());
                header.extend(1u16.to_le_bytes());
                header.extend(op.to_le_bytes());
                header.extend(0u32.to_le_bytes());
                header.extend(65536u32.to_le_bytes());
                header.extend(0u32.to_le_bytes());
                header.resize(0x100, 0);
                header.extend(b"ping");
                d.extend(header);
                out.push(d);
            }
            out
        }
        "mmio_registers" => {
            // A rng device, rings at 0/0x1000/0x2000 with one 64-byte buffer, brought up by
            // register writes and notified.
            let mut mem = vec![0u8; 0x2000];
            mem[..16].copy_from_slice(&seed_raw_desc(0x3000, 64, VRING_DESC_F_WRITE, 0));
            mem[0x1002..0x1004].copy_from_slice(&1u16.to_le_bytes());
            let mut d = vec![1u8];
            d.extend((mem.len() as u16).to_le_bytes());
            d.extend(mem);
            let reg = |r: u32| REGISTERS.iter().position(|x| *x == r).unwrap_or(0) as u8;
            for (r, v) in [
                (VIRTIO_MMIO_STATUS, 3u32),
                (VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1),
                (VIRTIO_MMIO_DRIVER_FEATURES, 1),
                (VIRTIO_MMIO_STATUS, 11),
                (VIRTIO_MMIO_QUEUE_SEL, 0),
                (VIRTIO_MMIO_QUEUE_NUM, 8),
                (VIRTIO_MMIO_QUEUE_DESC_LOW, 0),
                (VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x1000),
                (VIRTIO_MMIO_QUEUE_USED_LOW, 0x2000),
                (VIRTIO_MMIO_QUEUE_READY, 1),
                (VIRTIO_MMIO_STATUS, 15),
                (VIRTIO_MMIO_QUEUE_NOTIFY, 0),
            ] {
                d.push(0);
                d.push(reg(r));
                d.extend(v.to_le_bytes());
            }
            vec![d]
        }
        _ => Vec::new(),
    }
}

fn seed_raw_desc(addr: u64, len: u32, flags: u16, next: u16) -> Vec<u8> {
    let mut v = addr.to_le_bytes().to_vec();
    v.extend(len.to_le_bytes());
    v.extend(flags.to_le_bytes());
    v.extend(next.to_le_bytes());
    v
}

/// The input bytes that make [`lay_chains`] write `descs` (all as "raw" descriptors with
/// 64-bit addresses, lengths, flags and next) and make descriptor 0 the one available head.
fn seed_chain(descs: &[(u64, u32, u16, u16)]) -> Vec<u8> {
    let mut v = vec![descs.len() as u8];
    for (addr, len, flags, next) in descs {
        v.push(6 | 8 | 0x10 | 0x20);
        v.extend(addr.to_le_bytes());
        v.extend(len.to_le_bytes());
        v.extend(flags.to_le_bytes());
        v.extend(next.to_le_bytes());
    }
    v.push(1); // one head
    v.push(0); // descriptor 0
    v
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::path::Path;

    use proptest::prelude::*;

    use super::*;

    fn target(name: &str) -> fn(&[u8]) {
        TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f).unwrap()
    }

    /// Every crash input the fuzzers ever found (`crates/<crate>/fuzz/regressions/<target>/`)
    /// runs through its entry point again.
    #[test]
    fn regressions_replay() {
        let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut replayed = 0;
        for krate in ["vmm", "proto"] {
            let dir = crates.join(krate).join("fuzz").join("regressions");
            let Ok(targets) = std::fs::read_dir(&dir) else { continue };
            for t in targets {
                let t = t.unwrap().path();
                let name = t.file_name().unwrap().to_string_lossy().into_owned();
                if !t.is_dir() || name.starts_with('.') {
                    continue;
                }
                let run: fn(&[u8]) = match (krate, name.as_str()) {
                    ("proto", "decode") => isocell_proto::fuzz_decode,
                    ("vmm", n) => target(n),
                    _ => panic!("no entry point for regressions in {}", t.display()),
                };
                for f in std::fs::read_dir(&t).unwrap() {
                    let f = f.unwrap().path();
                    if f.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) {
                        continue;
                    }
                    eprintln!("replaying {}", f.display());
                    run(&std::fs::read(&f).unwrap());
                    replayed += 1;
                }
            }
        }
        eprintln!("{replayed} regression inputs replayed");
    }

    /// Writes [`seeds`] to `crates/vmm/fuzz/seeds/<target>/` (run with `--ignored` after
    /// changing the input formats; the fuzz script starts every run from these files).
    #[test]
    #[ignore]
    fn write_seed_corpus() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join("seeds");
        for (name, _) in TARGETS {
            let dir = root.join(name);
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            for (i, s) in seeds(name).iter().enumerate() {
                std::fs::write(dir.join(format!("seed-{i}")), s).unwrap();
            }
        }
    }

    #[test]
    fn seeds_reach_the_devices() {
        for (name, run) in TARGETS {
            let seeds = seeds(name);
            assert!(!seeds.is_empty(), "{name} has no seeds");
            for s in seeds {
                run(&s);
            }
        }
    }

    #[test]
    fn block_seed_reads_the_disk() {
        // The first block seed is a well-formed IN request: it must complete with status OK,
        // which shows the input layout reaches the device as intended.
        let seed = &seeds("block_queue")[0];
        let mut input = Input(seed);
        let _opts = input.u8();
        let mem = memory().unwrap();
        let q = queue_layout(&mut input, QUEUE_A);
        lay_chains(&mut input, &mem, q);
        mem.write_slice(input.rest(), GuestAddress(DATA)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(DATA + 0x1000)).unwrap();
        let blk = Block::new("fuzz0".into(), memfd(DISK_LEN).unwrap(), false).unwrap();
        let mut t = transport(Box::new(blk), mem.clone()).unwrap();
        bring_up(&mut t, &[(0, q)]);
        write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(DATA + 0x1000)).unwrap(), 0);
        assert_eq!(mem.read_obj::<u16>(GuestAddress(0x2002)).unwrap(), 1, "one used entry");
    }

    /// The first vsock seed (a guest REQUEST to the listening port, which a host process
    /// listens on) laid out in guest memory and sent: the device is up and has connected.
    /// Also the transmit and receive queue layouts, for bringing it up again.
    fn vsock_seed_sent() -> VsockSeed {
        let seed = &seeds("vsock_queue")[0];
        let mut input = Input(seed);
        let opts = input.u8();
        assert_eq!(opts & 4, 4);
        let _port = input.u32();
        let mem = memory().unwrap();
        let host = VsockHost::new().unwrap();
        let mut path = host.uds.clone().into_os_string();
        path.push(format!("_{LISTENING_PORT}"));
        let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
        let tx = queue_layout(&mut input, QUEUE_A);
        lay_chains(&mut input, &mem, tx);
        let rx = queue_layout(&mut input, QUEUE_B);
        lay_chains(&mut input, &mem, rx);
        mem.write_slice(input.rest(), GuestAddress(DATA)).unwrap();
        let vsock = Vsock::new(GUEST_CID, &host.uds).unwrap();
        let mut t = transport(Box::new(vsock), mem.clone()).unwrap();
        bring_up(&mut t, &[(1, tx), (0, rx)]);
        write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        VsockSeed { mem, _host: host, listener, t, queues: [(1, tx), (0, rx)] }
    }

    struct VsockSeed {
        mem: GuestMemoryMmap,
        _host: VsockHost,
        listener: std::os::unix::net::UnixListener,
        t: MmioTransport,
        queues: [(u32, QueueLayout); 2],
    }

    #[test]
    fn vsock_seed_connects_to_the_host_listener() {
        // The first vsock seed is a guest REQUEST to the listening port: the device must answer
        // with a RESPONSE (op 2) in the receive buffer.
        let seed = vsock_seed_sent();
        let op: u16 = seed.mem.read_obj(GuestAddress(DATA + 0x1000 + 30)).unwrap();
        assert_eq!(op, 2, "RESPONSE");
    }

    /// Saves a live transport, sends the state through JSON, restores it into a fresh device
    /// and transport and checks that the state reads back the same.
    fn round_trip(
        t: &mut MmioTransport,
        fresh: Box<dyn VirtioDevice>,
        mem: &GuestMemoryMmap,
    ) -> MmioTransport {
        let saved = t.save().unwrap();
        let json = serde_json::to_string(&saved).unwrap();
        let parsed: crate::devices::virtio::mmio::MmioState = serde_json::from_str(&json).unwrap();
        assert_eq!(parsed, saved);
        let mut restored = transport(fresh, mem.clone()).unwrap();
        restored.restore(&parsed).unwrap();
        assert_eq!(restored.save().unwrap(), saved);
        restored
    }

    #[test]
    fn block_state_round_trips_and_the_restored_device_goes_on() {
        let seed = &seeds("block_queue")[0];
        let mut input = Input(seed);
        let _opts = input.u8();
        let mem = memory().unwrap();
        let q = queue_layout(&mut input, QUEUE_A);
        lay_chains(&mut input, &mem, q);
        mem.write_slice(input.rest(), GuestAddress(DATA)).unwrap();
        let disk = memfd(DISK_LEN).unwrap();
        let again = disk.try_clone().unwrap();
        let blk = Block::new("fuzz0".into(), disk, false).unwrap();
        let mut t = transport(Box::new(blk), mem.clone()).unwrap();
        bring_up(&mut t, &[(0, q)]);
        write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        let saved = t.save().unwrap();
        assert_eq!(saved.queues[0].next_used, 1, "the device's progress is saved");
        let fresh = Block::new("fuzz0".into(), again.try_clone().unwrap(), false).unwrap();
        let mut restored = round_trip(&mut t, Box::new(fresh), &mem);
        // The guest makes the same request available again: the restored device serves it
        // as the second one.
        mem.write_obj(2u16, GuestAddress(q.avail + 2)).unwrap();
        mem.write_obj(0u16, GuestAddress(q.avail + 6)).unwrap();
        write32(&mut restored, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(mem.read_obj::<u16>(GuestAddress(q.used + 2)).unwrap(), 2);
        // State of another disk, or of another kind, is refused.
        let other = Block::new("other".into(), again, false).unwrap();
        let mut wrong = transport(Box::new(other), mem.clone()).unwrap();
        assert!(wrong.restore(&saved).is_err());
        let mut rng = transport(Box::new(zero_rng().unwrap()), mem).unwrap();
        assert!(rng.restore(&saved).is_err());
    }

    #[test]
    fn rng_state_round_trips() {
        let mem = memory().unwrap();
        let mut t = transport(Box::new(zero_rng().unwrap()), mem.clone()).unwrap();
        let q = QueueLayout {
            size: 16,
            desc: QUEUE_A,
            avail: QUEUE_A + 0x1000,
            used: QUEUE_A + 0x2000,
        };
        bring_up(&mut t, &[(0, q)]);
        let restored = round_trip(&mut t, Box::new(zero_rng().unwrap()), &mem);
        assert!(restored.consistent());
    }

    #[test]
    fn vsock_state_round_trips_without_its_connections() {
        let mem = memory().unwrap();
        let host = VsockHost::new().unwrap();
        let vsock = Vsock::new(GUEST_CID, &host.uds).unwrap();
        let mut t = transport(Box::new(vsock), mem.clone()).unwrap();
        let tx = QueueLayout {
            size: 16,
            desc: QUEUE_A,
            avail: QUEUE_A + 0x1000,
            used: QUEUE_A + 0x2000,
        };
        let rx = QueueLayout {
            size: 16,
            desc: QUEUE_B,
            avail: QUEUE_B + 0x1000,
            used: QUEUE_B + 0x2000,
        };
        bring_up(&mut t, &[(1, tx), (0, rx)]);
        let saved = t.save().unwrap();
        let other = VsockHost::new().unwrap();
        let fresh = Vsock::new(GUEST_CID, &other.uds).unwrap();
        round_trip(&mut t, Box::new(fresh), &mem);
        let third = VsockHost::new().unwrap();
        let wrong_cid = Vsock::new(GUEST_CID + 1, &third.uds).unwrap();
        let mut wrong = transport(Box::new(wrong_cid), mem).unwrap();
        assert!(wrong.restore(&saved).is_err());
    }

    /// A driver reset drops every vsock connection: the host end sees its socket close.
    #[test]
    fn a_vsock_reset_drops_its_connections() {
        let VsockSeed { listener, mut t, queues, .. } = vsock_seed_sent();
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        write32(&mut t, VIRTIO_MMIO_STATUS, 0);
        let mut b = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut conn, &mut b).unwrap(), 0, "closed by the reset");
        assert_eq!(read32(&mut t, VIRTIO_MMIO_STATUS), 0);
        // The driver can bind again.
        bring_up(&mut t, &queues);
        assert_eq!(
            read32(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_DRIVER_OK,
            VIRTIO_CONFIG_S_DRIVER_OK
        );
    }

    fn mutated(name: &'static str) -> impl Strategy<Value = Vec<u8>> {
        let seeds = seeds(name);
        let n = seeds.len();
        (0..n, proptest::collection::vec((any::<u16>(), any::<u8>()), 0..16), 0usize..64).prop_map(
            move |(i, flips, cut)| {
                let mut s = seeds[i].clone();
                for (at, v) in flips {
                    if !s.is_empty() {
                        let at = usize::from(at) % s.len();
                        s[at] = v;
                    }
                }
                let keep = s.len().saturating_sub(cut);
                s.truncate(keep);
                s
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn block_queue_random(data in proptest::collection::vec(any::<u8>(), 0..1024)) {
            block_queue(&data);
        }

        #[test]
        fn block_queue_mutated(data in mutated("block_queue")) {
            block_queue(&data);
        }

        #[test]
        fn rng_queue_random(data in proptest::collection::vec(any::<u8>(), 0..1024)) {
            rng_queue(&data);
        }

        #[test]
        fn rng_queue_mutated(data in mutated("rng_queue")) {
            rng_queue(&data);
        }

        #[test]
        fn vsock_queue_random(data in proptest::collection::vec(any::<u8>(), 0..1024)) {
            vsock_queue(&data);
        }

        #[test]
        fn vsock_queue_mutated(data in mutated("vsock_queue")) {
            vsock_queue(&data);
        }

        #[test]
        fn mmio_registers_random(data in proptest::collection::vec(any::<u8>(), 0..1024)) {
            mmio_registers(&data);
        }

        #[test]
        fn mmio_registers_mutated(data in mutated("mmio_registers")) {
            mmio_registers(&data);
        }
    }
}

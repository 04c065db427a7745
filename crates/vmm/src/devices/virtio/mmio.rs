//! The virtio-mmio transport (virtio 1.x, "version 2" registers). Every register access comes
//! from the guest and is checked. The transport is only the register file: the device and its
//! queue work live on the device's worker ([`super::worker`]). `QueueNotify` writes reach the
//! worker through per-queue eventfds (KVM ioeventfds in a VM, so they never leave the kernel),
//! and the worker raises interrupts through the irqfd.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::worker::{self, Command, DeviceWorker, WorkerHandle};
use super::{
    read_config_bytes, DeviceInfo, DeviceState, QueueSnapshot, RestoreError, VirtioDevice,
};
use crate::devices::BusDevice;

const MMIO_MAGIC: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
/// "ISOC", the vendor id the devices report.
const VENDOR_ID: u32 = 0x434f_5349;

/// Where the device runs.
enum Worker {
    /// In line, on the caller's thread (unit tests and fuzz targets: deterministic).
    Inline(Box<DeviceWorker>),
    /// On its own thread; notifies go to `queue_events`.
    Thread { handle: WorkerHandle, queue_events: Vec<EventFd> },
}

/// One virtio device's register window.
pub struct MmioTransport {
    info: DeviceInfo,
    mem: GuestMemoryMmap,
    worker: Worker,
    /// The queues as the driver configures them; the worker gets copies at `DRIVER_OK`.
    queues: Vec<Queue>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    /// Features accepted at the last FEATURES_OK, for the cell's record.
    negotiated: Option<u64>,
    status: u32,
    /// Shared with the worker, which sets the cause of each interrupt it raises.
    interrupt_status: Arc<AtomicU32>,
}

/// The transport's saved state, with its device's: plain serde data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    /// The device status register.
    pub status: u32,
    /// Registers the driver selects with.
    pub queue_select: u32,
    #[allow(missing_docs)]
    pub device_features_select: u32,
    #[allow(missing_docs)]
    pub driver_features_select: u32,
    /// Features the driver wrote.
    pub driver_features: u64,
    /// Features accepted at the last FEATURES_OK.
    pub negotiated: Option<u64>,
    /// Interrupt causes not yet acknowledged.
    pub interrupt_status: u32,
    /// Every queue: its configuration and, while the device is live, the device's progress.
    pub queues: Vec<QueueSnapshot>,
    /// The device's own state.
    pub device: DeviceState,
}

impl MmioTransport {
    /// Wraps `device`, run in line on the caller's thread; its interrupts go to `irq`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irq: EventFd,
    ) -> Result<Self, virtio_queue::Error> {
        let info = device.info();
        let queues =
            info.queue_max_sizes.iter().map(|max| Queue::new(*max)).collect::<Result<_, _>>()?;
        let interrupt_status = Arc::new(AtomicU32::new(0));
        let worker = DeviceWorker::new(device, mem.clone(), irq, interrupt_status.clone());
        Ok(MmioTransport {
            info,
            mem,
            worker: Worker::Inline(Box::new(worker)),
            queues,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            negotiated: None,
            status: 0,
            interrupt_status,
        })
    }

    /// Moves the device onto a worker thread named `name`, waiting on one new eventfd per
    /// queue; returns the transport and those eventfds (in queue order), for KVM to signal on
    /// notifies.
    pub fn start_worker(mut self, name: String) -> std::io::Result<(Self, Vec<EventFd>)> {
        let Worker::Inline(inline) = self.worker else {
            return Err(std::io::Error::other("the worker already runs on its thread"));
        };
        let events = (0..self.queues.len())
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()?;
        let theirs = events.iter().map(EventFd::try_clone).collect::<std::io::Result<Vec<_>>>()?;
        let ours = events.iter().map(EventFd::try_clone).collect::<std::io::Result<Vec<_>>>()?;
        let handle = worker::spawn(*inline, theirs, name)?;
        self.worker = Worker::Thread { handle, queue_events: ours };
        Ok((self, events))
    }

    /// Waits until the worker thread has its seccomp filter (see [`worker::spawn`]).
    pub fn confirm_worker(&mut self) -> std::io::Result<()> {
        match &mut self.worker {
            Worker::Inline(_) => Ok(()),
            Worker::Thread { handle, .. } => handle.confirm(),
        }
    }

    /// The device type and the feature bits the driver last had accepted (FEATURES_OK): what
    /// the guest used of this device. Kept across resets (a rebooting guest resets devices).
    pub fn negotiated_features(&self) -> (u32, Option<u64>) {
        (self.info.device_type, self.negotiated)
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// Queue setup is only allowed between FEATURES_OK and DRIVER_OK, as the spec says.
    fn queue_config_allowed(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0
    }

    fn live(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 && self.status & VIRTIO_CONFIG_S_FAILED == 0
    }

    fn send(&mut self, command: Command) {
        match &mut self.worker {
            Worker::Inline(w) => w.handle(command),
            Worker::Thread { handle, .. } => handle.send(command),
        }
    }

    /// Sends a command that answers, and waits for the answer (`None`: the worker is gone or
    /// did not answer in time).
    fn ask<T>(&mut self, make: impl FnOnce(SyncSender<T>) -> Command) -> Option<T> {
        match &mut self.worker {
            Worker::Inline(w) => {
                let (reply, answer) = sync_channel(1);
                w.handle(make(reply));
                answer.try_recv().ok()
            }
            Worker::Thread { handle, .. } => handle.ask(make),
        }
    }

    /// The driver's reset: the device lets go of everything, then the registers clear.
    fn reset(&mut self) {
        let _ = self.ask(Command::Reset);
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt_status.store(0, Ordering::SeqCst);
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if value & self.status != self.status {
            // A driver only adds status bits; clearing one (FAILED after a refused DRIVER_OK,
            // or DRIVER_OK to reprogram live queues) needs a reset, so such a write is ignored.
            return;
        }
        let mut value = value;
        let newly = value & !self.status;
        if newly & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let offered = self.info.offered_features;
            let valid = self.driver_features & !offered == 0
                && self.driver_features & (1u64 << VIRTIO_F_VERSION_1) != 0;
            if valid {
                self.negotiated = Some(self.driver_features);
            } else {
                // Leaving FEATURES_OK clear tells the driver its feature set was refused.
                value &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        if newly & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            // A device is live only with accepted features and every ready queue valid.
            let features_ok = value & VIRTIO_CONFIG_S_FEATURES_OK != 0;
            if !features_ok || !self.queues_valid() {
                value |= VIRTIO_CONFIG_S_FAILED;
            }
        }
        self.status = value;
        if newly & VIRTIO_CONFIG_S_DRIVER_OK != 0 && self.live() {
            let queues = self.queues.iter().map(copy_queue).collect();
            let features = self.driver_features;
            self.send(Command::Activate { queues, features });
        }
    }

    fn queues_valid(&self) -> bool {
        self.queues.iter().all(|q| !q.ready() || q.is_valid(&self.mem))
    }

    /// Whether the device is in a state it may process queues in only with every ready queue
    /// valid (checked by the fuzz targets after every access).
    pub(crate) fn consistent(&self) -> bool {
        !self.live() || self.queues_valid()
    }

    /// A `QueueNotify` that reached the VMM (in a VM, KVM's ioeventfds take the usual ones).
    fn notify(&mut self, index: u32) {
        if !self.live() {
            return;
        }
        let index = index as usize;
        match &mut self.worker {
            Worker::Inline(w) => w.queue_event(index),
            Worker::Thread { queue_events, .. } => {
                if let Some(evt) = queue_events.get(index) {
                    let _ = evt.write(1);
                }
            }
        }
    }

    /// Lets an in-line device act on its host-side backend (tests and fuzz targets; a device
    /// on its thread does this itself).
    pub fn process_backend(&mut self) {
        if let Worker::Inline(w) = &mut self.worker {
            w.backend_event();
        }
    }

    /// The transport's and the device's state, for a snapshot.
    pub fn save(&mut self) -> Option<MmioState> {
        self.save_with(Command::Save)
    }

    /// The state as [`MmioTransport::save`] gives it, after which the device does nothing
    /// more: for a VM saved as a snapshot, which never resumes.
    pub fn save_and_stop(&mut self) -> Option<MmioState> {
        self.save_with(Command::SaveAndStop)
    }

    fn save_with(&mut self, command: fn(worker::SaveReply) -> Command) -> Option<MmioState> {
        let (device, progress) = self.ask(command)?;
        let queues = match progress {
            Some(q) if q.len() == self.queues.len() => q,
            _ => self.queues.iter().map(|q| q.state().into()).collect(),
        };
        Some(MmioState {
            status: self.status,
            queue_select: self.queue_select,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            driver_features: self.driver_features,
            negotiated: self.negotiated,
            interrupt_status: self.interrupt_status.load(Ordering::SeqCst),
            queues,
            device,
        })
    }

    /// Takes back `state` into a transport for the same device and backing; a live device
    /// starts working on its restored queues at once. Whatever the device did before is
    /// reset first; a live state whose queues do not fit guest memory is refused.
    pub fn restore(&mut self, state: &MmioState) -> Result<(), RestoreError> {
        if state.queues.len() != self.queues.len() {
            return Err(RestoreError::Mismatch(format!(
                "{} queues saved, the device has {}",
                state.queues.len(),
                self.queues.len()
            )));
        }
        let live = state.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && state.status & VIRTIO_CONFIG_S_FAILED == 0;
        if live && state.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            return Err(RestoreError::Mismatch("live without accepted features".into()));
        }
        let mut queues = Vec::with_capacity(state.queues.len());
        for (i, (saved, max)) in state.queues.iter().zip(&self.info.queue_max_sizes).enumerate() {
            if saved.max_size != *max {
                return Err(RestoreError::Queue(i, format!("maximum size {}", saved.max_size)));
            }
            let queue = saved.to_queue().map_err(|e| RestoreError::Queue(i, e.to_string()))?;
            if live && queue.ready() && !queue.is_valid(&self.mem) {
                return Err(RestoreError::Queue(i, "its rings are not in guest memory".into()));
            }
            queues.push(queue);
        }
        self.reset();
        let device = state.device.clone();
        self.ask(|reply| Command::Restore(device, reply))
            .ok_or_else(|| RestoreError::Mismatch("the device's worker is gone".into()))??;
        self.queues = queues;
        self.status = state.status;
        self.queue_select = state.queue_select;
        self.device_features_select = state.device_features_select;
        self.driver_features_select = state.driver_features_select;
        self.driver_features = state.driver_features;
        self.negotiated = state.negotiated;
        self.interrupt_status.store(state.interrupt_status, Ordering::SeqCst);
        if self.live() {
            let queues = self.queues.iter().map(copy_queue).collect();
            let features = self.driver_features;
            self.send(Command::Activate { queues, features });
        }
        Ok(())
    }

    fn read_register(&mut self, offset: u32) -> u32 {
        let features = self.info.offered_features;
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.info.device_type,
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_select {
                0 => features as u32,
                1 => (features >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            VIRTIO_MMIO_QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status.load(Ordering::SeqCst),
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u32, value: u32) {
        let allowed = self.queue_config_allowed();
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_select = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            // Features are fixed once FEATURES_OK is set.
            VIRTIO_MMIO_DRIVER_FEATURES if self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 => {
                let (low, high) = (self.driver_features & 0xffff_ffff, self.driver_features >> 32);
                self.driver_features = match self.driver_features_select {
                    0 => (high << 32) | u64::from(value),
                    1 => (u64::from(value) << 32) | low,
                    _ => self.driver_features,
                };
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_select = value,
            VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(value),
            VIRTIO_MMIO_INTERRUPT_ACK => {
                self.interrupt_status.fetch_and(!value, Ordering::SeqCst);
            }
            VIRTIO_MMIO_STATUS => self.set_status(value),
            _ if allowed => {
                let Some(q) = self.selected_queue() else { return };
                match offset {
                    // `set_size` ignores sizes that are not a power of two or exceed the max;
                    // `is_valid` then refuses the queue.
                    VIRTIO_MMIO_QUEUE_NUM => q.set_size(value as u16),
                    VIRTIO_MMIO_QUEUE_READY => q.set_ready(value == 1),
                    VIRTIO_MMIO_QUEUE_DESC_LOW => q.set_desc_table_address(Some(value), None),
                    VIRTIO_MMIO_QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(value)),
                    VIRTIO_MMIO_QUEUE_AVAIL_LOW => q.set_avail_ring_address(Some(value), None),
                    VIRTIO_MMIO_QUEUE_AVAIL_HIGH => q.set_avail_ring_address(None, Some(value)),
                    VIRTIO_MMIO_QUEUE_USED_LOW => q.set_used_ring_address(Some(value), None),
                    VIRTIO_MMIO_QUEUE_USED_HIGH => q.set_used_ring_address(None, Some(value)),
                    _ => {}
                }
            }
            _ => {}
        }
    }
}

/// A copy of a configured queue for the worker (`Queue` is not `Clone`; its state is). The
/// register writes only ever store values `virtio_queue` accepts, so the copy is exact.
fn copy_queue(q: &Queue) -> Queue {
    Queue::try_from(q.state()).unwrap_or_default()
}

impl BusDevice for MmioTransport {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            read_config_bytes(&self.info.config, offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        // Registers are 32 bits wide and must be accessed as such.
        let value = match (data.len(), u32::try_from(offset)) {
            (4, Ok(off)) if off % 4 == 0 => self.read_register(off),
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
        data[n..].fill(0);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            // No device here has writable configuration.
            return;
        }
        if let ([a, b, c, d], Ok(off)) = (data, u32::try_from(offset)) {
            if off % 4 == 0 {
                self.write_register(off, u32::from_le_bytes([*a, *b, *c, *d]));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use vm_memory::GuestAddress;

    use super::*;
    use crate::devices::virtio::rng::Rng;

    fn transport() -> MmioTransport {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let rng = Rng::new().unwrap();
        MmioTransport::new(Box::new(rng), mem, EventFd::new(0).unwrap()).unwrap()
    }

    fn read32(t: &mut MmioTransport, off: u32) -> u32 {
        let mut b = [0u8; 4];
        t.read(0, u64::from(off), &mut b);
        u32::from_le_bytes(b)
    }

    fn write32(t: &mut MmioTransport, off: u32, v: u32) {
        t.write(0, u64::from(off), &v.to_le_bytes());
    }

    #[test]
    fn identifies_itself() {
        let mut t = transport();
        assert_eq!(read32(&mut t, VIRTIO_MMIO_MAGIC_VALUE), MMIO_MAGIC);
        assert_eq!(read32(&mut t, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(read32(&mut t, VIRTIO_MMIO_DEVICE_ID), 4);
        write32(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(read32(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 1); // VERSION_1
                                                                    // Narrow register reads return nothing useful, and never panic.
        let mut b = [0u8; 1];
        t.read(0, 0, &mut b);
        assert_eq!(b, [0]);
    }

    #[test]
    fn refuses_features_it_did_not_offer() {
        let mut t = transport();
        write32(&mut t, VIRTIO_MMIO_STATUS, 1 | 2);
        write32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        write32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1 << 29); // EVENT_IDX, not offered
        write32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        write32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        write32(&mut t, VIRTIO_MMIO_STATUS, 1 | 2 | 8);
        assert_eq!(read32(&mut t, VIRTIO_MMIO_STATUS) & 8, 0);
        write32(&mut t, VIRTIO_MMIO_STATUS, 0);
        write32(&mut t, VIRTIO_MMIO_STATUS, 1 | 2);
        write32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        write32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        write32(&mut t, VIRTIO_MMIO_STATUS, 1 | 2 | 8);
        assert_eq!(read32(&mut t, VIRTIO_MMIO_STATUS) & 8, 8);
    }

    #[test]
    fn negotiated_features_are_recorded_and_survive_a_reset() {
        let mut t = transport();
        assert_eq!(t.negotiated_features(), (4, None));
        write32(&mut t, VIRTIO_MMIO_STATUS, 1 | 2);
        write32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        write32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        write32(&mut t, VIRTIO_MMIO_STATUS, 1 | 2 | 8);
        assert_eq!(t.negotiated_features(), (4, Some(1 << 32)));
        // A rebooting guest resets its devices; the record of what it used stays.
        write32(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(t.negotiated_features(), (4, Some(1 << 32)));
    }

    #[test]
    fn status_bits_are_only_cleared_by_a_reset() {
        let mut t = transport();
        write32(&mut t, VIRTIO_MMIO_STATUS, 1 | 2);
        write32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        write32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        write32(&mut t, VIRTIO_MMIO_STATUS, 1 | 2 | 8);
        // A ready queue whose rings are outside guest memory: DRIVER_OK fails the device.
        write32(&mut t, VIRTIO_MMIO_QUEUE_NUM, 8);
        write32(&mut t, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0x10);
        write32(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x1000);
        write32(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        write32(&mut t, VIRTIO_MMIO_STATUS, 1 | 2 | 8 | 4);
        assert_eq!(read32(&mut t, VIRTIO_MMIO_STATUS) & 0x80, 0x80);
        // Clearing FAILED without a reset would let the invalid queue run: ignored.
        write32(&mut t, VIRTIO_MMIO_STATUS, 1 | 2 | 8 | 4);
        assert_eq!(read32(&mut t, VIRTIO_MMIO_STATUS) & 0x80, 0x80);
        assert!(t.consistent());
        write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        // A reset clears everything.
        write32(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(read32(&mut t, VIRTIO_MMIO_STATUS), 0);
    }

    #[test]
    fn driver_ok_without_accepted_features_fails_the_device() {
        let mut t = transport();
        write32(&mut t, VIRTIO_MMIO_STATUS, 1 | 2);
        write32(&mut t, VIRTIO_MMIO_STATUS, 1 | 2 | 4);
        assert_eq!(read32(&mut t, VIRTIO_MMIO_STATUS) & 0x80, 0x80);
        assert!(!t.live());
    }

    #[test]
    fn hostile_register_values_do_not_panic() {
        let mut t = transport();
        write32(&mut t, VIRTIO_MMIO_STATUS, 1 | 2 | 8);
        for off in (0..0x200).step_by(4) {
            for v in [0, 1, 0xffff_ffff, 0x8000_0000] {
                write32(&mut t, off, v);
                let _ = read32(&mut t, off);
            }
        }
        write32(&mut t, VIRTIO_MMIO_QUEUE_SEL, 7);
        write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 7);
        write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, u32::MAX);
    }
}

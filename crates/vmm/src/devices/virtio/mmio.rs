//! The virtio-mmio transport (virtio 1.x, "version 2" registers). Every register access comes
//! from the guest and is checked; queue processing happens synchronously on the vCPU thread that
//! wrote `QueueNotify`, and the interrupt goes out through an irqfd.

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::VirtioDevice;
use crate::devices::BusDevice;

const MMIO_MAGIC: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
/// "ISOC", the vendor id the devices report.
const VENDOR_ID: u32 = 0x434f_5349;

/// One virtio device behind its MMIO register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    irq: EventFd,
    queues: Vec<Queue>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    /// Features accepted at the last FEATURES_OK, for the cell's record.
    negotiated: Option<u64>,
    status: u32,
    interrupt_status: u32,
}

impl MmioTransport {
    /// The device type and the feature bits the driver last had accepted (FEATURES_OK): what
    /// the guest used of this device. Kept across resets (a rebooting guest resets devices).
    pub fn negotiated_features(&self) -> (u32, Option<u64>) {
        (self.device.device_type(), self.negotiated)
    }

    /// Wraps `device`; its interrupts go to `irq`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irq: EventFd,
    ) -> Result<Self, virtio_queue::Error> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|max| Queue::new(*max))
            .collect::<Result<_, _>>()?;
        Ok(MmioTransport {
            device,
            mem,
            irq,
            queues,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            negotiated: None,
            status: 0,
            interrupt_status: 0,
        })
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// Queue setup is only allowed between FEATURES_OK and DRIVER_OK, as the spec says.
    fn queue_config_allowed(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt_status = 0;
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
            let offered = self.device.offered_features();
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
            let mem = &self.mem;
            if self.queues.iter().any(|q| q.ready() && !q.is_valid(mem)) {
                value |= VIRTIO_CONFIG_S_FAILED;
            }
        }
        self.status = value;
    }

    /// Whether the device is in a state it may process queues in only with every ready queue
    /// valid (checked by the fuzz targets after every access).
    pub(crate) fn consistent(&self) -> bool {
        let live = self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && self.status & VIRTIO_CONFIG_S_FAILED == 0;
        !live || self.queues.iter().all(|q| !q.ready() || q.is_valid(&self.mem))
    }

    fn notify(&mut self, index: u32) {
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0 || self.status & VIRTIO_CONFIG_S_FAILED != 0
        {
            return;
        }
        if !self.queues.get(index as usize).is_some_and(|q| q.ready()) {
            return;
        }
        let used = self.device.process_queue(index as usize, &mut self.queues, &self.mem);
        self.signal_used(used);
    }

    /// Lets the device act on its host-side backend (from the device's event thread).
    pub fn process_backend(&mut self) {
        let active = self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && self.status & VIRTIO_CONFIG_S_FAILED == 0;
        let used = self.device.process_backend(active, &mut self.queues, &self.mem);
        self.signal_used(used);
    }

    fn signal_used(&mut self, used: bool) {
        // Without EVENT_IDX this honours the driver's NO_INTERRUPT flag; on a malformed ring
        // we interrupt anyway and let the driver look.
        if !used {
            return;
        }
        let mem = &self.mem;
        let wanted = self
            .queues
            .iter_mut()
            .filter(|q| q.ready())
            .any(|q| q.needs_notification(mem).unwrap_or(true));
        if wanted {
            self.interrupt_status |= VIRTIO_MMIO_INT_VRING;
            // Failing to signal only delays the guest; nothing to do about it here.
            let _ = self.irq.write(1);
        }
    }

    fn read_register(&mut self, offset: u32) -> u32 {
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_select {
                0 => self.device.offered_features() as u32,
                1 => (self.device.offered_features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            VIRTIO_MMIO_QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
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
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt_status &= !value,
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

impl BusDevice for MmioTransport {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.device.read_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
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

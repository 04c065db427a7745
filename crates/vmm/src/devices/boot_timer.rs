//! The boot timer: one MMIO register the guest writes a magic byte to when its init starts, so
//! the VMM can record how long boot took from its own process start.

use std::sync::Arc;

use super::BusDevice;
use crate::timeline::{Phase, Timeline};

/// The byte the guest writes.
pub const BOOT_TIMER_MAGIC: u8 = isocell_spec::vm::BOOT_TIMER_MAGIC;
pub use isocell_vmm_model::devices::boot_timer::BOOT_TIMER_LEN;

/// Records [`Phase::GuestInit`] on the first magic write.
pub struct BootTimer {
    timeline: Arc<Timeline>,
}

impl BootTimer {
    /// A boot timer that marks `timeline`.
    pub fn new(timeline: Arc<Timeline>) -> Self {
        BootTimer { timeline }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset == 0 && data.first() == Some(&BOOT_TIMER_MAGIC) {
            self.timeline.mark(Phase::GuestInit);
        }
    }
}

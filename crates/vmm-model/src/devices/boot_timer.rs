//! The boot timer's MMIO register window.

/// Size of the device's MMIO window.
pub const BOOT_TIMER_LEN: u64 = 0x1000;

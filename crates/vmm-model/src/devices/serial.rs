//! The 8250 UART at COM1.

/// COM1's port base.
pub const COM1_BASE: u64 = 0x3f8;
/// Number of UART registers.
pub const COM1_LEN: u64 = 8;
/// COM1's IRQ.
pub const COM1_IRQ: u32 = 4;

//! The hardware-reduced ACPI sleep registers (FADT `SLEEP_CONTROL_REG` and `SLEEP_STATUS_REG`),
//! two byte-wide I/O ports.

/// The sleep control register's port.
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
/// The sleep status register's port (reads as 0: the guest never wakes from S5).
pub const SLEEP_STATUS_PORT: u16 = 0x601;
/// Ports the device answers on, from [`SLEEP_CONTROL_PORT`].
pub const PORTS_LEN: u64 = 2;
/// The sleep type the DSDT gives S5.
pub const S5_SLEEP_TYPE: u8 = 5;

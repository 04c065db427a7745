//! The i8042 keyboard controller's ports.

/// Data port.
pub const DATA_PORT: u64 = 0x60;
/// Command (write) and status (read) port.
pub const COMMAND_PORT: u64 = 0x64;

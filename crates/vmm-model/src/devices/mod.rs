//! Where the emulated devices answer and what they offer: the fixed port and MMIO ranges of the
//! legacy devices and the virtio device types, queue sizes and feature bits. The device plan and
//! the ACPI tables are built from these; `isocell-vmm`'s live devices re-export them.

pub mod acpi_sleep;
pub mod boot_timer;
pub mod i8042;
pub mod serial;
pub mod virtio;

//! Fuzzes the virtio-mmio register reads and writes in any order, width and offset, with guest memory changing in between (see `isocell_vmm::fuzzing`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| isocell_vmm::fuzzing::mmio_registers(data));

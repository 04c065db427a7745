//! Fuzzes the virtio-blk request queue: descriptor tables, available rings, chained and indirect descriptors, request headers and sectors (see `isocell_vmm::fuzzing`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| isocell_vmm::fuzzing::block_queue(data));

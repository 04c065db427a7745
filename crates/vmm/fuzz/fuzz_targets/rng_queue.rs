//! Fuzzes the virtio-rng request queue: descriptor chains of any shape and length (see `isocell_vmm::fuzzing`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| isocell_vmm::fuzzing::rng_queue(data));

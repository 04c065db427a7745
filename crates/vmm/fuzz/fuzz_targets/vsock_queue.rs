//! Fuzzes the virtio-vsock transmit and receive queues and the packet headers in them, with and without host sockets (see `isocell_vmm::fuzzing`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| isocell_vmm::fuzzing::vsock_queue(data));

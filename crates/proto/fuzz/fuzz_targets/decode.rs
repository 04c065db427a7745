//! Feeds arbitrary bytes to the protocol decoder, as a frame body and as a frame stream.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| isocell_proto::fuzz_decode(data));

//! Whole deliveries (packet and fds) from a hostile broker into a client.
//! See `src/delivery.rs` for the input layout.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shmbus_fuzz::delivery::run(data, true));

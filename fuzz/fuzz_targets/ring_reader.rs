//! A ring channel reader over arbitrary shared-memory contents and
//! geometry, with a hostile publisher scribbling before and during reads.
//! See `src/ring.rs` for the checks and the input layout.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shmbus_fuzz::ring::run(data));

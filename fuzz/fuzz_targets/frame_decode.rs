//! Both frame decoders on arbitrary bytes; a re-encode round trip of
//! whatever decodes. See `src/frame.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shmbus_fuzz::frame::run(data));

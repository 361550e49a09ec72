#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ditto_dedup::fuzzing::chunker(data));

//! Fuzz the packed-format decoder (src/layout/packed.rs): bytes read from Redis must never make
//! it panic (run it with `cargo fuzz run packed`; scripts/fuzz.sh runs the frame parser).
//!
//! Input: bytes 0..8 the entry ID's millisecond (little-endian), the rest the value.

#![no_main]

use libfuzzer_sys::fuzz_target;
use redtap::layout::packed::decode;

fuzz_target!(|data: &[u8]| {
    let Some((ms, value)) = data.split_first_chunk::<8>() else {
        return;
    };
    let ms = u64::from_le_bytes(*ms) >> 20;
    let _ = decode(value, ms);
});

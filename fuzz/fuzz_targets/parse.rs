//! Fuzz the frame parser: it must never panic, and a segment it returns must be consistent.
//!
//! Input: byte 0 picks the link type (`Link::ALL[b % 5]`), byte 1 adds `64 × b` to the wire
//! length (a frame cut at the snap length), the rest is the captured frame. The seed corpus in
//! fuzz/corpus/parse holds real frames captured on lo and on the `any` device (SLL, SLL2).

#![no_main]

use libfuzzer_sys::fuzz_target;
use redtap::capture::parse::{parse, Link};

fuzz_target!(|data: &[u8]| {
    let [sel, extra, frame @ ..] = data else {
        return;
    };
    let link = Link::ALL[usize::from(*sel) % Link::ALL.len()];
    let wire = frame.len() as u32 + u32::from(*extra) * 64;
    if let Ok(seg) = parse(link, frame, wire) {
        assert_eq!(seg.src.is_ipv4(), seg.dst.is_ipv4());
        assert!(u32::from(seg.len) <= wire);
    }
});

//! The node-to-node tunnel header on any 11 bytes: decoding never panics, and whatever
//! decodes encodes back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_agent::proxy::tunnel::{decode, encode, HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    let Ok(h) = <[u8; HEADER_LEN]>::try_from(data) else {
        return;
    };
    if let Ok(target) = decode(&h) {
        assert_eq!(encode(target), h);
    }
});

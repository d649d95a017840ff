//! Protocol detection on any first bytes: it never panics, and once a prefix is
//! classified, every longer input is classified the same (detection decides on what it
//! has seen and never changes its mind).
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_agent::proxy::detect::classify;

fuzz_target!(|data: &[u8]| {
    let whole = classify(data);
    for k in 1..data.len() {
        if let Some(d) = classify(&data[..k]) {
            assert_eq!(whole, Some(d), "the first {k} bytes said {d:?}");
            break;
        }
    }
});

//! The HTTP/1.1 framing follower (request smuggling guard) on any client bytes: it never
//! panics, and where the bytes are cut into reads does not change what it finds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_agent::proxy::http::framing::Framing;

fuzz_target!(|data: &[u8]| {
    // The first byte picks where the rest is cut into reads.
    let Some((&cut, bytes)) = data.split_first() else {
        return;
    };
    let mut whole = Framing::default();
    whole.feed(bytes);
    let mut parts = Framing::default();
    for chunk in bytes.chunks(usize::from(cut).max(1)) {
        parts.feed(chunk);
    }
    for i in 0..8 {
        assert_eq!(
            whole.control.conflicting(i),
            parts.control.conflicting(i),
            "request {i}: reads cut at {cut} bytes disagree"
        );
    }
});

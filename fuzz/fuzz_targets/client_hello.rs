//! The ClientHello reader (TLS routing by server name) on any bytes: it never panics, a
//! name it returns is lowercase without a trailing dot, and a complete hello reads the
//! same with more bytes after it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_agent::proxy::sni::{server_name, Hello};

fuzz_target!(|data: &[u8]| {
    let got = server_name(data);
    if let Hello::Name(Some(name)) = &got {
        assert_eq!(name, &name.to_ascii_lowercase());
        assert!(!name.ends_with('.'));
    }
    if got != Hello::Partial {
        let mut longer = data.to_vec();
        longer.extend_from_slice(b"trailing bytes");
        assert_eq!(server_name(&longer), got, "more bytes changed the answer");
    }
});

//! What a peer agent controls before it is trusted, or in a stream's head: a certificate's
//! bytes (read for its SPIFFE ID), a SPIFFE ID, the `forwarded` header of a tunnel stream.
//! Nothing panics, and what parses prints back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustls::pki_types::CertificateDer;
use weft_agent::{
    identity::{id_of, not_after, SpiffeId},
    proxy::tunnel::parse_forwarded,
};

fuzz_target!(|data: &[u8]| {
    let cert = CertificateDer::from(data);
    let _ = id_of(&cert);
    let _ = not_after(&cert);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = SpiffeId::parse(text) {
        assert_eq!(SpiffeId::parse(&id.to_string()).as_ref(), Ok(&id));
        let _ = id.dns_name();
    }
    if let Some(ip) = parse_forwarded(text) {
        assert_eq!(parse_forwarded(&format!("for={ip}")), Some(ip));
    }
});

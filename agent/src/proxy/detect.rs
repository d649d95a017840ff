//! Protocol detection on the first bytes a client sends, without consuming them (peek).
//! A client that sends nothing within the wait (a server-speaks-first protocol such as
//! SMTP or MySQL) is treated as opaque TCP, so it is never stalled for long.

use std::time::Duration;

use tokio::net::TcpStream;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    Http1,
    /// HTTP/2 with prior knowledge (h2c): the connection preface.
    Http2,
    /// A TLS ClientHello: forwarded as TCP.
    Tls,
    Opaque,
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];

/// Classify what has arrived so far; `None` while it could still be more than one thing.
pub fn classify(b: &[u8]) -> Option<Detected> {
    if b.is_empty() {
        return None;
    }
    if b.len() >= PREFACE.len() && b.starts_with(PREFACE) {
        return Some(Detected::Http2);
    }
    if PREFACE.starts_with(b) {
        return None;
    }
    if b[0] == 0x16 {
        return match b.get(1) {
            None => None,
            Some(3) => Some(Detected::Tls),
            Some(_) => Some(Detected::Opaque),
        };
    }
    if METHODS.iter().any(|m| b.starts_with(m)) {
        return Some(Detected::Http1);
    }
    if METHODS.iter().any(|m| m.starts_with(b)) {
        return None;
    }
    Some(Detected::Opaque)
}

/// Peek at the connection until its protocol is known or `wait` has passed.
pub async fn detect(conn: &TcpStream, wait: Duration) -> Detected {
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = [0u8; 24];
    loop {
        let n = match tokio::time::timeout_at(deadline, conn.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            // Nothing (more) within the wait, or an error: let the L4 path handle it.
            Ok(Err(_)) | Err(_) => return Detected::Opaque,
        };
        if n == 0 {
            return Detected::Opaque;
        }
        match classify(&buf[..n]) {
            Some(d) => return d,
            None if n == buf.len() => return Detected::Opaque,
            // Peek answers at once while any byte is queued, so the timeout above never
            // fires for a client that sent a partial prefix and stopped: check the clock.
            None if tokio::time::Instant::now() >= deadline => return Detected::Opaque,
            // A partial prefix: wait briefly for the rest (sleep rather than spin).
            None => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"DELETE /x"), Some(Detected::Http1));
        assert_eq!(classify(PREFACE), Some(Detected::Http2));
        assert_eq!(classify(&[0x16, 3, 1, 0, 0xa5]), Some(Detected::Tls));
        assert_eq!(classify(b"\x00\x01binary"), Some(Detected::Opaque));
        assert_eq!(classify(b"SSH-2.0-OpenSSH"), Some(Detected::Opaque));
        // Still ambiguous: could become HTTP.
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"PRI * HTTP/2"), None);
        assert_eq!(classify(b"P"), None);
        // PUT is HTTP/1, not a broken preface.
        assert_eq!(classify(b"PUT /a HTTP/1.1"), Some(Detected::Http1));
    }
}

//! The server name a TLS client asks for (SNI), read from its ClientHello without
//! consuming it, so TLS can be routed by name and still forwarded byte for byte.

use std::time::Duration;

use tokio::net::TcpStream;

/// The most of a ClientHello looked at (one TLS record holds at most 16 KiB).
const MAX_HELLO: usize = 16 * 1024 + 5;

/// What reading a ClientHello so far gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Hello {
    /// More bytes are needed.
    Partial,
    /// A ClientHello with this server name, or none.
    Name(Option<String>),
    /// Not a ClientHello weft can read.
    Invalid,
}

/// Read the server_name extension of the ClientHello at the start of `b`.
pub fn server_name(b: &[u8]) -> Hello {
    // TLS record: type 22 (handshake), version, length; then handshake type 1, length.
    if b.len() < 5 {
        return Hello::Partial;
    }
    if b[0] != 0x16 {
        return Hello::Invalid;
    }
    let record_len = usize::from(u16::from_be_bytes([b[3], b[4]]));
    let Some(record) = b.get(5..5 + record_len) else {
        return if 5 + record_len > MAX_HELLO {
            Hello::Invalid
        } else {
            Hello::Partial
        };
    };
    parse_hello(record).map_or(Hello::Invalid, Hello::Name)
}

fn parse_hello(r: &[u8]) -> Option<Option<String>> {
    let mut c = Cursor(r);
    if c.u8()? != 1 {
        return None; // not a ClientHello
    }
    let len = c.u24()?;
    let mut c = Cursor(c.take(len)?);
    c.take(2 + 32)?; // client version, random
    let n = usize::from(c.u8()?);
    c.take(n)?; // session id
    let n = c.u16()?;
    c.take(n)?; // cipher suites
    let n = usize::from(c.u8()?);
    c.take(n)?; // compression methods
    if c.0.is_empty() {
        return Some(None); // no extensions
    }
    let n = c.u16()?;
    let mut exts = Cursor(c.take(n)?);
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let n = exts.u16()?;
        let data = exts.take(n)?;
        if kind != 0 {
            continue;
        }
        let mut list = Cursor(data);
        let n = list.u16()?;
        let mut names = Cursor(list.take(n)?);
        while !names.0.is_empty() {
            let name_type = names.u8()?;
            let n = names.u16()?;
            let name = names.take(n)?;
            if name_type == 0 {
                let name = std::str::from_utf8(name).ok()?;
                return Some(Some(name.trim_end_matches('.').to_ascii_lowercase()));
            }
        }
    }
    Some(None)
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (a, b) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u16(&mut self) -> Option<usize> {
        let b = self.take(2)?;
        Some(usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
    fn u24(&mut self) -> Option<usize> {
        let b = self.take(3)?;
        Some((usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]))
    }
}

/// Peek at the client's ClientHello for up to `wait`; `None` when it has no readable
/// server name in time.
pub async fn peek_server_name(conn: &TcpStream, wait: Duration) -> Option<String> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = vec![0u8; MAX_HELLO];
    let mut last = 0;
    loop {
        let n = tokio::time::timeout_at(deadline, conn.peek(&mut buf))
            .await
            .ok()?
            .ok()?;
        match server_name(&buf[..n]) {
            Hello::Name(name) => return name,
            Hello::Invalid => return None,
            Hello::Partial if n == 0 || (n == last && n == buf.len()) => return None,
            // Peek answers at once while any byte is queued, so the timeout above never
            // fires for a client that sent part of a hello and stopped: check the clock.
            Hello::Partial if tokio::time::Instant::now() >= deadline => return None,
            Hello::Partial => {
                last = n;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

/// Does `pattern` (a name, or `*.` and a suffix of at least one label) cover `name`?
pub fn name_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => name
            .strip_suffix(suffix)
            .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        None => pattern == name,
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A minimal ClientHello asking for `name` (also used by weft-testpod's twin).
    pub fn client_hello(name: &str) -> Vec<u8> {
        let mut sni = vec![0u8];
        sni.extend((name.len() as u16).to_be_bytes());
        sni.extend(name.as_bytes());
        let mut list = (sni.len() as u16).to_be_bytes().to_vec();
        list.extend(sni);
        let mut ext = vec![0, 0];
        ext.extend((list.len() as u16).to_be_bytes());
        ext.extend(list);
        let mut body = vec![3, 3];
        body.extend([7u8; 32]);
        body.extend([0, 0, 2, 0x13, 0x01, 1, 0]);
        body.extend((ext.len() as u16).to_be_bytes());
        body.extend(ext);
        let mut hs = vec![1, 0];
        hs.extend((body.len() as u16).to_be_bytes());
        hs.extend(body);
        let mut rec = vec![0x16, 3, 1];
        rec.extend((hs.len() as u16).to_be_bytes());
        rec.extend(hs);
        rec
    }

    #[test]
    fn reads_the_server_name() {
        let h = client_hello("API.Example.com.");
        assert_eq!(server_name(&h), Hello::Name(Some("api.example.com".into())));
        assert_eq!(server_name(&h[..h.len() - 3]), Hello::Partial);
        assert_eq!(server_name(b"GET / HTTP/1.1"), Hello::Invalid);
    }

    #[test]
    fn wildcards_cover_one_or_more_labels() {
        assert!(name_matches("*.example.com", "a.example.com"));
        assert!(name_matches("*.example.com", "a.b.example.com"));
        assert!(!name_matches("*.example.com", "example.com"));
        assert!(name_matches("a.example.com", "a.example.com"));
        assert!(!name_matches("a.example.com", "b.example.com"));
    }
}

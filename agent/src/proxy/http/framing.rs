//! Request smuggling guard for HTTP/1.1 clients. hyper reads a request carrying both
//! `Content-Length` and `Transfer-Encoding` by its chunked framing, drops the length and
//! closes the connection afterwards; weft goes further and refuses such a request with
//! 400, because two framings in one request mean some hop on the path may read it
//! differently. hyper has removed the evidence by the time the request reaches the proxy,
//! so [`Inspected`] follows the request framing of the bytes the client sends (heads,
//! content-length and chunked bodies) and notes which request, counted from 0, had both.
//! It follows every request of the connection, until a CONNECT or an upgrade the upstream
//! accepted turns the bytes into something else.

use std::{
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        Arc,
    },
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Longest request head followed; longer ones are hyper's to refuse (431).
const MAX_HEAD: usize = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Collecting a request head (in `Framing::buf`).
    Head,
    /// Skipping this many body bytes.
    Body(u64),
    /// Reading a chunk-size line (in `Framing::buf`).
    ChunkSize,
    /// Skipping chunk data, then its CRLF.
    ChunkData(u64),
    /// Reading trailer lines after the last chunk, until an empty one.
    Trailers,
    /// No longer following: a CONNECT, a framing we could not read, or the request
    /// found (hyper closes the connection after it).
    Stopped,
}

/// What the request handlers and the byte stream share about a connection's framing.
#[derive(Debug)]
pub struct Control {
    /// Index of the request with both framings, `u64::MAX` while none.
    conflicting: AtomicU64,
    /// Set once the connection was upgraded: the bytes are no longer requests.
    stopped: AtomicBool,
}

impl Default for Control {
    fn default() -> Self {
        Self {
            conflicting: AtomicU64::new(u64::MAX),
            stopped: AtomicBool::new(false),
        }
    }
}

impl Control {
    /// Did request `index` (from 0) carry both framings?
    pub fn conflicting(&self, index: u64) -> bool {
        self.conflicting.load(Relaxed) == index
    }

    /// Stop following: the connection was upgraded.
    pub fn stop(&self) {
        self.stopped.store(true, Relaxed);
    }
}

/// Follows the requests in a client's byte stream.
#[derive(Debug)]
pub struct Framing {
    state: State,
    /// The line or head being collected, reused from one to the next.
    buf: Vec<u8>,
    /// Index of the next request head.
    next: u64,
    pub control: Arc<Control>,
}

impl Default for Framing {
    fn default() -> Self {
        Self {
            state: State::Head,
            buf: Vec::new(),
            next: 0,
            control: Arc::new(Control::default()),
        }
    }
}

/// `line` without its trailing CR/LF and surrounding blanks.
fn trim(line: &[u8]) -> &[u8] {
    line.trim_ascii()
}

impl Framing {
    /// Feed bytes the client sent.
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match &mut self.state {
                State::Stopped => return,
                State::Body(n) | State::ChunkData(n) => {
                    let k = (*n).min(data.len() as u64);
                    *n -= k;
                    data = &data[k as usize..];
                    if *n == 0 {
                        // After chunk data, its CRLF is read as an empty size line.
                        self.state = match self.state {
                            State::Body(_) => State::Head,
                            _ => State::ChunkSize,
                        };
                    }
                }
                State::Head | State::ChunkSize | State::Trailers => {
                    let Some(end) = data.iter().position(|&b| b == b'\n') else {
                        self.buf.extend_from_slice(data);
                        if self.buf.len() > MAX_HEAD {
                            self.stop();
                        }
                        return;
                    };
                    self.buf.extend_from_slice(&data[..=end]);
                    data = &data[end + 1..];
                    self.line_done();
                }
            }
        }
    }

    fn stop(&mut self) {
        self.state = State::Stopped;
        self.buf = Vec::new();
    }

    /// A line ended in the current line-based state.
    fn line_done(&mut self) {
        match self.state {
            State::Head => {
                let blank = self.buf.ends_with(b"\r\n\r\n") || self.buf.ends_with(b"\n\n");
                if self.buf == b"\r\n" || self.buf == b"\n" {
                    self.buf.clear(); // blank lines between requests are allowed
                } else if blank {
                    self.head_done();
                } else if self.buf.len() > MAX_HEAD {
                    self.stop();
                }
            }
            State::ChunkSize => {
                let line = trim(&self.buf);
                if line.is_empty() {
                    self.buf.clear(); // the CRLF after chunk data
                    return;
                }
                let hex = line.split(|&b| b == b';').next().map_or(&b""[..], trim);
                let size = std::str::from_utf8(hex)
                    .ok()
                    .and_then(|h| u64::from_str_radix(h, 16).ok());
                self.buf.clear();
                match size {
                    Some(0) => self.state = State::Trailers,
                    Some(n) => self.state = State::ChunkData(n),
                    None => self.stop(),
                }
            }
            State::Trailers => {
                if self.buf == b"\r\n" || self.buf == b"\n" {
                    self.state = State::Head;
                }
                self.buf.clear();
            }
            _ => {}
        }
    }

    /// A whole head is in `buf`: how its body is framed, and whether it has both framings.
    fn head_done(&mut self) {
        let index = self.next;
        self.next += 1;
        let mut lines = self.buf.split(|&b| b == b'\n');
        let connect = lines.next().is_some_and(|l| l.starts_with(b"CONNECT "));
        let (mut length, mut chunked, mut te) = (None, false, false);
        for l in lines {
            let Some(colon) = l.iter().position(|&b| b == b':') else {
                continue;
            };
            let (name, value) = (trim(&l[..colon]), trim(&l[colon + 1..]));
            if name.eq_ignore_ascii_case(b"content-length") {
                length = std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok())
                    .or(Some(u64::MAX));
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                te = true;
                chunked =
                    value.len() >= 7 && value[value.len() - 7..].eq_ignore_ascii_case(b"chunked");
            }
        }
        self.buf.clear();
        self.state = if te && length.is_some() {
            self.control.conflicting.store(index, Relaxed);
            State::Stopped
        } else if connect {
            // After a 2xx the connection is a tunnel (hyper upgrades it).
            State::Stopped
        } else if te {
            if chunked {
                State::ChunkSize
            } else {
                State::Stopped
            }
        } else {
            match length {
                None | Some(0) => State::Head,
                Some(u64::MAX) => State::Stopped,
                Some(n) => State::Body(n),
            }
        };
    }
}

/// A client connection whose incoming bytes pass through a [`Framing`] (HTTP/1.1), or
/// through nothing (HTTP/2, which frames every request itself).
pub struct Inspected<T> {
    inner: T,
    framing: Option<Framing>,
}

impl<T> Inspected<T> {
    pub fn new(inner: T) -> (Self, Arc<Control>) {
        let framing = Framing::default();
        let control = framing.control.clone();
        (
            Self {
                inner,
                framing: Some(framing),
            },
            control,
        )
    }

    pub fn passthrough(inner: T) -> Self {
        Self {
            inner,
            framing: None,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Inspected<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(f)) = (&r, &mut this.framing) {
            if f.control.stopped.load(Relaxed) {
                this.framing = None;
            } else {
                f.feed(&buf.filled()[before..]);
            }
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Inspected<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conflicting(stream: &[u8], split: usize) -> u64 {
        let mut f = Framing::default();
        for part in stream.chunks(split) {
            f.feed(part);
        }
        f.control.conflicting.load(Relaxed)
    }

    #[test]
    fn finds_the_request_with_both_framings_after_others() {
        let s = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n\
POST /a HTTP/1.1\r\ncontent-length: 5\r\n\r\nhello\
POST /b HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n5;x=y\r\nCL: 1\r\n0\r\nx-t: 1\r\n\r\n\
POST /c HTTP/1.1\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n";
        for split in [1, 3, 7, 1000] {
            assert_eq!(conflicting(s, split), 3, "split {split}");
        }
    }

    #[test]
    fn bodies_that_look_like_heads_are_skipped() {
        let fake = "GET / HTTP/1.1\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n";
        let s = format!(
            "POST / HTTP/1.1\r\ncontent-length: {}\r\n\r\n{fake}",
            fake.len()
        );
        assert_eq!(conflicting(s.as_bytes(), 5), u64::MAX);
    }

    #[test]
    fn requests_after_an_upgrade_header_are_still_checked() {
        // An Upgrade header alone (or an upgrade the upstream declined) leaves the
        // connection speaking HTTP: the next request is checked like any other.
        let s = b"GET / HTTP/1.1\r\nupgrade: websocket\r\n\r\n\
GET / HTTP/1.1\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n\
GET / HTTP/1.1\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n";
        assert_eq!(conflicting(s, 10), 2);
    }

    #[test]
    fn connect_stops_the_inspection() {
        let s = b"CONNECT a:443 HTTP/1.1\r\nhost: a:443\r\n\r\n\
GET / HTTP/1.1\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n";
        assert_eq!(conflicting(s, 10), u64::MAX);
    }
}

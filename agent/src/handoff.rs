//! Listener handoff for restarts without a refused connection.
//!
//! A running agent serves a Unix socket (`<run-dir>/handoff.sock`). A new agent on the same
//! node connects to it before enrolling pods, asks for the listeners, and receives every
//! pod's listening sockets and the node's tunnel listener as file descriptors (SCM_RIGHTS).
//! From then on both processes hold the same sockets: the new agent accepts, the old one
//! stops accepting and drains its open connections. No listener is ever closed, so no connect is refused or reset.
//!
//! Wire format, one message per listener: 8 bytes netns cookie (little endian), 1 byte
//! [`ListenerKind`], one fd. A final message with kind 255 and no fd ends the list.
//!
//! The listeners are the pods' traffic: they go only to root running this agent's
//! executable (checked with SO_PEERCRED and /proc, peer.rs), and each received descriptor
//! is checked to be the listening socket it is announced as.

use std::{
    collections::HashMap,
    io::{self, IoSlice, IoSliceMut, Read as _, Write as _},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
    path::Path,
    time::Duration,
};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

const REQUEST: &[u8] = b"TAKEOVER\n";
const END: u8 = 255;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[repr(u8)]
pub enum ListenerKind {
    Outbound = 0,
    Inbound = 1,
    Tunnel = 2,
}

impl ListenerKind {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Outbound),
            1 => Some(Self::Inbound),
            2 => Some(Self::Tunnel),
            _ => None,
        }
    }

    /// The port this kind of listener is bound to (inside a pod; the tunnel's on the node).
    pub fn port(self) -> u16 {
        match self {
            Self::Outbound => weft_common::OUTBOUND_PORT,
            Self::Inbound => weft_common::INBOUND_PORT,
            Self::Tunnel => weft_common::TUNNEL_PORT,
        }
    }

    pub fn action(self) -> &'static str {
        match self {
            Self::Outbound => "binding the outbound listener (127.0.0.1:15001)",
            Self::Inbound => "binding the inbound listener (127.0.0.1:15006)",
            Self::Tunnel => "binding the tunnel listener (the node's address, port 15008)",
        }
    }
}

/// Listeners received from a predecessor, by pod netns cookie and kind.
#[derive(Default)]
pub struct Inherited(HashMap<(u64, ListenerKind), std::net::TcpListener>);

impl Inherited {
    pub fn take(&mut self, cookie: u64, kind: ListenerKind) -> Option<std::net::TcpListener> {
        self.0.remove(&(cookie, kind))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Ask the agent listening at `path` for its listeners. No agent there is not an error.
pub fn receive(path: &Path) -> io::Result<Inherited> {
    let mut s = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(Inherited::default());
        }
        Err(e) => return Err(e),
    };
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(REQUEST)?;
    let mut out = Inherited::default();
    loop {
        let mut buf = [0u8; 9];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut cmsg = nix::cmsg_space!([RawFd; 1]);
        let msg = recvmsg::<()>(
            s.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let mut fd = None;
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                // SAFETY: the kernel just installed these fds in our table; we own them.
                fd = fds.first().map(|&f| unsafe { OwnedFd::from_raw_fd(f) });
            }
        }
        if msg.bytes == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "predecessor closed the handoff early",
            ));
        }
        if buf[8] == END {
            return Ok(out);
        }
        let cookie = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
        let (Some(kind), Some(fd)) = (ListenerKind::from_u8(buf[8]), fd) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "malformed handoff message",
            ));
        };
        check_listener(&fd, cookie, kind)?;
        let l = std::net::TcpListener::from(fd);
        l.set_nonblocking(true)?;
        out.0.insert((cookie, kind), l);
    }
}

/// A received descriptor must be what the message says it is: a listening IPv4 TCP socket
/// on the kind's port, in the network namespace with that cookie. Anything else (a
/// confused or hostile sender) is refused rather than served on.
fn check_listener(fd: &OwnedFd, cookie: u64, kind: ListenerKind) -> io::Result<()> {
    use nix::sys::socket::{getsockopt, sockopt};
    let bad = |what: String| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("handed-over descriptor: {what}"),
        )
    };
    let listening = getsockopt(fd, sockopt::AcceptConn).map_err(io::Error::from)?;
    let stream = getsockopt(fd, sockopt::SockType).map_err(io::Error::from)?
        == nix::sys::socket::SockType::Stream;
    if !listening || !stream {
        return Err(bad(format!("{kind:?} is not a listening TCP socket")));
    }
    let netns = crate::netns::netns_cookie(fd)?;
    if netns != cookie {
        return Err(bad(format!(
            "{kind:?} lives in netns {netns}, not in {cookie} as announced"
        )));
    }
    match nix::sys::socket::getsockname::<nix::sys::socket::SockaddrIn>(fd.as_raw_fd()) {
        Ok(a) if a.port() == kind.port() => Ok(()),
        Ok(a) => Err(bad(format!(
            "{kind:?} is bound to port {}, not {}",
            a.port(),
            kind.port()
        ))),
        Err(e) => Err(bad(format!("{kind:?} has no IPv4 address: {e}"))),
    }
}

/// Answer one successor on `stream`: check that it is this agent's executable, running as
/// root, wait for its request, send every listener.
pub fn send(mut stream: UnixStream, listeners: &[(u64, ListenerKind, RawFd)]) -> io::Result<()> {
    crate::peer::check_same_agent(&stream).map_err(io::Error::other)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req = [0u8; REQUEST.len()];
    stream.read_exact(&mut req)?;
    if req != REQUEST {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "unexpected handoff request",
        ));
    }
    for &(cookie, kind, fd) in listeners {
        let mut buf = [0u8; 9];
        buf[..8].copy_from_slice(&cookie.to_le_bytes());
        buf[8] = kind as u8;
        let fds = [fd];
        sendmsg::<()>(
            stream.as_raw_fd(),
            &[IoSlice::new(&buf)],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )?;
    }
    let mut end = [0u8; 9];
    end[8] = END;
    stream.write_all(&end)?;
    Ok(())
}

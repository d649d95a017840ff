//! Pod network namespaces: a handle to one, and the sockets the agent makes inside it.
//!
//! A socket belongs to the network namespace it was created in, whatever thread uses it
//! later. So to make a socket in a pod, the calling thread enters the pod's namespace with
//! setns(2), creates (and, for listeners, binds) the socket, and returns to the agent's own
//! namespace before doing anything else. The sockets then live in tokio like any other.

use std::{
    fs::File,
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::Arc,
};

use nix::sched::{setns, CloneFlags};
use socket2::{Domain, Protocol, Socket, Type};

/// The agent's own network namespace, captured at start, to return to after each visit.
#[derive(Debug)]
pub struct HostNetns(OwnedFd);

impl HostNetns {
    pub fn current() -> io::Result<Arc<Self>> {
        Ok(Arc::new(Self(
            File::open("/proc/thread-self/ns/net")?.into(),
        )))
    }
}

/// An open handle to a pod's network namespace.
#[derive(Debug)]
pub struct PodNetns {
    path: PathBuf,
    fd: OwnedFd,
    host: Arc<HostNetns>,
    /// The kernel's cookie for this namespace (what eBPF's bpf_get_netns_cookie returns).
    cookie: u64,
}

impl PodNetns {
    pub fn open(path: &Path, host: Arc<HostNetns>) -> io::Result<Self> {
        let fd: OwnedFd = File::open(path)
            .map_err(|e| {
                io::Error::new(e.kind(), format!("opening netns {}: {e}", path.display()))
            })?
            .into();
        let mut ns = Self {
            path: path.to_owned(),
            fd,
            host,
            cookie: 0,
        };
        let probe = ns.run(|| Socket::new(Domain::IPV4, Type::DGRAM, None))??;
        ns.cookie = netns_cookie(&probe)?;
        Ok(ns)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Run `f` on this thread inside the pod's namespace, then return to the agent's.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        setns(&self.fd, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        let out = f();
        if let Err(e) = setns(&self.host.0, CloneFlags::CLONE_NEWNET) {
            // Carrying on would create the agent's next sockets in a pod: stop instead.
            eprintln!("fatal: cannot return to the agent's network namespace: {e}");
            std::process::abort();
        }
        Ok(out)
    }

    /// A listening TCP socket inside the pod (see [`listen`]).
    pub fn listen(&self, addr: SocketAddrV4, backlog: i32) -> io::Result<std::net::TcpListener> {
        self.run(|| listen(addr, backlog))?
    }

    /// An unconnected TCP socket inside the pod, ready for tokio's `TcpSocket::connect`.
    /// With `transparent_src`, it is bound to that (possibly foreign) address with
    /// IP_TRANSPARENT and marked with DELIVERY_MARK, so the app sees the original client
    /// as the source and its replies are routed back to the agent.
    pub fn tcp_socket(
        &self,
        transparent_src: Option<Ipv4Addr>,
    ) -> io::Result<tokio::net::TcpSocket> {
        let sock =
            self.run(|| Socket::new(Domain::IPV4, Type::STREAM.cloexec(), Some(Protocol::TCP)))??;
        if let Some(src) = transparent_src {
            sock.set_ip_transparent_v4(true)?;
            sock.set_mark(weft_common::DELIVERY_MARK)?;
            sock.bind(&SocketAddr::V4(SocketAddrV4::new(src, 0)).into())?;
        }
        sock.set_tcp_nodelay(true)?;
        sock.set_nonblocking(true)?;
        let std: std::net::TcpStream = sock.into();
        Ok(tokio::net::TcpSocket::from_std_stream(std))
    }
}

/// A non-blocking listening TCP socket in the calling thread's netns. SO_REUSEPORT lets a
/// restarting agent bind beside the old one while it drains.
pub fn listen(addr: SocketAddrV4, backlog: i32) -> io::Result<std::net::TcpListener> {
    listen_addr(SocketAddr::V4(addr), backlog)
}

/// [`listen`] for an IPv4 or IPv6 address.
pub fn listen_addr(addr: SocketAddr, backlog: i32) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.cloexec(),
        Some(Protocol::TCP),
    )?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.bind(&addr.into())?;
    s.listen(backlog)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// The cookie of the calling thread's netns.
pub fn own_netns_cookie() -> io::Result<u64> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM.cloexec(), None)?;
    netns_cookie(&s)
}

/// SO_NETNS_COOKIE of a socket: the cookie of the namespace it was created in.
pub fn netns_cookie(sock: &impl AsRawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: cookie and len are valid for writes of the sizes passed.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

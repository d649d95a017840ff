//! The seam between capture and proxy: where a captured connection wanted to go, and
//! telling inbound capture to let one of the agent's own deliveries through. The agent
//! answers from eBPF maps ([`crate::datapath::CaptureMaps`]); the in-process tests answer
//! from a table.

use std::net::SocketAddrV4;

use tokio::net::TcpStream;

pub trait Capture: Send + Sync + 'static {
    /// The original destination of the connection `client` opened from the pod whose
    /// netns cookie is `netns_cookie`. The record is used once: a later call may not find it.
    fn orig_dst(&self, netns_cookie: u64, client: SocketAddrV4) -> Option<SocketAddrV4>;
    /// The agent is about to connect `src` -> `dst` inside a pod: let it reach the app.
    fn announce_delivery(&self, src: SocketAddrV4, dst: SocketAddrV4) -> std::io::Result<()>;
    /// A delivery whose connect has ended (made or failed): forget it.
    fn withdraw_delivery(&self, src: SocketAddrV4, dst: SocketAddrV4);
    /// Offer the agent's end of a captured loopback connection for sk_msg acceleration.
    fn accelerate(&self, netns_cookie: u64, conn: &TcpStream) -> std::io::Result<()>;
}

impl Capture for crate::datapath::CaptureMaps {
    fn orig_dst(&self, netns_cookie: u64, client: SocketAddrV4) -> Option<SocketAddrV4> {
        self.take_orig_dst(netns_cookie, client)
    }

    fn announce_delivery(&self, src: SocketAddrV4, dst: SocketAddrV4) -> std::io::Result<()> {
        self.announce_delivery(src, dst)
    }

    fn withdraw_delivery(&self, src: SocketAddrV4, dst: SocketAddrV4) {
        self.withdraw_delivery(src, dst);
    }

    fn accelerate(&self, netns_cookie: u64, conn: &TcpStream) -> std::io::Result<()> {
        match (conn.local_addr()?, conn.peer_addr()?) {
            (std::net::SocketAddr::V4(l), std::net::SocketAddr::V4(r)) => {
                self.accelerate(netns_cookie, l, r, conn)
            }
            _ => Ok(()),
        }
    }
}

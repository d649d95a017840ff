//! The seam between the proxy and the pods' network namespaces. The proxy never creates a
//! socket itself: it asks a pod's [`PodSockets`] for one, so its connections leave from the
//! pod's own address (outbound) or reach an app as the original client (delivery). The
//! agent answers with [`crate::netns::PodNetns`] (setns into the pod); the in-process tests
//! answer with sockets on loopback addresses, so the proxy runs without root.

use std::{io, net::Ipv4Addr};

use tokio::net::TcpSocket;

use crate::netns::PodNetns;

/// Makes sockets as one pod.
pub trait PodSockets: Send + Sync + 'static {
    /// The key the capture maps know this pod by (its network namespace's cookie).
    fn netns_cookie(&self) -> u64;

    /// An unconnected TCP socket of the pod. With `transparent_src`, bound to that address
    /// (the original client's) so the app it connects to sees the real client, and marked
    /// so the app's replies come back to the agent.
    fn tcp_socket(&self, transparent_src: Option<Ipv4Addr>) -> io::Result<TcpSocket>;
}

impl PodSockets for PodNetns {
    fn netns_cookie(&self) -> u64 {
        self.cookie()
    }

    fn tcp_socket(&self, transparent_src: Option<Ipv4Addr>) -> io::Result<TcpSocket> {
        PodNetns::tcp_socket(self, transparent_src)
    }
}

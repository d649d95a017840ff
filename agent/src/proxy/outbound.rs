//! Outbound: the listener on 127.0.0.1:15001 inside a pod, where connect4 sends the pod's
//! service connects. Recovers the original destination, picks an endpoint, connects.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::atomic::Ordering,
};

use tokio::net::TcpStream;

use super::{deliver, splice, tunnel, ActiveGuard, PodCtx, PodListener, ProxyInputs};
use crate::{config::Protocol, netns::PodNetns, state::Endpoint};

/// Endpoints tried per connection before the client's connection is closed.
const MAX_CONNECT_ATTEMPTS: usize = 3;

/// The listener on 127.0.0.1:15001 inside one pod.
pub struct Outbound(PodListener);

impl Outbound {
    pub fn new(listener: PodListener) -> Self {
        Self(listener)
    }

    pub async fn run(self) {
        self.0.serve(handle).await;
    }
}

async fn handle(ctx: PodCtx, conn: TcpStream, peer: SocketAddrV4) {
    let PodCtx {
        pod,
        pod_ip,
        inputs,
    } = ctx;
    let m = &inputs.metrics;
    m.outbound_accepted.fetch_add(1, Ordering::Relaxed);
    let _active = ActiveGuard::new(m);
    // Before the agent writes a byte on this connection, so every byte it sends the app
    // takes the same path.
    if let Err(e) = inputs.capture.accelerate(pod.cookie(), &conn) {
        tracing::debug!(error = %e, "could not add the connection to LOCAL_SOCKS");
    }
    let Some(orig) = inputs.capture.orig_dst(pod.cookie(), peer) else {
        m.outbound_no_orig_dst.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%peer, pod = %pod_ip, "no original destination recorded for this connection; closing it");
        return;
    };
    let state = inputs.state.load();
    let Some(svc) = state.service(orig, Protocol::Tcp) else {
        m.outbound_no_service.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%orig, pod = %pod_ip, "connection to an address that is no longer a service; closing it");
        return;
    };
    // Try up to three endpoints: a connect failure (endpoint gone, its node's agent down)
    // moves on to the next one instead of failing the client.
    let attempts = svc.endpoints.len().min(MAX_CONNECT_ATTEMPTS);
    if attempts == 0 {
        m.outbound_no_endpoint.fetch_add(1, Ordering::Relaxed);
        tracing::info!(service = %svc.name, "no endpoint; closing the connection");
        return;
    }
    let candidates: Vec<Endpoint> = svc.candidates(attempts).cloned().collect();
    let local_node = state.node.clone();
    drop(state);
    for ep in candidates {
        match connect(&inputs, &pod, pod_ip, &ep, *ep.node == *local_node).await {
            Ok(upstream) => return splice(m, conn, upstream).await,
            Err(e) => {
                m.upstream_connect_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(endpoint = %ep.addr, workload = %ep.workload, error = %e, "connecting to the endpoint failed");
            }
        }
    }
}

async fn connect(
    inputs: &ProxyInputs,
    pod: &PodNetns,
    pod_ip: Ipv4Addr,
    ep: &Endpoint,
    local_node: bool,
) -> std::io::Result<TcpStream> {
    if ep.meshed && local_node {
        if let Some(dst_pod) = inputs.pods.load().get(ep.addr.ip()).cloned() {
            return deliver(&*inputs.capture, &dst_pod, pod_ip, ep.addr).await;
        }
    } else if ep.meshed {
        return tunnel::connect(pod, ep.addr).await;
    }
    // Not meshed (or not enrolled yet): a plain connection from inside the client pod.
    pod.tcp_socket(None)?.connect(ep.addr.into()).await
}

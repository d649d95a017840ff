//! Inbound: the listener inside a pod that sk_lookup steers the pod's declared ports to.
//! The connection's local address is the original destination (the pod's IP and port);
//! it is delivered to the app with the real client as source.

use std::{
    net::{SocketAddr, SocketAddrV4},
    sync::atomic::Ordering,
};

use tokio::net::TcpStream;

use super::{deliver, splice, ActiveGuard, PodCtx, PodListener};

/// The inbound listener (127.0.0.1:15006) inside one pod.
pub struct Inbound(PodListener);

impl Inbound {
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
    m.inbound_accepted.fetch_add(1, Ordering::Relaxed);
    let _active = ActiveGuard::new(m);
    let orig = match conn.local_addr() {
        Ok(SocketAddr::V4(a)) if *a.ip() == pod_ip => a,
        other => {
            tracing::warn!(?other, pod = %pod_ip, "inbound connection for another address; closing it");
            return;
        }
    };
    match deliver(&*inputs.capture, &pod, *peer.ip(), orig).await {
        Ok(app) => splice(m, conn, app).await,
        Err(e) => {
            m.upstream_connect_errors.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%orig, %peer, error = %e, "delivering to the app failed");
        }
    }
}

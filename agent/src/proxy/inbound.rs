//! Inbound: the listener inside a pod that sk_lookup steers the pod's declared ports to.
//! The connection's local address is the original destination (the pod's IP and port);
//! it is delivered to the app with the real client as source.

use std::net::SocketAddr;

use tokio::net::TcpStream;

use super::{conn::ConnCtx, dial, listener::PodListener, stream::forward};
use crate::metrics::Metrics;

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

async fn handle(ctx: ConnCtx, conn: TcpStream) {
    let (pod, peer) = (&ctx.pod, ctx.peer);
    let m = ctx.metrics();
    Metrics::inc(&m.inbound_accepted);
    let orig = match conn.local_addr() {
        Ok(SocketAddr::V4(a)) if *a.ip() == pod.ip => a,
        other => {
            tracing::warn!(?other, pod = %pod.ip, "inbound connection for another address; closing it");
            return;
        }
    };
    // From outside the mesh: plaintext, no identity, no HTTP judged.
    let http = crate::config::authz::Http::Opaque;
    if !super::authz::allowed(ctx.inputs(), *peer.ip(), None, orig, http, "inbound") {
        Metrics::inc(&m.policy_denied);
        return;
    }
    match dial::deliver(ctx.inputs(), &*pod.sockets, *peer.ip(), orig).await {
        Ok(app) => {
            forward(m, conn, app, ctx.timeouts().idle).await;
        }
        Err(e) => tracing::info!(%orig, %peer, error = %e, "delivering to the app failed"),
    }
}

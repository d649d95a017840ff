//! Inbound: the listener inside a pod that sk_lookup steers every TCP connection for the
//! pod's IP to, on any port, except the agent's own deliveries. What arrives here came
//! from outside the mesh (meshed clients come through their agent and the tunnel), so it
//! is plaintext with no identity: a STRICT pod refuses it, a PERMISSIVE one delivers it
//! (authorization policy permitting). The connection's local address is the original
//! destination (the pod's IP and port); it is delivered with the real client as source.

use std::net::SocketAddr;

use tokio::net::TcpStream;

use super::{conn::ConnCtx, dial, listener::PodListener, stream::forward};
use crate::{config::Mtls, metrics::Metrics};

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
    {
        let state = ctx.inputs().state.load();
        if !super::authz::quarantine_admits(ctx.inputs(), &state, pod.ip, *peer.ip(), None) {
            super::listener::reset(&conn);
            return;
        }
        // The pod calling itself at its own address is not from outside.
        if peer.ip() != &pod.ip {
            let mode = state.local.get(&pod.ip).map(|w| w.mtls).unwrap_or_default();
            if mode == Mtls::Strict {
                Metrics::inc(&m.inbound_plaintext_refused);
                tracing::info!(%peer, %orig, "STRICT: plaintext connection from outside the mesh refused");
                super::listener::reset(&conn);
                return;
            }
            Metrics::inc(&m.inbound_plaintext);
        }
        // From outside the mesh: plaintext, no identity, no HTTP judged.
        let http = crate::config::authz::Http::Opaque;
        if !super::authz::allowed(
            &state,
            ctx.inputs(),
            *peer.ip(),
            None,
            orig,
            http,
            "inbound",
        ) {
            Metrics::inc(&m.policy_denied);
            return;
        }
    }
    match dial::deliver(ctx.inputs(), &*pod.sockets, *peer.ip(), orig).await {
        Ok(app) => {
            forward(m, conn, app, ctx.timeouts().idle).await;
        }
        Err(e) => tracing::info!(%orig, %peer, error = %e, "delivering to the app failed"),
    }
}

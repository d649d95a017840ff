//! Inbound: the listener inside a pod that sk_lookup steers the pod's declared ports to.
//! The connection's local address is the original destination (the pod's IP and port);
//! it is delivered to the app with the real client as source.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{atomic::Ordering, Arc},
};

use tokio::net::{TcpListener, TcpStream};

use super::{accept_loop, deliver, splice, ActiveGuard, ProxyInputs};
use crate::netns::PodNetns;

pub struct Inbound {
    listener: TcpListener,
    pod: Arc<PodNetns>,
    pod_ip: Ipv4Addr,
    inputs: ProxyInputs,
}

impl Inbound {
    pub fn new(
        listener: TcpListener,
        pod: Arc<PodNetns>,
        pod_ip: Ipv4Addr,
        inputs: ProxyInputs,
    ) -> Self {
        Self {
            listener,
            pod,
            pod_ip,
            inputs,
        }
    }

    pub async fn run(self) {
        let Self {
            listener,
            pod,
            pod_ip,
            inputs,
        } = self;
        let stop = inputs.stop.clone();
        accept_loop(listener, stop, move |conn, peer| {
            let (pod, inputs) = (pod.clone(), inputs.clone());
            async move { handle(inputs, pod, pod_ip, conn, peer).await }
        })
        .await;
    }
}

async fn handle(
    inputs: ProxyInputs,
    pod: Arc<PodNetns>,
    pod_ip: Ipv4Addr,
    conn: TcpStream,
    peer: SocketAddrV4,
) {
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

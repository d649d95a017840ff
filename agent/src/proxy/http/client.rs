//! Upstream HTTP clients of one pod: connection pools (HTTP/1.1 and HTTP/2) whose
//! connections are opened the way weft reaches each endpoint ([`crate::proxy::dial`]):
//! inside the endpoint's pod, through its node's agent, or directly, always from the
//! client pod so its address stays the source, always under the connect timeout.

use std::{
    future::Future,
    net::SocketAddrV4,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use hyper::Uri;
use hyper_util::{
    client::legacy::{
        connect::{Connected, Connection},
        Client,
    },
    rt::{TokioExecutor, TokioIo, TokioTimer},
};

use crate::proxy::{
    conn::Pod,
    dial::{dial, Reach},
    stream::Stream,
};

/// How long an unused pooled connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(90);

impl Connection for Stream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

/// Opens upstream connections for one pod. The URI's authority is the endpoint address.
#[derive(Clone)]
pub struct PodConnector(Arc<Pod>);

impl tower_service::Service<Uri> for PodConnector {
    type Response = TokioIo<Stream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let pod = self.0.clone();
        Box::pin(async move {
            let addr: SocketAddrV4 = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("not an endpoint address: {uri}"),
                    )
                })?;
            let reach = Reach::of(&pod.inputs.state.load(), *addr.ip());
            let s = dial(&pod.inputs, &*pod.sockets, pod.ip, addr, reach).await?;
            Ok(TokioIo::new(s))
        })
    }
}

/// The pools of one pod.
pub struct Clients {
    pub h1: Client<PodConnector, super::Body>,
    pub h2: Client<PodConnector, super::Body>,
}

impl Clients {
    pub fn new(pod: Arc<Pod>) -> Self {
        let t = pod.inputs.config.timeouts;
        let connector = PodConnector(pod);
        let builder = || {
            let mut b = Client::builder(TokioExecutor::new());
            b.pool_idle_timeout(POOL_IDLE)
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .http2_keep_alive_interval(t.h2_keepalive_interval)
                .http2_keep_alive_timeout(t.h2_keepalive_timeout);
            b
        };
        Self {
            h1: builder().build(connector.clone()),
            h2: builder().http2_only(true).build(connector),
        }
    }
}

//! Upstream HTTP clients of one pod: connection pools (HTTP/1.1 and HTTP/2) whose
//! connections are opened the way weft reaches each endpoint ([`super::super::dial`]):
//! inside the endpoint's pod, through its node's agent, or directly, always from the
//! client pod so its address stays the source.

use std::{
    future::Future,
    net::SocketAddrV4,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use hyper::Uri;
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo, TokioTimer},
};
use tokio::net::TcpStream;

use super::super::{dial, PodCtx, Reach};

/// Opens upstream connections for one pod. The URI's authority is the endpoint address.
#[derive(Clone)]
pub struct PodConnector(PodCtx);

impl tower_service::Service<Uri> for PodConnector {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let ctx = self.0.clone();
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
            let reach = Reach::of(&ctx.inputs.state.load(), *addr.ip());
            let s = dial(&ctx.inputs, &ctx.pod, ctx.pod_ip, addr, reach).await?;
            s.set_nodelay(true)?;
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
    pub fn new(ctx: PodCtx) -> Self {
        let connector = PodConnector(ctx);
        let builder = || {
            let mut b = Client::builder(TokioExecutor::new());
            b.pool_idle_timeout(Duration::from_secs(90))
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new());
            b
        };
        Self {
            h1: builder().build(connector.clone()),
            h2: builder().http2_only(true).build(connector),
        }
    }
}

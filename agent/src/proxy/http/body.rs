//! Request and response bodies as the proxy handles them: the client's body, watched so a
//! broken or stalled body is known to be the client's doing ([`ClientBody`]); a body read
//! into memory so it can be sent more than once ([`RequestBody`]); and the response body
//! that holds what a request keeps busy until its last byte ([`Tracked`]).

use std::{
    future::Future as _,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, AtomicU8, Ordering::Relaxed},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};

use crate::proxy::error::Reason;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of every request and response the proxy sends.
pub type Body = BoxBody<Bytes, BoxError>;

/// The largest request body read into memory so it can be retried or mirrored; larger or
/// unknown-length bodies stream through once.
pub const MAX_BUFFERED_BODY: usize = 64 * 1024;

/// What went wrong with a client's body, if anything, and how many bytes of it arrived
/// (shared between the body, which is moved into the upstream request, and the request's
/// handler). A request without a body has nothing to share and allocates nothing.
#[derive(Clone, Debug, Default)]
pub struct ClientFault(Option<Arc<Watched>>);

#[derive(Debug, Default)]
pub struct Watched {
    fault: AtomicU8,
    bytes: AtomicU64,
}

impl ClientFault {
    const BROKEN: u8 = 1;
    const STALLED: u8 = 2;

    /// For a request that has a body.
    pub fn watch() -> Self {
        Self(Some(Arc::default()))
    }

    fn set(&self, v: u8) {
        if let Some(f) = &self.0 {
            let _ = f.fault.compare_exchange(0, v, Relaxed, Relaxed);
        }
    }

    /// Bytes of the body read from the client so far.
    pub fn bytes(&self) -> u64 {
        self.0.as_ref().map_or(0, |w| w.bytes.load(Relaxed))
    }

    /// The answer the client's fault calls for, if its body failed.
    pub fn reason(&self) -> Option<Reason> {
        match self.0.as_ref()?.fault.load(Relaxed) {
            Self::BROKEN => Some(Reason::BadRequestBody),
            Self::STALLED => Some(Reason::RequestBodyTimeout),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the client sent nothing of its request body for {0:?}")]
struct BodyStalled(Duration);

/// The client's request body on its way upstream: an error from it, or a pause longer
/// than `stall`, is recorded in [`ClientFault`] and ends the body with an error (so the
/// upstream request is aborted, never completed with a truncated body).
pub struct ClientBody {
    inner: Incoming,
    fault: ClientFault,
    stall: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl ClientBody {
    pub fn new(inner: Incoming, fault: ClientFault, stall: Duration) -> Self {
        Self {
            inner,
            fault,
            stall,
            timer: None,
        }
    }
}

impl hyper::body::Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => {
                this.fault.set(ClientFault::BROKEN);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(other) => {
                this.timer = None;
                if let (Some(Ok(frame)), Some(w)) = (&other, &this.fault.0) {
                    if let Some(d) = frame.data_ref() {
                        w.bytes.fetch_add(d.len() as u64, Relaxed);
                    }
                }
                Poll::Ready(other.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => {
                let stall = this.stall;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        this.fault.set(ClientFault::STALLED);
                        Poll::Ready(Some(Err(BodyStalled(stall).into())))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body: as it streams from the client, or read into memory so it can be sent
/// more than once.
pub enum RequestBody {
    /// `None` once sent.
    Stream(Option<ClientBody>),
    Buffered(Bytes),
}

impl RequestBody {
    /// Read a body of declared length up to [`MAX_BUFFERED_BODY`] into memory within
    /// `deadline`; longer or unknown-length bodies keep streaming (and are sent once). A
    /// body that breaks or is late is the client's fault and answered as such.
    pub async fn buffer(self, deadline: Duration) -> Result<Self, Reason> {
        let Self::Stream(Some(b)) = self else {
            return Ok(self);
        };
        match b.size_hint().exact() {
            Some(n) if n <= MAX_BUFFERED_BODY as u64 => {
                let fault = b.fault.clone();
                let read = Limited::new(b, MAX_BUFFERED_BODY).collect();
                match tokio::time::timeout(deadline, read).await {
                    Ok(Ok(c)) => Ok(Self::Buffered(c.to_bytes())),
                    Ok(Err(_)) => Err(fault.reason().unwrap_or(Reason::BadRequestBody)),
                    Err(_) => Err(Reason::RequestBodyTimeout),
                }
            }
            _ => Ok(Self::Stream(Some(b))),
        }
    }

    pub fn replayable(&self) -> bool {
        matches!(self, Self::Buffered(_))
    }

    /// The body for one attempt; `None` once a streamed body has been sent.
    pub fn take(&mut self) -> Option<Body> {
        match self {
            Self::Buffered(b) => Some(full(b.clone())),
            Self::Stream(b) => b.take().map(BodyExt::boxed),
        }
    }
}

/// A body of these bytes.
pub fn full(b: Bytes) -> Body {
    Full::new(b).map_err(|n| match n {}).boxed()
}

/// The response body on its way to the client, holding whatever the request keeps busy
/// (breaker slot, in-flight counts) until the body ends or the client goes away.
pub struct Tracked<H: Send + Sync + 'static> {
    pub inner: Incoming,
    pub held: H,
}

impl<H: Send + Sync + Unpin + 'static> hyper::body::Body for Tracked<H> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.get_mut().inner)
            .poll_frame(cx)
            .map(|f| f.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An upstream response body, as the proxy's body type.
pub fn incoming(b: Incoming) -> Body {
    b.map_err(Into::into).boxed()
}

/// The same body type with an unrelated error type, as the proxy's body type.
pub fn boxed<B>(b: B) -> Body
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    b.map_err(Into::into).boxed()
}

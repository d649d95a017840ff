//! The client side's connections to peer agents: one mTLS HTTP/2 connection per (source
//! identity, destination identity, destination node), shared by every pod connection
//! between them. A connection is made on first use (callers for the same key wait for
//! the one handshake), replaced once it closes, and let go after the idle timeout
//! without streams; at most [`MAX_KEYS`] are kept.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ClientConfig;
use tokio::{net::TcpSocket, time::Instant};

use super::TunnelError;
use crate::{
    identity::{certs::CertStore, not_after, not_before, tls, unix_now, SpiffeId},
    metrics::Metrics,
    proxy::{
        conn::Timeouts,
        dial::{self, DialError},
    },
};

/// Pooled connections kept at most (beyond, idle ones are let go first).
pub const MAX_KEYS: usize = 4096;

/// HTTP/2 flow-control windows of tunnel connections: large enough that one stream can
/// fill a fast link (64 KiB, HTTP/2's default, caps a stream at 64 KiB per round trip).
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub const MAX_FRAME: u32 = 64 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    pub src: SpiffeId,
    pub dst: SpiffeId,
    pub node: SocketAddrV4,
}

type Sender = SendRequest<Empty<Bytes>>;

#[derive(Default)]
struct Slot {
    sender: Option<Sender>,
    last_used: Option<Instant>,
    /// When the connection stops taking new streams (seconds since the epoch): before
    /// either certificate of its handshake expires.
    retire_at: i64,
    /// Which connection this is (counts up per key), so only a failing one is forgotten.
    generation: u64,
}

/// A connection's sender and which connection it is.
pub struct Pooled {
    pub sender: Sender,
    pub generation: u64,
}

/// When a connection authenticated by certificates valid `[nb1, na1]` and `[nb2, na2]`
/// should stop taking streams: 90% into the shorter-lived one's validity.
fn retire_at(a: (i64, i64), b: (i64, i64)) -> i64 {
    let at = |(nb, na): (i64, i64)| nb + (na - nb) * 9 / 10;
    at(a).min(at(b))
}

/// TLS client configurations, per source identity, for the current roots.
#[derive(Default)]
struct Configs {
    roots_version: u64,
    by_id: HashMap<SpiffeId, Arc<ClientConfig>>,
}

pub struct Pool {
    certs: Arc<CertStore>,
    slots: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<Slot>>>>,
    configs: Mutex<Configs>,
}

impl Pool {
    pub fn new(certs: Arc<CertStore>) -> Self {
        Self {
            certs,
            slots: Mutex::new(HashMap::new()),
            configs: Mutex::new(Configs::default()),
        }
    }

    fn slot(&self, key: &Key) -> Arc<tokio::sync::Mutex<Slot>> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if !slots.contains_key(key) && slots.len() >= MAX_KEYS {
            // Let go of connections nobody is using right now.
            slots.retain(|_, s| Arc::strong_count(s) > 1);
        }
        slots.entry(key.clone()).or_default().clone()
    }

    /// A sender on a live connection for `key`, made if there is none.
    pub async fn sender(
        &self,
        key: &Key,
        bind: Option<Ipv4Addr>,
        t: &Timeouts,
        m: &Metrics,
    ) -> Result<Pooled, DialError> {
        let slot = self.slot(key);
        let mut slot = slot.lock().await;
        let now = Instant::now();
        let stale =
            slot.last_used.is_some_and(|u| now - u > t.idle) || unix_now() >= slot.retire_at;
        if let Some(s) = slot.sender.clone().filter(|s| !s.is_closed() && !stale) {
            slot.last_used = Some(now);
            return Ok(Pooled {
                sender: s,
                generation: slot.generation,
            });
        }
        // Streams still open on a replaced connection finish on it.
        slot.sender = None;
        let (s, retire) = self.connect(key, bind, t, m).await?;
        slot.sender = Some(s.clone());
        slot.last_used = Some(now);
        slot.retire_at = retire;
        slot.generation += 1;
        Ok(Pooled {
            sender: s,
            generation: slot.generation,
        })
    }

    /// Stop using connection `generation` of `key` (a stream failed on it: its peer is
    /// closing it, say). A newer connection is kept.
    pub async fn forget(&self, key: &Key, generation: u64) {
        let slot = self.slot(key);
        let mut slot = slot.lock().await;
        if slot.generation == generation {
            slot.sender = None;
        }
    }

    /// Let go of connections closed, or unused for `idle`; their open streams finish.
    pub fn sweep(&self, idle: Duration) {
        let now = Instant::now();
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.retain(|_, slot| match slot.try_lock() {
            Ok(s) => {
                s.sender.as_ref().is_some_and(|x| !x.is_closed())
                    && s.last_used.is_some_and(|u| now - u <= idle)
            }
            // Someone is making or taking its connection.
            Err(_) => true,
        });
    }

    /// How many connections the pool holds (open or being made).
    pub fn len(&self) -> usize {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn client_config(&self, src: &SpiffeId) -> Result<Arc<ClientConfig>, TunnelError> {
        let version = self
            .certs
            .roots_version
            .load(std::sync::atomic::Ordering::Acquire);
        let mut c = self.configs.lock().unwrap_or_else(|p| p.into_inner());
        if c.roots_version != version {
            c.by_id.clear();
            c.roots_version = version;
        }
        if let Some(cfg) = c.by_id.get(src) {
            return Ok(cfg.clone());
        }
        let roots = self.certs.roots().ok_or(TunnelError::NoRoots)?;
        let resolver = Arc::new(tls::AsIdentity {
            store: self.certs.clone(),
            id: src.clone(),
        });
        let cfg = tls::client_config(roots, resolver, &[tls::ALPN_H2])
            .map_err(|e| TunnelError::Tls(std::io::Error::other(e)))?;
        c.by_id.insert(src.clone(), cfg.clone());
        Ok(cfg)
    }

    /// A new connection: TCP from the node's address, TLS as the source identity to the
    /// destination identity, HTTP/2.
    async fn connect(
        &self,
        key: &Key,
        bind: Option<Ipv4Addr>,
        t: &Timeouts,
        m: &Metrics,
    ) -> Result<(Sender, i64), DialError> {
        let fail = |source| DialError::Tunnel {
            via: key.node,
            target: key.node,
            source,
        };
        let Some(own) = self.certs.held(&key.src) else {
            return Err(fail(TunnelError::NoCertificate(key.src.clone())));
        };
        let cfg = self.client_config(&key.src).map_err(fail)?;
        let name = tls::server_name(&key.dst)
            .map_err(|e| fail(TunnelError::Tls(std::io::Error::other(e))))?;
        let sock = TcpSocket::new_v4().map_err(DialError::Socket)?;
        if let Some(ip) = bind {
            // The node's declared address is what the peer checks the sender against.
            sock.bind(SocketAddrV4::new(ip, 0).into())
                .map_err(DialError::Socket)?;
        }
        let tcp = dial::connect(sock, key.node, t.connect).await?;
        let handshake = tokio_rustls::TlsConnector::from(cfg).connect(name, tcp);
        let tls = match tokio::time::timeout(t.tunnel_answer, handshake).await {
            Err(_) => {
                return Err(DialError::TunnelTimeout {
                    via: key.node,
                    target: key.node,
                    after: t.tunnel_answer,
                })
            }
            Ok(Err(e)) => {
                Metrics::inc(&m.tunnel_handshake_failures);
                return Err(fail(TunnelError::Tls(e)));
            }
            Ok(Ok(tls)) => tls,
        };
        // rustls checked the DNS name; the URI must say the same identity.
        let got = tls::peer_id(tls.get_ref().1);
        if got.as_ref() != Some(&key.dst) {
            Metrics::inc(&m.tunnel_handshake_failures);
            return Err(fail(TunnelError::WrongPeer {
                wanted: key.dst.clone(),
                got: got.map_or_else(|| "no SPIFFE ID".to_owned(), |g| g.to_string()),
            }));
        }
        let peer_validity = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| Some((not_before(c)?, not_after(c)?)))
            .unwrap_or((own.not_before, own.not_after));
        let retire = retire_at((own.not_before, own.not_after), peer_validity);
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .keep_alive_interval(t.h2_keepalive_interval)
            .keep_alive_timeout(t.h2_keepalive_timeout)
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| fail(TunnelError::H2(e)))?;
        Metrics::inc(&m.tunnel_connections_opened);
        let node = key.node;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%node, error = %e, "tunnel connection ended");
            }
        });
        Ok((sender, retire))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_connection_retires_before_its_shorter_lived_certificate_expires() {
        assert_eq!(super::retire_at((0, 100), (50, 1000)), 90);
        assert_eq!(super::retire_at((0, 1000), (50, 150)), 140);
    }
}

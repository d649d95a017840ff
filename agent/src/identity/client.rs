//! Asking the CA for certificates: HTTP/1.1 over mutual TLS, the agent proving its node
//! identity with its node certificate, the CA proving `spiffe://<td>/weft/ca`. The node
//! certificate is renewed like any other (a new key, half-way through its life) and
//! written back to its files, so a restarted agent starts with the current one.
//!
//! `POST /v1/sign` with a PEM certificate request: 200 with the PEM certificate, or 403
//! with the reason the CA refused.

use std::{path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use rcgen::KeyPair;
use rustls::{
    pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer},
    sign::CertifiedKey,
};

use super::{
    ca::write_atomic,
    certs::{certs_of_pem, request_for, CertStore, Held},
    tls, SpiffeId,
};

/// How long one exchange with the CA may take, connect included.
const CA_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest answer read from the CA.
const MAX_ANSWER: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CaClientError {
    #[error("the node's credentials ({path}): {message}")]
    Credentials { path: PathBuf, message: String },
    #[error("no trust bundle loaded yet")]
    NoRoots,
    #[error("reaching the CA at {addr}: {message}")]
    Unreachable { addr: String, message: String },
    #[error("the CA refused: {0}")]
    Refused(String),
    #[error("the CA's answer: {0}")]
    Answer(String),
}

/// The node's credentials: its certificate and key, and where they are kept.
struct NodeCreds {
    held: Held,
    cert_path: PathBuf,
    key_path: PathBuf,
}

/// Turns the CA's address into one to connect to, when the agent knows better than the
/// system resolver (a Service name the cluster's DNS would answer, which the host cannot
/// reach).
pub type Resolver = Arc<dyn Fn(&str) -> Option<std::net::SocketAddr> + Send + Sync>;

pub struct CaClient {
    pub addr: String,
    resolve: Option<Resolver>,
    pub node: SpiffeId,
    ca: SpiffeId,
    creds: std::sync::Mutex<NodeCreds>,
}

impl CaClient {
    /// A client for the CA at `addr`, with the node credentials in `cert_path`/`key_path`.
    pub fn new(
        addr: String,
        trust_domain: &str,
        cert_path: PathBuf,
        key_path: PathBuf,
        resolve: Option<Resolver>,
    ) -> Result<Self, CaClientError> {
        let bad = |path: &PathBuf, message: String| CaClientError::Credentials {
            path: path.clone(),
            message,
        };
        let chain = CertificateDer::pem_file_iter(&cert_path)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .map_err(|e| bad(&cert_path, e.to_string()))?;
        let leaf = chain
            .first()
            .ok_or_else(|| bad(&cert_path, "no certificate".into()))?;
        let node = super::id_of(leaf).map_err(|e| bad(&cert_path, e.to_string()))?;
        if node.node_name().is_none() || node.trust_domain() != trust_domain {
            return Err(bad(
                &cert_path,
                format!("it is for {node}, not a node of trust domain {trust_domain}"),
            ));
        }
        let key =
            PrivateKeyDer::from_pem_file(&key_path).map_err(|e| bad(&key_path, e.to_string()))?;
        let held =
            Held::new(tls::certified_key(chain, key).map_err(|e| bad(&key_path, e.to_string()))?);
        Ok(Self {
            addr,
            resolve,
            ca: SpiffeId::ca(trust_domain).map_err(|e| bad(&cert_path, e.to_string()))?,
            node,
            creds: std::sync::Mutex::new(NodeCreds {
                held,
                cert_path,
                key_path,
            }),
        })
    }

    fn node_key(&self) -> Arc<CertifiedKey> {
        self.creds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .held
            .key
            .clone()
    }

    pub fn node_due(&self, now: i64) -> bool {
        self.creds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .held
            .due(now)
    }

    /// Send a certificate request; the PEM chain the CA signed.
    pub async fn sign(
        &self,
        store: &CertStore,
        csr_pem: &str,
    ) -> Result<Vec<CertificateDer<'static>>, CaClientError> {
        match tokio::time::timeout(CA_TIMEOUT, self.exchange(store, csr_pem)).await {
            Ok(r) => r,
            Err(_) => Err(self.unreachable(format!("no answer within {CA_TIMEOUT:?}"))),
        }
    }

    fn unreachable(&self, message: String) -> CaClientError {
        CaClientError::Unreachable {
            addr: self.addr.clone(),
            message,
        }
    }

    async fn exchange(
        &self,
        store: &CertStore,
        csr_pem: &str,
    ) -> Result<Vec<CertificateDer<'static>>, CaClientError> {
        let roots = store.roots().ok_or(CaClientError::NoRoots)?;
        let resolver = Arc::new(NodeCert(self.node_key()));
        let config = tls::client_config(roots, resolver, &[])
            .map_err(|e| CaClientError::Answer(e.to_string()))?;
        let target = self
            .resolve
            .as_ref()
            .and_then(|r| r(&self.addr))
            .map_or_else(|| self.addr.clone(), |a| a.to_string());
        let tcp = tokio::net::TcpStream::connect(&target)
            .await
            .map_err(|e| self.unreachable(e.to_string()))?;
        let name = tls::server_name(&self.ca).map_err(|e| CaClientError::Answer(e.to_string()))?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| self.unreachable(format!("TLS: {e}")))?;
        if tls::peer_id(tls.get_ref().1).as_ref() != Some(&self.ca) {
            return Err(self.unreachable(format!("the server is not {}", self.ca)));
        }
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| self.unreachable(e.to_string()))?;
        tokio::spawn(conn);
        let req = Request::post("/v1/sign")
            .header(hyper::header::HOST, self.ca.dns_name())
            .header(hyper::header::CONTENT_TYPE, "application/pkcs10")
            .body(Full::new(Bytes::from(csr_pem.to_owned())))
            .map_err(|e| CaClientError::Answer(e.to_string()))?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| self.unreachable(e.to_string()))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| CaClientError::Answer(e.to_string()))?
            .to_bytes();
        let text = String::from_utf8_lossy(&body).into_owned();
        match status {
            StatusCode::OK => {
                let chain = certs_of_pem(&text);
                if chain.is_empty() {
                    return Err(CaClientError::Answer("no certificate in it".into()));
                }
                Ok(chain)
            }
            StatusCode::FORBIDDEN => Err(CaClientError::Refused(text.trim().to_owned())),
            other => Err(CaClientError::Answer(format!("{other}: {}", text.trim()))),
        }
    }

    /// Renew the node's own certificate with a new key, and keep both in their files.
    pub async fn renew_node(&self, store: &CertStore) -> Result<(), CaClientError> {
        let key = KeyPair::generate().map_err(|e| CaClientError::Answer(e.to_string()))?;
        let csr =
            request_for(&self.node, &key).map_err(|e| CaClientError::Answer(e.to_string()))?;
        let chain = self.sign(store, &csr).await?;
        let der = PrivateKeyDer::try_from(key.serialize_der())
            .map_err(|e| CaClientError::Answer(e.to_string()))?;
        let held = Held::new(
            tls::certified_key(chain.clone(), der)
                .map_err(|e| CaClientError::Answer(e.to_string()))?,
        );
        let mut creds = self.creds.lock().unwrap_or_else(|p| p.into_inner());
        let cert_pem: String = chain
            .iter()
            .map(|c| pem::encode(&pem::Pem::new("CERTIFICATE", c.to_vec())))
            .collect();
        let write = |path: &PathBuf, text: &str, mode| {
            write_atomic(path, text, mode).map_err(|e| CaClientError::Credentials {
                path: path.clone(),
                message: e.to_string(),
            })
        };
        write(&creds.key_path, &key.serialize_pem(), 0o600)?;
        write(&creds.cert_path, &cert_pem, 0o644)?;
        creds.held = held;
        Ok(())
    }
}

/// Presents the node's certificate to the CA.
#[derive(Debug)]
struct NodeCert(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for NodeCert {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

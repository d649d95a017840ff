//! TLS configurations that prove and check SPIFFE identities: TLS 1.3 only, mutual
//! authentication always, certificates chained to the trust bundle. A server presents the
//! certificate of the identity the client named in its SNI ([`SpiffeId::dns_name`]); a
//! client presents the certificate of one identity and checks that the server's is the
//! one it asked for (its DNS name by rustls, its URI by [`peer_id`]).

use std::sync::Arc;

use rustls::{
    client::{ResolvesClientCert, WebPkiServerVerifier},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName},
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
    ClientConfig, RootCertStore, ServerConfig,
};

use super::{certs::CertStore, id_of, SpiffeId};

/// ALPN for the node-to-node tunnel: HTTP/2 (CONNECT streams).
pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the trust bundle has no usable root: {0}")]
    Roots(String),
    #[error("building the TLS configuration: {0}")]
    Config(String),
    #[error("the private key is not usable: {0}")]
    Key(String),
}

/// Roots for verifying peers.
pub fn roots(bundle: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>, TlsError> {
    let mut r = RootCertStore::empty();
    let (added, _) = r.add_parsable_certificates(bundle.iter().cloned());
    if added == 0 {
        return Err(TlsError::Roots("no certificate could be parsed".into()));
    }
    Ok(Arc::new(r))
}

/// A certificate chain and its key, as rustls signs with them.
pub fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let signer = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key)
        .map_err(|e| TlsError::Key(e.to_string()))?;
    let ck = CertifiedKey::new(chain, signer);
    // A certificate and key written at different moments (a rotation half done) do not
    // belong together: refuse rather than fail every handshake.
    ck.keys_match()
        .map_err(|e| TlsError::Key(format!("it does not belong to the certificate: {e}")))?;
    Ok(Arc::new(ck))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A server that presents, for each handshake, the certificate of the identity named by
/// the client's SNI, and requires a client certificate chained to `roots`.
pub fn server_config(
    roots: Arc<RootCertStore>,
    resolver: Arc<dyn ResolvesServerCert>,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut c = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    // No resumption: every connection proves both certificates afresh, so a renewed
    // certificate or a retired root takes effect on the next connection (a resumed
    // session would carry the first handshake's identity and expiry).
    c.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    c.send_tls13_tickets = 0;
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(c))
}

/// A client that presents `resolver`'s certificate and verifies servers against `roots`
/// (the name checked is the one passed when connecting).
pub fn client_config(
    roots: Arc<RootCertStore>,
    resolver: Arc<dyn ResolvesClientCert>,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, TlsError> {
    let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut c = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(resolver);
    c.resumption = rustls::client::Resumption::disabled();
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(c))
}

/// The name a client connects with to reach `id`.
pub fn server_name(id: &SpiffeId) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(id.dns_name()).map_err(|e| TlsError::Config(e.to_string()))
}

/// The SPIFFE ID the peer of a finished handshake proved.
pub fn peer_id(conn: &rustls::CommonState) -> Option<SpiffeId> {
    id_of(conn.peer_certificates()?.first()?).ok()
}

/// Serves each identity's current certificate by SNI.
#[derive(Debug)]
pub struct ByName(pub Arc<CertStore>);

impl ResolvesServerCert for ByName {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.by_dns_name(hello.server_name()?)
    }
}

/// Presents one identity's current certificate (looked up at every handshake, so a
/// rotated certificate is used by the next connection).
#[derive(Debug)]
pub struct AsIdentity {
    pub store: Arc<CertStore>,
    pub id: SpiffeId,
}

impl ResolvesClientCert for AsIdentity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.store.get(&self.id)
    }

    fn has_certs(&self) -> bool {
        true
    }
}

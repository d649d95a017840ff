//! Workload identity: SPIFFE IDs (`spiffe://<trust-domain>/ns/<namespace>/sa/<account>`),
//! the X.509 certificates that carry them (SVIDs), the certificate authority that signs
//! them (`ca.rs`), how an agent obtains and rotates them (`certs.rs`), and the TLS
//! configurations that prove and check them (`tls.rs`).
//!
//! Every certificate names its identity twice: the SPIFFE ID as its one URI SAN, and a
//! DNS SAN derived from it ([`SpiffeId::dns_name`]), so rustls' standard verification
//! checks the name a client asked for (its SNI) and weft then checks the URI.

pub mod ca;
pub mod certs;
pub mod client;
pub mod tls;

use std::fmt;

use rustls::pki_types::CertificateDer;

/// A SPIFFE ID weft issues or accepts: a workload's (`/ns/<n>/sa/<a>`), a node's
/// (`/weft/node/<name>`), or the CA's own (`/weft/ca`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    kind: Kind,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    Workload {
        namespace: String,
        service_account: String,
    },
    Node(String),
    Ca,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    #[error("{0:?} is not a SPIFFE ID weft knows (spiffe://<trust domain>/ns/<namespace>/sa/<account>, /weft/node/<name> or /weft/ca)")]
    Unknown(String),
    #[error("{0:?} is not a DNS label (lowercase letters, digits and '-', at most 63)")]
    Label(String),
    #[error("trust domain {0:?} is not a DNS name")]
    TrustDomain(String),
}

/// A DNS label as Kubernetes names namespaces and service accounts.
fn label(s: &str) -> Result<&str, IdError> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    ok.then_some(s).ok_or_else(|| IdError::Label(s.to_owned()))
}

pub fn check_trust_domain(td: &str) -> Result<(), IdError> {
    let ok = !td.is_empty() && td.len() <= 200 && td.split('.').all(|l| label(l).is_ok());
    ok.then_some(())
        .ok_or_else(|| IdError::TrustDomain(td.to_owned()))
}

impl SpiffeId {
    pub fn workload(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdError> {
        check_trust_domain(trust_domain)?;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            kind: Kind::Workload {
                namespace: label(namespace)?.to_owned(),
                service_account: label(service_account)?.to_owned(),
            },
        })
    }

    pub fn node(trust_domain: &str, name: &str) -> Result<Self, IdError> {
        check_trust_domain(trust_domain)?;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            kind: Kind::Node(label(name)?.to_owned()),
        })
    }

    pub fn ca(trust_domain: &str) -> Result<Self, IdError> {
        check_trust_domain(trust_domain)?;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            kind: Kind::Ca,
        })
    }

    pub fn parse(uri: &str) -> Result<Self, IdError> {
        let unknown = || IdError::Unknown(uri.to_owned());
        let rest = uri.strip_prefix("spiffe://").ok_or_else(unknown)?;
        let (td, path) = rest.split_once('/').ok_or_else(unknown)?;
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["ns", ns, "sa", sa] => Self::workload(td, ns, sa),
            ["weft", "node", name] => Self::node(td, name),
            ["weft", "ca"] => Self::ca(td),
            _ => Err(unknown()),
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Namespace and service account, for a workload's identity.
    pub fn workload_parts(&self) -> Option<(&str, &str)> {
        match &self.kind {
            Kind::Workload {
                namespace,
                service_account,
            } => Some((namespace, service_account)),
            _ => None,
        }
    }

    pub fn node_name(&self) -> Option<&str> {
        match &self.kind {
            Kind::Node(n) => Some(n),
            _ => None,
        }
    }

    /// The DNS name that stands for this identity in certificates and SNI:
    /// `<account>.<namespace>.sa.<trust domain>`, `<name>.node.<trust domain>`,
    /// `ca.<trust domain>`.
    pub fn dns_name(&self) -> String {
        let td = &self.trust_domain;
        match &self.kind {
            Kind::Workload {
                namespace,
                service_account,
            } => format!("{service_account}.{namespace}.sa.{td}"),
            Kind::Node(n) => format!("{n}.node.{td}"),
            Kind::Ca => format!("ca.{td}"),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let td = &self.trust_domain;
        match &self.kind {
            Kind::Workload {
                namespace,
                service_account,
            } => write!(f, "spiffe://{td}/ns/{namespace}/sa/{service_account}"),
            Kind::Node(n) => write!(f, "spiffe://{td}/weft/node/{n}"),
            Kind::Ca => write!(f, "spiffe://{td}/weft/ca"),
        }
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The SPIFFE ID a certificate carries (its one `spiffe://` URI SAN).
pub fn id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, IdError> {
    use x509_parser::prelude::*;
    let bad = || IdError::Unknown("a certificate without a spiffe:// URI".into());
    let (_, x509) = parse_x509_certificate(cert).map_err(|_| bad())?;
    let san = x509
        .subject_alternative_name()
        .map_err(|_| bad())?
        .ok_or_else(bad)?;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
        _ => None,
    });
    let (Some(uri), None) = (uris.next(), uris.next()) else {
        return Err(bad());
    };
    SpiffeId::parse(uri)
}

/// Seconds since the epoch at which a certificate stops being valid.
pub fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert).ok()?;
    Some(x509.validity().not_after.timestamp())
}

/// Seconds since the epoch at which a certificate became valid.
pub fn not_before(cert: &CertificateDer<'_>) -> Option<i64> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert).ok()?;
    Some(x509.validity().not_before.timestamp())
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_name_themselves() {
        let w = SpiffeId::workload("cluster.local", "shop", "web").unwrap();
        assert_eq!(w.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(SpiffeId::parse(&w.to_string()).unwrap(), w);
        assert_eq!(w.dns_name(), "web.shop.sa.cluster.local");
        let n = SpiffeId::node("cluster.local", "node-a").unwrap();
        assert_eq!(SpiffeId::parse(&n.to_string()).unwrap(), n);
        assert_eq!(n.node_name(), Some("node-a"));
        for bad in [
            "https://x/ns/a/sa/b",
            "spiffe://cluster.local/ns/a/sa",
            "spiffe://cluster.local/ns/A/sa/b",
            "spiffe://cluster.local/ns/a/sa/b/c",
            "spiffe://bad_domain/ns/a/sa/b",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
    }
}

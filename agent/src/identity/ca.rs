//! The certificate authority: its roots on disk, and the one rule for what it signs. Only
//! `weft-ca` (agent/src/bin/weft-ca.rs) reads the root keys; agents never see them.
//!
//! Directory layout:
//! ```text
//! roots/<n>/key.pem, cert.pem   every root made so far that is not retired
//! current                       the number of the newest root, and from when it signs
//!                               (seconds since the epoch; until then the previous one)
//! bundle.pem                    the roots peers trust (the current one, and during a
//!                               rotation the previous ones)
//! trust-domain                  the trust domain the CA issues for
//! ```
//! Rotation: `rotate` makes a new root and adds it to the bundle at once, but signs with it
//! only after a grace period, so every agent trusts it (they re-read the bundle every
//! second) before any certificate under it appears; once every certificate signed by the
//! old root has been renewed (one certificate lifetime), `retire` takes the old roots out
//! of the bundle.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};
use rustls::pki_types::{pem::PemObject as _, CertificateDer};

use super::SpiffeId;
use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Bad { path: PathBuf, message: String },
    #[error("making a certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("the certificate request is not valid: {0}")]
    Request(String),
    #[error("refused: {0}")]
    Refused(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_owned(),
        source,
    }
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(io_err(path))
}

/// Write a file atomically (temporary file, then rename), with `mode`.
pub fn write_atomic(path: &Path, text: &str, mode: u32) -> Result<(), CaError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    // A stale temporary file would keep its own mode: start from a new one.
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    std::io::Write::write_all(&mut f, text.as_bytes()).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// Read every certificate of a PEM file (a trust bundle, a chain).
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let pem = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| CaError::Bad {
            path: path.to_owned(),
            message: format!("not PEM certificates: {e}"),
        })?;
    if certs.is_empty() {
        return Err(CaError::Bad {
            path: path.to_owned(),
            message: "no certificate in it".into(),
        });
    }
    Ok(certs)
}

fn pem_of(certs: &[CertificateDer<'_>]) -> String {
    certs
        .iter()
        .map(|c| pem::encode(&pem::Pem::new("CERTIFICATE", c.to_vec())))
        .collect()
}

/// The parameters of a certificate for `id`, valid for `ttl` from now, and from a little
/// before (a quarter of `ttl`, at most a minute) for clocks that are behind.
pub fn leaf_params(id: &SpiffeId, ttl: Duration) -> Result<CertificateParams, CaError> {
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(DnType::CommonName, id.to_string());
    p.subject_alt_names = vec![
        SanType::URI(id.to_string().try_into()?),
        SanType::DnsName(id.dns_name().try_into()?),
    ];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - (ttl / 4).min(Duration::from_secs(60));
    p.not_after = now + ttl;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

/// A CA directory on disk.
pub struct CaDir {
    pub path: PathBuf,
}

impl CaDir {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
        }
    }

    fn root_dir(&self, n: u32) -> PathBuf {
        self.path.join("roots").join(n.to_string())
    }

    pub fn bundle_path(&self) -> PathBuf {
        self.path.join("bundle.pem")
    }

    pub fn trust_domain(&self) -> Result<String, CaError> {
        Ok(read(&self.path.join("trust-domain"))?.trim().to_owned())
    }

    /// The newest root and when it starts signing.
    fn current(&self) -> Result<(u32, i64), CaError> {
        let p = self.path.join("current");
        let text = read(&p)?;
        let mut parts = text.split_whitespace();
        let bad = |p: PathBuf| CaError::Bad {
            path: p,
            message: "expected a root number and optionally the time it signs from".into(),
        };
        let n = parts
            .next()
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| bad(p.clone()))?;
        let from = match parts.next() {
            None => 0,
            Some(t) => t.parse().map_err(|_| bad(p.clone()))?,
        };
        Ok((n, from))
    }

    /// The root that signs now: the newest, once its grace period is over.
    pub fn signing_root(&self) -> Result<u32, CaError> {
        let (n, from) = self.current()?;
        if super::unix_now() >= from {
            return Ok(n);
        }
        Ok(self
            .roots()?
            .into_iter()
            .filter(|r| *r < n)
            .max()
            .unwrap_or(n))
    }

    /// A new CA for `trust_domain`, with its first root.
    pub fn init(&self, trust_domain: &str) -> Result<(), CaError> {
        super::check_trust_domain(trust_domain).map_err(|e| CaError::Refused(e.to_string()))?;
        if self.path.join("current").exists() {
            return Err(CaError::Bad {
                path: self.path.clone(),
                message: "a CA is already there".into(),
            });
        }
        std::fs::create_dir_all(&self.path).map_err(io_err(&self.path))?;
        // Root keys live below: only the CA's own user may enter.
        std::fs::set_permissions(
            &self.path,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .map_err(io_err(&self.path))?;
        write_atomic(&self.path.join("trust-domain"), trust_domain, 0o644)?;
        self.make_root(1, trust_domain)?;
        write_atomic(&self.path.join("current"), "1", 0o644)?;
        self.write_bundle(&[1])
    }

    fn make_root(&self, n: u32, trust_domain: &str) -> Result<(), CaError> {
        let dir = self.root_dir(n);
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(
            DnType::CommonName,
            format!("weft root {n} ({trust_domain})"),
        );
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - Duration::from_secs(60);
        p.not_after = now + Duration::from_secs(10 * 365 * 24 * 3600);
        let cert = p.self_signed(&key)?;
        write_atomic(&dir.join("key.pem"), &key.serialize_pem(), 0o600)?;
        write_atomic(&dir.join("cert.pem"), &cert.pem(), 0o644)
    }

    fn roots(&self) -> Result<Vec<u32>, CaError> {
        let dir = self.path.join("roots");
        let mut v: Vec<u32> = std::fs::read_dir(&dir)
            .map_err(io_err(&dir))?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        v.sort_unstable();
        Ok(v)
    }

    fn write_bundle(&self, roots: &[u32]) -> Result<(), CaError> {
        let mut certs = vec![];
        for n in roots {
            certs.extend(read_certs(&self.root_dir(*n).join("cert.pem"))?);
        }
        write_atomic(&self.bundle_path(), &pem_of(&certs), 0o644)
    }

    /// Make a new root, trust it beside the old ones now, and sign with it once `grace`
    /// has passed.
    pub fn rotate(&self, grace: Duration) -> Result<u32, CaError> {
        let td = self.trust_domain()?;
        let n = self.roots()?.last().copied().unwrap_or(0) + 1;
        self.make_root(n, &td)?;
        let mut bundle = self.roots()?;
        bundle.retain(|r| *r <= n);
        self.write_bundle(&bundle)?;
        let from = super::unix_now() + i64::try_from(grace.as_secs()).unwrap_or(i64::MAX / 2);
        write_atomic(&self.path.join("current"), &format!("{n} {from}"), 0o644)?;
        Ok(n)
    }

    /// Stop trusting every root but the current one, and delete their keys.
    pub fn retire(&self) -> Result<Vec<u32>, CaError> {
        let (current, from) = self.current()?;
        if super::unix_now() < from {
            return Err(CaError::Refused(format!(
                "root {current} does not sign yet (its grace period ends in {} s): retiring the older roots now would leave nothing signing",
                from - super::unix_now()
            )));
        }
        self.write_bundle(&[current])?;
        let old: Vec<u32> = self
            .roots()?
            .into_iter()
            .filter(|r| *r != current)
            .collect();
        for n in &old {
            let d = self.root_dir(*n);
            std::fs::remove_dir_all(&d).map_err(io_err(&d))?;
        }
        Ok(old)
    }

    /// The CA as it signs now.
    pub fn load(&self) -> Result<Ca, CaError> {
        let n = self.signing_root()?;
        let dir = self.root_dir(n);
        let key = KeyPair::from_pem(&read(&dir.join("key.pem"))?)?;
        let root = read_certs(&dir.join("cert.pem"))?.remove(0);
        let issuer = Issuer::from_ca_cert_der(&root, key)?;
        Ok(Ca {
            trust_domain: self.trust_domain()?,
            issuer,
            bundle: read_certs(&self.bundle_path())?,
            root: n,
        })
    }

    /// Bootstrap credentials for a node's agent: a key and a certificate for its node
    /// identity, written to `out` (node-key.pem, node-cert.pem) with the trust bundle.
    pub fn issue_node(&self, node: &str, ttl: Duration, out: &Path) -> Result<SpiffeId, CaError> {
        let ca = self.load()?;
        let id =
            SpiffeId::node(&ca.trust_domain, node).map_err(|e| CaError::Refused(e.to_string()))?;
        let key = KeyPair::generate()?;
        let cert = ca.issue(&id, &key, ttl)?;
        std::fs::create_dir_all(out).map_err(io_err(out))?;
        write_atomic(&out.join("node-key.pem"), &key.serialize_pem(), 0o600)?;
        write_atomic(&out.join("node-cert.pem"), &pem_of(&[cert]), 0o644)?;
        Ok(id)
    }
}

/// The CA's signing side, loaded from its directory.
pub struct Ca {
    pub trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    /// Every root peers trust now.
    pub bundle: Vec<CertificateDer<'static>>,
    /// The number of the root that signs.
    pub root: u32,
}

impl Ca {
    /// A certificate for `id` on `key`, valid for `ttl`.
    pub fn issue(
        &self,
        id: &SpiffeId,
        key: &impl PublicKeyData,
        ttl: Duration,
    ) -> Result<CertificateDer<'static>, CaError> {
        let cert = leaf_params(id, ttl)?.signed_by(key, &self.issuer)?;
        Ok(cert.der().clone())
    }

    pub fn bundle_pem(&self) -> String {
        pem_of(&self.bundle)
    }

    /// Sign the certificate request `csr_pem` for a client that proved identity
    /// `requester`, if `policy` allows the identity it asks for. Only the request's key
    /// and its one SPIFFE ID are taken from it: names, lifetime and usages are the CA's.
    pub fn sign(
        &self,
        csr_pem: &str,
        requester: &SpiffeId,
        ttl: Duration,
        policy: impl Fn(&SpiffeId, &SpiffeId) -> Result<(), String>,
    ) -> Result<(SpiffeId, String), CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::Request(e.to_string()))?;
        let mut uris = csr.params.subject_alt_names.iter().filter_map(|s| match s {
            SanType::URI(u) => Some(u.as_str().to_owned()),
            _ => None,
        });
        let (Some(uri), None) = (uris.next(), uris.next()) else {
            return Err(CaError::Request(
                "it must name exactly one spiffe:// URI".into(),
            ));
        };
        let id = SpiffeId::parse(&uri).map_err(|e| CaError::Request(e.to_string()))?;
        if id.trust_domain() != self.trust_domain {
            return Err(CaError::Refused(format!(
                "{id} is not in this CA's trust domain {}",
                self.trust_domain
            )));
        }
        policy(requester, &id).map_err(CaError::Refused)?;
        let cert = self.issue(&id, &csr.public_key, ttl)?;
        Ok((id, pem_of(&[cert])))
    }
}

/// What a node may ask for: certificates for workloads declared on it, and its own node
/// certificate (renewal).
pub fn node_may_have(cfg: &Config, node: &SpiffeId, wanted: &SpiffeId) -> Result<(), String> {
    let Some(node_name) = node.node_name() else {
        return Err(format!("{node} is not a node identity"));
    };
    if wanted.node_name().is_some() {
        return if wanted == node {
            Ok(())
        } else {
            Err(format!(
                "node {node_name} asked for another node's identity {wanted}"
            ))
        };
    }
    let Some((ns, sa)) = wanted.workload_parts() else {
        return Err(format!("{wanted} is not a workload identity"));
    };
    let on_node = cfg
        .workloads
        .iter()
        .any(|w| w.namespace == ns && w.service_account == sa && w.node == node_name);
    if on_node {
        Ok(())
    } else {
        let elsewhere: Vec<&str> = cfg
            .workloads
            .iter()
            .filter(|w| w.namespace == ns && w.service_account == sa)
            .map(|w| w.node.as_str())
            .collect();
        Err(if elsewhere.is_empty() {
            format!("no workload with identity {wanted} is declared")
        } else {
            format!(
                "no workload with identity {wanted} runs on node {node_name} (it runs on {})",
                elsewhere.join(", ")
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("weft-ca-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_ca_signs_what_its_policy_allows_with_its_own_names() {
        let dir = tmp("sign");
        let ca_dir = CaDir::new(&dir);
        ca_dir.init("cluster.local").unwrap();
        let mode = |p: &Path| {
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions())
                & 0o777
        };
        assert_eq!(mode(&dir), 0o700, "the CA directory");
        assert_eq!(mode(&dir.join("roots/1/key.pem")), 0o600, "a root key");
        let ca = ca_dir.load().unwrap();
        let node = SpiffeId::node("cluster.local", "a").unwrap();
        let want = SpiffeId::workload("cluster.local", "shop", "web").unwrap();
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(want.to_string().try_into().unwrap())];
        // The request asks to be a CA and for a year: the CA ignores both.
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let csr = p.serialize_request(&key).unwrap().pem().unwrap();
        let (id, pem) = ca
            .sign(&csr, &node, Duration::from_secs(3600), |_, _| Ok(()))
            .unwrap();
        assert_eq!(id, want);
        let cert = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(super::super::id_of(&cert).unwrap(), want);
        let life = super::super::not_after(&cert).unwrap() - super::super::unix_now();
        assert!((3500..=3600).contains(&life), "{life}");
        let (_, x) = x509_parser::parse_x509_certificate(&cert).unwrap();
        assert!(!x.is_ca());
        let refused = ca.sign(&csr, &node, Duration::from_secs(60), |_, w| {
            Err(format!("not {w}"))
        });
        assert!(matches!(refused, Err(CaError::Refused(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rotation_trusts_both_roots_then_retires_the_old() {
        let dir = tmp("rotate");
        let ca_dir = CaDir::new(&dir);
        ca_dir.init("cluster.local").unwrap();
        assert_eq!(read_certs(&ca_dir.bundle_path()).unwrap().len(), 1);
        assert_eq!(ca_dir.rotate(Duration::from_secs(3600)).unwrap(), 2);
        assert_eq!(read_certs(&ca_dir.bundle_path()).unwrap().len(), 2);
        assert_eq!(
            ca_dir.load().unwrap().root,
            1,
            "the old root signs during the grace"
        );
        assert!(matches!(ca_dir.retire(), Err(CaError::Refused(_))));
        assert_eq!(ca_dir.rotate(Duration::ZERO).unwrap(), 3);
        assert_eq!(read_certs(&ca_dir.bundle_path()).unwrap().len(), 3);
        assert_eq!(ca_dir.load().unwrap().root, 3);
        assert_eq!(ca_dir.retire().unwrap(), vec![1, 2]);
        assert_eq!(read_certs(&ca_dir.bundle_path()).unwrap().len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! The certificates an agent holds (one per identity of its node's workloads), the roots
//! it trusts, and keeping both current: a certificate is renewed once half its lifetime
//! has passed, with a new key made here (keys never leave the agent); the trust bundle is
//! read again when its file changes. Handshakes look certificates up at the moment they
//! happen, so a renewal never touches a connection already open.

use std::{
    collections::{BTreeSet, HashMap},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use arc_swap::ArcSwap;
use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::{
    pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer},
    sign::CertifiedKey,
    RootCertStore,
};

use super::{ca::read_certs, client::CaClient, not_after, not_before, tls, unix_now, SpiffeId};

/// One certificate held, with its validity (seconds since the epoch).
#[derive(Clone, Debug)]
pub struct Held {
    pub key: Arc<CertifiedKey>,
    pub not_before: i64,
    pub not_after: i64,
    /// Half its remaining life when it was received (not_before is set back a little for
    /// clocks that are behind, so it says nothing about when the certificate was made).
    pub renew_at: i64,
}

impl Held {
    pub fn new(key: Arc<CertifiedKey>) -> Self {
        let leaf = key.cert.first();
        let not_after = leaf.and_then(not_after).unwrap_or(0);
        let now = unix_now();
        Self {
            not_before: leaf.and_then(not_before).unwrap_or(0),
            not_after,
            renew_at: now + (not_after - now).max(0) / 2,
            key,
        }
    }

    /// Renew once half the life it had when received has passed.
    pub fn due(&self, now: i64) -> bool {
        now >= self.renew_at
    }
}

#[derive(Debug, Default)]
struct Snapshot {
    by_id: HashMap<SpiffeId, Held>,
    by_dns: HashMap<String, SpiffeId>,
}

/// The certificates held now, and the roots trusted now.
#[derive(Debug, Default)]
pub struct CertStore {
    certs: ArcSwap<Snapshot>,
    roots: ArcSwap<Option<Arc<RootCertStore>>>,
    /// Bumped whenever the roots change, so TLS configurations built on them are rebuilt.
    pub roots_version: std::sync::atomic::AtomicU64,
}

impl CertStore {
    pub fn get(&self, id: &SpiffeId) -> Option<Arc<CertifiedKey>> {
        self.certs.load().by_id.get(id).map(|h| h.key.clone())
    }

    pub fn by_dns_name(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let snap = self.certs.load();
        let id = snap.by_dns.get(name)?;
        snap.by_id.get(id).map(|h| h.key.clone())
    }

    /// The identity held whose DNS name is `name`.
    pub fn id_by_dns_name(&self, name: &str) -> Option<SpiffeId> {
        self.certs.load().by_dns.get(name).cloned()
    }

    pub fn held(&self, id: &SpiffeId) -> Option<Held> {
        self.certs.load().by_id.get(id).cloned()
    }

    /// Every identity held, with its validity (the admin API shows them).
    pub fn list(&self) -> Vec<(SpiffeId, i64, i64)> {
        let mut v: Vec<_> = self
            .certs
            .load()
            .by_id
            .iter()
            .map(|(id, h)| (id.clone(), h.not_before, h.not_after))
            .collect();
        v.sort();
        v
    }

    pub fn insert(&self, id: SpiffeId, held: Held) {
        self.certs.rcu(|s| {
            let mut by_id = s.by_id.clone();
            let mut by_dns = s.by_dns.clone();
            by_dns.insert(id.dns_name(), id.clone());
            by_id.insert(id.clone(), held.clone());
            Snapshot { by_id, by_dns }
        });
    }

    pub fn retain(&self, keep: &BTreeSet<SpiffeId>) {
        self.certs.rcu(|s| Snapshot {
            by_id: s
                .by_id
                .iter()
                .filter(|(id, _)| keep.contains(id))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            by_dns: s
                .by_dns
                .iter()
                .filter(|(_, id)| keep.contains(id))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        });
    }

    pub fn roots(&self) -> Option<Arc<RootCertStore>> {
        (**self.roots.load()).clone()
    }

    pub fn set_roots(&self, roots: Arc<RootCertStore>) {
        self.roots.store(Arc::new(Some(roots)));
        self.roots_version
            .fetch_add(1, std::sync::atomic::Ordering::Release);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{0}")]
    Ca(#[from] super::client::CaClientError),
    #[error("{0}")]
    Files(String),
    #[error("making a key or request: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
}

/// Where an agent's certificates come from.
pub enum Source {
    /// None configured: no certificates (connections to other nodes fail).
    None,
    /// A weft CA, asked over mTLS with the node's own certificate.
    Ca(CaClient),
    /// A CA directory this agent signs with itself (file mode on one host, the demo): the
    /// CA key is on this host, so this is for development, not for a cluster.
    Local {
        dir: PathBuf,
        node: SpiffeId,
        ttl: Duration,
    },
    /// Files someone else keeps current (cert-manager, SPIRE):
    /// `<dir>/<namespace>/<account>/{cert.pem,key.pem}` and `<dir>/bundle.pem`.
    Files(PathBuf),
}

/// Keeps the certificates of the identities wanted current.
pub struct Identities {
    pub store: Arc<CertStore>,
    source: Source,
    /// The trust bundle's file (for the CA source; files bring their own).
    bundle_path: Option<PathBuf>,
    bundle_seen: std::sync::Mutex<Option<std::time::SystemTime>>,
    wanted: ArcSwap<BTreeSet<SpiffeId>>,
    /// File source: when each identity's certificate file was last read as changed.
    files_seen: std::sync::Mutex<HashMap<SpiffeId, Option<std::time::SystemTime>>>,
    /// Last error per identity (`None`: the bundle or the node's own certificate), so a
    /// failure is logged once.
    failed: std::sync::Mutex<HashMap<Option<SpiffeId>, String>>,
    /// CA source: identities whose last request failed, with when to ask again and how
    /// many times in a row it failed (so a CA that is down is not asked every second by
    /// every node for every identity).
    retry: std::sync::Mutex<HashMap<SpiffeId, (i64, u32)>>,
}

/// Seconds to wait before asking the CA again after `failures` failures in a row: 1, 2,
/// 4, ... up to a minute.
pub fn backoff_secs(failures: u32) -> i64 {
    1i64 << failures.saturating_sub(1).min(6)
}

/// At most this long between two requests for an identity whose requests fail.
pub const MAX_BACKOFF_SECS: i64 = 60;

fn modified(path: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl Identities {
    pub fn new(source: Source, bundle_path: Option<PathBuf>) -> Self {
        Self {
            store: Arc::new(CertStore::default()),
            source,
            bundle_path,
            bundle_seen: std::sync::Mutex::new(None),
            wanted: ArcSwap::from_pointee(BTreeSet::new()),
            files_seen: std::sync::Mutex::new(HashMap::new()),
            failed: std::sync::Mutex::new(HashMap::new()),
            retry: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The identities this node's workloads have; others are let go.
    pub fn want(&self, ids: BTreeSet<SpiffeId>) {
        self.store.retain(&ids);
        self.wanted.store(Arc::new(ids));
    }

    /// Every wanted identity has a certificate.
    pub fn complete(&self) -> bool {
        self.wanted
            .load()
            .iter()
            .all(|id| self.store.get(id).is_some())
    }

    fn bundle_file(&self) -> Option<PathBuf> {
        match &self.source {
            Source::Files(dir) => Some(dir.join("bundle.pem")),
            Source::Local { dir, .. } => Some(super::ca::CaDir::new(dir).bundle_path()),
            Source::Ca(_) => self.bundle_path.clone(),
            Source::None => None,
        }
    }

    /// Wanted identities without a certificate.
    pub fn pending(&self) -> Vec<SpiffeId> {
        self.wanted
            .load()
            .iter()
            .filter(|id| self.store.get(id).is_none())
            .cloned()
            .collect()
    }

    /// Where certificates come from, as the admin API says it.
    pub fn source(&self) -> String {
        match &self.source {
            Source::Ca(ca) => format!("ca {} as {}", ca.addr, ca.node),
            Source::Local { dir, .. } => format!("local ca {}", dir.display()),
            Source::Files(dir) => format!("files {}", dir.display()),
            Source::None => "none".to_owned(),
        }
    }

    /// Read the trust bundle again if its file changed.
    fn refresh_bundle(&self) -> Result<(), CertError> {
        let Some(path) = self.bundle_file() else {
            return Ok(());
        };
        let m = modified(&path);
        let mut seen = self.bundle_seen.lock().unwrap_or_else(|p| p.into_inner());
        if m.is_some() && *seen == m && self.store.roots().is_some() {
            return Ok(());
        }
        let certs = read_certs(&path).map_err(|e| CertError::Files(e.to_string()))?;
        self.store.set_roots(tls::roots(&certs)?);
        tracing::info!(bundle = %path.display(), roots = certs.len(), "trust bundle loaded");
        *seen = m;
        Ok(())
    }

    /// One pass: the bundle, the node's own certificate, then every wanted identity that
    /// has none or is due for renewal.
    pub async fn refresh(&self) {
        if let Err(e) = self.refresh_bundle() {
            self.report(None, Err(e));
        }
        if let Source::Ca(ca) = &self.source {
            if ca.node_due(unix_now()) {
                let r = ca.renew_node(&self.store).await.map_err(CertError::from);
                self.report(None, r.map(|()| "renewed the node certificate"));
            }
        }
        let now = unix_now();
        let remote = matches!(self.source, Source::Ca(_));
        for id in self.wanted.load().iter() {
            if self.store.held(id).is_some_and(|h| !h.due(now)) && !self.file_changed(id) {
                continue;
            }
            let waiting =
                |r: &HashMap<SpiffeId, (i64, u32)>| r.get(id).is_some_and(|(at, _)| *at > now);
            if remote && waiting(&self.retry.lock().unwrap_or_else(|p| p.into_inner())) {
                continue;
            }
            let r = self.obtain(id).await.map(|held| {
                self.store.insert(id.clone(), held);
                "certificate issued"
            });
            {
                let mut retry = self.retry.lock().unwrap_or_else(|p| p.into_inner());
                if r.is_ok() {
                    retry.remove(id);
                } else if remote {
                    let failures = retry.get(id).map_or(0, |(_, n)| *n) + 1;
                    let wait = backoff_secs(failures).min(MAX_BACKOFF_SECS);
                    retry.insert(id.clone(), (now + wait, failures));
                }
            }
            self.report(Some(id), r);
        }
    }

    /// A file source's certificate for `id` changed since it was last read.
    fn file_changed(&self, id: &SpiffeId) -> bool {
        let Source::Files(dir) = &self.source else {
            return false;
        };
        let Some((ns, sa)) = id.workload_parts() else {
            return false;
        };
        let m = modified(&dir.join(ns).join(sa).join("cert.pem"));
        let seen = self.files_seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.get(id).is_some_and(|s| *s != m)
    }

    fn report(&self, id: Option<&SpiffeId>, r: Result<&str, CertError>) {
        let key = id.cloned();
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        match r {
            Ok(what) => {
                failed.remove(&key);
                if let Some(id) = id {
                    let held = self.store.held(id);
                    tracing::info!(identity = %id, expires_in_s = held.map_or(0, |h| h.not_after - unix_now()), "{what}");
                } else {
                    tracing::info!("{what}");
                }
            }
            Err(e) => {
                let msg = e.to_string();
                if failed.get(&key) != Some(&msg) {
                    tracing::warn!(identity = ?id.map(ToString::to_string), error = %msg, "could not obtain a certificate; retrying");
                    failed.insert(key, msg);
                }
            }
        }
    }

    /// A fresh certificate for `id`: a new key and a request to the CA, or the files.
    async fn obtain(&self, id: &SpiffeId) -> Result<Held, CertError> {
        match &self.source {
            Source::None => Err(CertError::Files(
                "no identity source is configured (--ca-address, --ca-dir or --cert-dir)".into(),
            )),
            Source::Ca(ca) => {
                let key = KeyPair::generate()?;
                let csr = request_for(id, &key)?;
                let chain = ca.sign(&self.store, &csr).await?;
                let key = PrivateKeyDer::try_from(key.serialize_der())
                    .map_err(|e| CertError::Files(e.to_string()))?;
                Ok(Held::new(tls::certified_key(chain, key)?))
            }
            Source::Local { dir, node, ttl } => {
                let key = KeyPair::generate()?;
                let csr = request_for(id, &key)?;
                let ca = super::ca::CaDir::new(dir)
                    .load()
                    .map_err(|e| CertError::Files(e.to_string()))?;
                // The same rule as weft-ca's: only this node's workloads (which is all this
                // agent asks for).
                let (_, pem) = ca
                    .sign(&csr, node, *ttl, |_, _| Ok(()))
                    .map_err(|e| CertError::Files(e.to_string()))?;
                let key = PrivateKeyDer::try_from(key.serialize_der())
                    .map_err(|e| CertError::Files(e.to_string()))?;
                Ok(Held::new(tls::certified_key(certs_of_pem(&pem), key)?))
            }
            Source::Files(dir) => {
                let (ns, sa) = id
                    .workload_parts()
                    .ok_or_else(|| CertError::Files(format!("{id} is not a workload")))?;
                let d = dir.join(ns).join(sa);
                let m = modified(&d.join("cert.pem"));
                let chain =
                    read_certs(&d.join("cert.pem")).map_err(|e| CertError::Files(e.to_string()))?;
                let got = super::id_of(&chain[0]).map_err(|e| CertError::Files(e.to_string()))?;
                if &got != id {
                    return Err(CertError::Files(format!(
                        "{} is for {got}, not {id}",
                        d.join("cert.pem").display()
                    )));
                }
                let key = PrivateKeyDer::from_pem_file(d.join("key.pem")).map_err(|e| {
                    CertError::Files(format!("{}: {e}", d.join("key.pem").display()))
                })?;
                let held = Held::new(tls::certified_key(chain, key)?);
                if held.not_after <= unix_now() {
                    return Err(CertError::Files(format!(
                        "{} has expired",
                        d.join("cert.pem").display()
                    )));
                }
                // Read again when the file changes (only once it was read whole and good).
                self.files_seen
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id.clone(), m);
                Ok(held)
            }
        }
    }

    /// Keep everything current until the process ends: look every second (a file source
    /// is re-read when due, a CA is asked when due).
    pub async fn run(self: Arc<Self>) {
        loop {
            self.refresh().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// A certificate request for `id` on `key`.
pub fn request_for(id: &SpiffeId, key: &KeyPair) -> Result<String, rcgen::Error> {
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
    p.serialize_request(key)?.pem()
}

/// Certificates a PEM file holds, as rustls wants them.
pub fn certs_of_pem(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_ca_is_asked_less_and_less_often() {
        let waits: Vec<i64> = (1..=9)
            .map(|n| backoff_secs(n).min(MAX_BACKOFF_SECS))
            .collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff_secs(u32::MAX).min(MAX_BACKOFF_SECS), 60);
    }
    use crate::identity::ca::{write_atomic, CaDir};

    /// What `weft-ca issue` writes, in the layout `--cert-dir` reads.
    fn issue_files(ca: &CaDir, id: &SpiffeId, dir: &Path, ttl: Duration) {
        let ca = ca.load().unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = ca.issue(id, &key, ttl).unwrap();
        let (ns, sa) = id.workload_parts().unwrap();
        let out = dir.join(ns).join(sa);
        std::fs::create_dir_all(&out).unwrap();
        let pem = pem::encode(&pem::Pem::new("CERTIFICATE", cert.to_vec()));
        write_atomic(&out.join("key.pem"), &key.serialize_pem(), 0o600).unwrap();
        write_atomic(&out.join("cert.pem"), &pem, 0o644).unwrap();
        write_atomic(&dir.join("bundle.pem"), &ca.bundle_pem(), 0o644).unwrap();
    }

    #[tokio::test]
    async fn certificates_from_files_are_read_checked_and_reread_when_they_change() {
        let tmp = std::env::temp_dir().join(format!("weft-certdir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let ca = CaDir::new(&tmp.join("ca"));
        ca.init("cluster.local").unwrap();
        let files = tmp.join("files");
        let web = SpiffeId::workload("cluster.local", "shop", "web").unwrap();
        let db = SpiffeId::workload("cluster.local", "shop", "db").unwrap();
        issue_files(&ca, &web, &files, Duration::from_secs(3600));
        // db's directory holds web's certificate: refused, not held under db's name.
        issue_files(&ca, &web, &tmp.join("wrong"), Duration::from_secs(3600));
        std::fs::create_dir_all(files.join("shop/db")).unwrap();
        for f in ["cert.pem", "key.pem"] {
            std::fs::copy(
                tmp.join("wrong/shop/web").join(f),
                files.join("shop/db").join(f),
            )
            .unwrap();
        }

        let ids = Identities::new(Source::Files(files.clone()), None);
        ids.want([web.clone(), db.clone()].into_iter().collect());
        ids.refresh().await;
        assert!(ids.store.roots().is_some(), "the bundle was read");
        let first = ids.store.held(&web).expect("web's certificate");
        assert!(first.not_after - unix_now() > 3000);
        assert!(
            ids.store.held(&db).is_none(),
            "a certificate of another identity"
        );
        assert!(!ids.complete());

        // cert-manager renews the file: the agent takes the new one on its next pass.
        std::thread::sleep(Duration::from_millis(20));
        issue_files(&ca, &web, &files, Duration::from_secs(600));
        ids.refresh().await;
        let second = ids.store.held(&web).unwrap();
        assert!(
            second.not_after < first.not_after,
            "the renewed file was read"
        );
        let _ = std::fs::remove_dir_all(&tmp);
    }
}

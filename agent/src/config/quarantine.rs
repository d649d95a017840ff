//! Quarantine: a workload taken out of every service's balancing and out of new inbound
//! traffic while it keeps running, so it can be examined. Declared on the Workload
//! (`spec.quarantine`) or set at run time with `weftctl quarantine` (the agent keeps those
//! in its run directory, so they survive a restart). Only the sources it allows reach it
//! afterwards: its own node (so kubelet probes keep it alive), and the addresses and
//! identities listed in `allowFrom`.

use std::net::Ipv4Addr;

/// A workload's quarantine.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Quarantine {
    /// Why, for whoever looks (weftctl, the admin API, logs).
    pub reason: String,
    /// Debug sources besides the pod's own node: `10.244.1.0/24`, `10.244.1.12` or
    /// `spiffe://cluster.local/ns/ops/sa/debugger`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_from: Vec<String>,
    /// Where it was set: `configuration` or `weftctl` (the agent fills it in, whatever a
    /// document says).
    #[serde(default)]
    pub set_by: SetBy,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SetBy {
    #[default]
    Configuration,
    Weftctl,
}

/// One `allowFrom` entry, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Allowed {
    Cidr { net: u32, len: u8 },
    Principal(String),
}

impl Allowed {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.starts_with("spiffe://") {
            return Ok(Self::Principal(s.to_owned()));
        }
        let (ip, len) = match s.split_once('/') {
            Some((ip, len)) => (
                ip,
                len.parse::<u8>()
                    .ok()
                    .filter(|l| *l <= 32)
                    .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to 32"))?,
            ),
            None => (s, 32),
        };
        let ip: Ipv4Addr = ip.parse().map_err(|_| {
            format!(
                "{s:?}: give an IPv4 address, a CIDR (10.244.1.0/24) or a SPIFFE ID (spiffe://...)"
            )
        })?;
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        Ok(Self::Cidr {
            net: u32::from(ip) & mask,
            len,
        })
    }

    fn matches(&self, ip: Ipv4Addr, identity: Option<&str>) -> bool {
        match self {
            Self::Cidr { net, len } => {
                let mask = if *len == 0 { 0 } else { u32::MAX << (32 - len) };
                u32::from(ip) & mask == *net
            }
            Self::Principal(p) => identity == Some(p.as_str()),
        }
    }
}

impl Quarantine {
    /// Every `allowFrom` entry valid, or the first that is not, with its index.
    pub fn check(&self) -> Result<(), (usize, String)> {
        if self.reason.trim().is_empty() {
            return Err((
                usize::MAX,
                "give a reason: whoever finds the pod quarantined will want to know why".into(),
            ));
        }
        for (i, a) in self.allow_from.iter().enumerate() {
            Allowed::parse(a).map_err(|e| (i, e))?;
        }
        Ok(())
    }

    /// Whether a connection from `ip` (with `identity`, when it came through a peer
    /// agent) is a debug source this quarantine lets through.
    pub fn allows(&self, ip: Ipv4Addr, identity: Option<&str>) -> bool {
        self.allow_from
            .iter()
            .filter_map(|a| Allowed::parse(a).ok())
            .any(|a| a.matches(ip, identity))
    }
}

/// Quarantines set with `weftctl quarantine` on this node, by pod (`namespace/name`),
/// kept in a file of the agent's run directory so a restarted agent keeps them.
#[derive(Debug, Default)]
pub struct Overrides {
    path: std::path::PathBuf,
    by_pod: std::collections::BTreeMap<String, Quarantine>,
}

impl Overrides {
    /// The overrides kept at `path` (none if it does not exist; an unreadable file is
    /// reported and ignored rather than stopping the agent).
    pub fn load(path: std::path::PathBuf) -> Self {
        let by_pod = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::error!(path = %path.display(), error = %e, "ignoring the unreadable quarantine file");
                Default::default()
            }),
            Err(_) => Default::default(),
        };
        Self { path, by_pod }
    }

    fn save(&self) -> std::io::Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&self.by_pod)?)?;
        std::fs::rename(&tmp, &self.path)
    }

    /// Quarantine `pod` (replacing an earlier override), and keep it.
    pub fn set(&mut self, pod: &str, q: Quarantine) -> std::io::Result<()> {
        self.by_pod.insert(pod.to_owned(), q);
        self.save()
    }

    /// Lift the override of `pod`; false if it had none.
    pub fn lift(&mut self, pod: &str) -> std::io::Result<bool> {
        let had = self.by_pod.remove(pod).is_some();
        if had {
            self.save()?;
        }
        Ok(had)
    }

    pub fn contains(&self, pod: &str) -> bool {
        self.by_pod.contains_key(pod)
    }

    /// Put the overrides on the workloads of `cfg` (a quarantine the configuration
    /// declares stays as declared).
    pub fn apply(&self, cfg: &mut super::Config) {
        if self.by_pod.is_empty() {
            return;
        }
        for w in &mut cfg.workloads {
            if w.quarantine.is_some() {
                continue;
            }
            if let Some(q) = self.by_pod.get(&w.id()) {
                w.quarantine = Some(std::sync::Arc::new(Quarantine {
                    set_by: SetBy::Weftctl,
                    ..q.clone()
                }));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(allow: &[&str]) -> Quarantine {
        Quarantine {
            reason: "leaking memory".into(),
            allow_from: allow.iter().map(|s| (*s).to_owned()).collect(),
            set_by: SetBy::Configuration,
        }
    }

    fn q_all() -> Quarantine {
        q(&["0.0.0.0/0"])
    }

    #[test]
    fn sources_match_by_cidr_address_or_identity() {
        let q = q(&[
            "10.244.1.0/24",
            "10.9.9.9",
            "spiffe://cluster.local/ns/ops/sa/debug",
        ]);
        assert!(q.check().is_ok());
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert!(q.allows(ip("10.244.1.77"), None));
        assert!(!q.allows(ip("10.244.2.77"), None));
        assert!(q.allows(ip("10.9.9.9"), None));
        assert!(!q.allows(ip("10.9.9.8"), None));
        assert!(q.allows(
            ip("10.244.3.1"),
            Some("spiffe://cluster.local/ns/ops/sa/debug")
        ));
        assert!(!q.allows(
            ip("10.244.3.1"),
            Some("spiffe://cluster.local/ns/ops/sa/other")
        ));
        assert!(q_all().allows(ip("1.2.3.4"), None));
    }

    #[test]
    fn bad_entries_are_named() {
        assert_eq!(q(&["10.0.0.0/8", "10.0.0.0/33"]).check().unwrap_err().0, 1);
        assert!(q(&["web"]).check().unwrap_err().1.contains("SPIFFE ID"));
        let mut no_reason = q(&[]);
        no_reason.reason = " ".into();
        assert!(no_reason.check().is_err());
    }
}

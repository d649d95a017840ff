//! The live tap: records as they happen, to whoever listens (the admin API's `/tap`
//! stream, `weftctl tap`). Nothing is published while nobody listens; a listener that
//! falls behind by more than [`BUFFER`] records skips them and is told how many.

use std::sync::Arc;

use tokio::sync::broadcast;

use super::Record;

/// Records held for a slow listener.
pub const BUFFER: usize = 1024;
/// Listeners at once.
pub const MAX_LISTENERS: usize = 16;

pub struct Tap {
    tx: broadcast::Sender<Arc<Record>>,
}

impl Default for Tap {
    fn default() -> Self {
        Self {
            tx: broadcast::channel(BUFFER).0,
        }
    }
}

impl Tap {
    /// Whether anyone listens now.
    pub fn listened(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    pub(super) fn publish(&self, rec: &Arc<Record>) {
        if self.tx.receiver_count() > 0 {
            let _ = self.tx.send(rec.clone());
        }
    }

    /// A new listener, unless [`MAX_LISTENERS`] listen already.
    pub fn subscribe(&self) -> Option<broadcast::Receiver<Arc<Record>>> {
        (self.tx.receiver_count() < MAX_LISTENERS).then(|| self.tx.subscribe())
    }
}

/// Which records a listener wants; every field given must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// A pod (`namespace/name`) or workload name at either end.
    pub workload: Option<String>,
    /// The destination service, `namespace/name` or just its name.
    pub service: Option<String>,
    /// A prefix of the request path (HTTP only).
    pub path: Option<String>,
    /// A status (`503`) or class (`5xx`) (HTTP only).
    pub status: Option<String>,
}

impl Filter {
    /// From a query string such as `service=default/web&status=5xx`.
    pub fn from_query(q: &str) -> Result<Self, String> {
        let mut f = Self::default();
        for pair in q.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v);
            let slot = match k {
                "workload" => &mut f.workload,
                "service" => &mut f.service,
                "path" => &mut f.path,
                "status" => &mut f.status,
                other => {
                    return Err(format!(
                        "unknown tap filter {other:?}; use workload, service, path, status"
                    ))
                }
            };
            *slot = Some(v);
        }
        if let Some(s) = &f.status {
            let ok = (s.len() == 3 && s.ends_with("xx") && s.as_bytes()[0].is_ascii_digit())
                || s.parse::<u16>().is_ok_and(|n| (100..600).contains(&n));
            if !ok {
                return Err(format!(
                    "status filter {s:?}: give a status (503) or a class (5xx)"
                ));
            }
        }
        Ok(f)
    }

    pub fn matches(&self, rec: &Record) -> bool {
        let (source, destination, service) = match rec {
            Record::Http(r) => (&r.source, &r.destination, &r.service),
            Record::Tcp(r) => (&r.source, &r.destination, &r.service),
        };
        if let Some(w) = &self.workload {
            let is = |v: &Option<Arc<str>>| v.as_deref() == Some(w.as_str());
            if !(is(&source.pod)
                || is(&source.workload)
                || is(&destination.pod)
                || is(&destination.workload))
            {
                return false;
            }
        }
        if let Some(want) = &self.service {
            let Some(s) = service.as_deref() else {
                return false;
            };
            if s != want && s.split_once('/').map(|(_, n)| n) != Some(want.as_str()) {
                return false;
            }
        }
        if self.path.is_none() && self.status.is_none() {
            return true;
        }
        let Record::Http(r) = rec else {
            return false;
        };
        if let Some(p) = &self.path {
            if !r.request.path().starts_with(p.as_str()) {
                return false;
            }
        }
        if let Some(s) = &self.status {
            let status = r.status.to_string();
            let class_match = s.ends_with("xx") && status.as_bytes()[0] == s.as_bytes()[0];
            if status != *s && !class_match {
                return false;
            }
        }
        true
    }
}

/// `%2F` and `+` decoded; anything malformed left as it is.
pub fn percent_decode(s: &str) -> String {
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'+', ..) => out.push(b' '),
            (b'%', Some(hi), Some(lo)) => {
                out.push(hi << 4 | lo);
                i += 2;
            }
            (c, ..) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

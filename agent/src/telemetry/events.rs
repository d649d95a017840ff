//! Events: what an operator should hear about before it becomes an outage, kept in a
//! bounded ring the admin API's `/events` and `weftctl events` read, logged, and counted
//! (`weft_endpoint_warnings_total`). The pre-fault detector (prefault.rs) raises them.

use std::{
    collections::VecDeque,
    net::SocketAddrV4,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use serde::Serialize;

/// Events kept; older ones are dropped.
pub const KEPT: usize = 512;

/// One event.
#[derive(Clone, Debug, Serialize)]
pub struct Event {
    #[serde(serialize_with = "super::rfc3339")]
    pub time: SystemTime,
    /// `latency-rising`, `errors-rising`, `connect-failures`, `recovered`,
    /// `auto-quarantined`.
    pub kind: &'static str,
    /// `warning` or `info`.
    pub severity: &'static str,
    pub service: Arc<str>,
    pub endpoint: SocketAddrV4,
    /// The pod behind the endpoint.
    pub workload: Arc<str>,
    /// What was seen, in numbers.
    pub message: String,
}

/// The ring of recent events.
#[derive(Debug, Default)]
pub struct Events {
    ring: Mutex<VecDeque<Arc<Event>>>,
}

impl Events {
    pub fn push(&self, e: Event) {
        match e.severity {
            "warning" => {
                tracing::warn!(kind = e.kind, service = %e.service, endpoint = %e.endpoint, workload = %e.workload, "{}", e.message)
            }
            _ => {
                tracing::info!(kind = e.kind, service = %e.service, endpoint = %e.endpoint, workload = %e.workload, "{}", e.message)
            }
        }
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        if ring.len() == KEPT {
            ring.pop_front();
        }
        ring.push_back(Arc::new(e));
    }

    /// The events kept, oldest first.
    pub fn list(&self) -> Vec<Arc<Event>> {
        self.ring
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

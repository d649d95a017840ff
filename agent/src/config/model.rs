//! The validated configuration model: what the documents mean once parsed and checked.
//! Nothing here touches the system; see `config::load` for parsing and `state` for what a
//! node derives from it.

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf};

/// Everything one configuration source declares, for all nodes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Config {
    pub nodes: BTreeMap<String, Node>,
    pub namespaces: BTreeMap<String, Namespace>,
    pub workloads: Vec<Workload>,
    pub services: Vec<Service>,
    /// Endpoints as the cluster published them; a Service with any takes its endpoints
    /// from them instead of from its selector.
    pub endpoint_slices: Vec<EndpointSlice>,
    pub routes: Vec<super::route::HttpRoute>,
    pub tls_routes: Vec<super::route::TlsRoute>,
    /// ReferenceGrants: which routes of other namespaces may send to a namespace's
    /// Services.
    pub grants: Vec<super::route::ReferenceGrant>,
    pub policies: Vec<super::policy::ServicePolicy>,
    /// From the `Mesh` document; [`Config::trust_domain`] gives the default.
    pub trust_domain: Option<String>,
    pub authorization: Vec<super::authz::AuthorizationPolicy>,
}

impl Config {
    pub const DEFAULT_TRUST_DOMAIN: &'static str = "cluster.local";

    /// The trust domain of every identity in this mesh (`spiffe://<trust-domain>/...`).
    pub fn trust_domain(&self) -> &str {
        self.trust_domain
            .as_deref()
            .unwrap_or(Self::DEFAULT_TRUST_DOMAIN)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub name: String,
    /// The node's own address, reachable from the other nodes.
    pub address: Ipv4Addr,
}

/// Mesh defaults of one namespace (from a `v1 Namespace` document's labels).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Namespace {
    pub mesh: Option<bool>,
    pub agent_down: Option<AgentDown>,
    pub mtls: Option<Mtls>,
}

/// What a meshed workload accepts from clients outside the mesh (plaintext, no identity),
/// on any port: every inbound connection goes through its agent either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mtls {
    /// Accepted and counted (`inbound_plaintext`), subject to authorization policy. The
    /// default, so a workload can join the mesh before all of its clients have.
    #[default]
    Permissive,
    /// Refused (`inbound_plaintext_refused`): only meshed workloads, through their agents.
    Strict,
}

/// What happens to a meshed workload's traffic while no agent runs on its node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AgentDown {
    /// Connects are refused: traffic never bypasses the mesh's security. The default.
    #[default]
    FailClosed,
    /// Connects fall back to direct socket-level load balancing, and are counted.
    FailOpen,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub node: String,
    pub ip: Ipv4Addr,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    pub ports: Vec<WorkloadPort>,
    /// File mode: the pod's network namespace (e.g. /var/run/netns/NAME).
    pub netns: Option<PathBuf>,
    /// File mode: the pod's cgroup, relative to the cgroup2 mount.
    pub cgroup: Option<PathBuf>,
    /// Resolved from the workload, its namespace, then the default (meshed).
    pub meshed: bool,
    pub agent_down: AgentDown,
    pub mtls: Mtls,
    /// Out of every service's balancing and of new inbound traffic but for debug sources.
    pub quarantine: Option<std::sync::Arc<super::quarantine::Quarantine>>,
}

impl Workload {
    /// `namespace/name`, how operators and logs name a workload.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn port_named(&self, name: &str) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.port)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct WorkloadPort {
    pub name: Option<String>,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub cluster_ip: Ipv4Addr,
    pub selector: BTreeMap<String, String>,
    pub ports: Vec<ServicePort>,
}

impl Service {
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn selects(&self, w: &Workload) -> bool {
        !self.selector.is_empty()
            && w.namespace == self.namespace
            && self
                .selector
                .iter()
                .all(|(k, v)| w.labels.get(k) == Some(v))
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub target: TargetPort,
    pub protocol: Protocol,
    /// What the port speaks (`http`, `http2`/`h2c`, `tcp`, `tls`), from Kubernetes'
    /// `appProtocol`; when set, the proxy skips protocol detection.
    pub app_protocol: Option<AppProtocol>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    Http,
    Http2,
    Tcp,
    Tls,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

/// A `discovery.k8s.io/v1 EndpointSlice`: some of a Service's endpoints, as the cluster's
/// endpoint controller (or whoever wrote it) published them.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointSlice {
    pub name: String,
    pub namespace: String,
    /// The Service of its namespace it belongs to.
    pub service: String,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<SliceEndpoint>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SlicePort {
    /// The Service port's name it serves (unnamed for a Service's single unnamed port).
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SliceEndpoint {
    pub ip: Ipv4Addr,
    pub node: Option<String>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

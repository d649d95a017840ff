//! Documents -> validated [`Config`]. A source is one YAML file or a directory of them
//! (`*.yaml`, `*.yml`, read in name order), each holding any number of `---`-separated
//! Kubernetes-shaped documents. Every error names the file, the document (index, kind and
//! name) and the field, so an operator can fix it without guessing.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use serde_norway::Value;

use super::model::{
    AgentDown, AppProtocol, Config, Mtls, Namespace, Node, Protocol, Service, ServicePort,
    TargetPort, Workload, WorkloadPort,
};
use super::{policy, route};

/// Ports the agent itself binds inside every enrolled pod.
const RESERVED_PORTS: [u16; 3] = [
    weft_common::OUTBOUND_PORT,
    weft_common::INBOUND_PORT,
    weft_common::TUNNEL_PORT,
];

/// Where in the configuration a problem is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    /// 1-based index of the document in its file.
    pub document: usize,
    /// `Kind namespace/name`, as far as it could be read.
    pub object: String,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: document {}", self.file.display(), self.document)?;
        if !self.object.is_empty() {
            write!(f, " ({})", self.object)?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not valid YAML: {source}")]
    Syntax {
        path: PathBuf,
        source: serde_norway::Error,
    },
    #[error("{at}: field `{field}`: {message}")]
    Field {
        at: Location,
        field: String,
        message: String,
    },
}

impl ConfigError {
    fn field(at: &Location, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Field {
            at: at.clone(),
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Read and validate every document under `path` (a file or a directory).
pub fn load_path(path: &Path) -> Result<Config, ConfigError> {
    load_sources(std::iter::once(Source::Path(path)))
}

/// Where configuration documents come from.
pub enum Source<'a> {
    /// A file, or a directory of `*.yaml`/`*.yml` files read in name order.
    Path(&'a Path),
    /// Text, named as if it came from that file (standard input, tests).
    Text(&'a Path, &'a str),
}

/// Read and validate the documents of every source together, as one configuration.
pub fn load_sources<'a>(
    sources: impl IntoIterator<Item = Source<'a>>,
) -> Result<Config, ConfigError> {
    let mut docs = Vec::new();
    for source in sources {
        match source {
            Source::Path(path) => {
                for file in files_of(path)? {
                    let text =
                        std::fs::read_to_string(&file).map_err(|source| ConfigError::Read {
                            path: file.clone(),
                            source,
                        })?;
                    docs.extend(split_documents(&file, &text)?);
                }
            }
            Source::Text(name, text) => docs.extend(split_documents(name, text)?),
        }
    }
    build(docs)
}

/// Parse configuration text as if it came from `name` (tests and `validate -`).
pub fn load_str(name: &Path, text: &str) -> Result<Config, ConfigError> {
    build(split_documents(name, text)?)
}

fn files_of(path: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let read_err = |source| ConfigError::Read {
        path: path.to_owned(),
        source,
    };
    if !path.metadata().map_err(read_err)?.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(read_err)? {
        let p = entry.map_err(read_err)?.path();
        let yaml = matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"));
        if yaml && p.is_file() {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

/// One document, with where it came from.
struct Doc {
    at: Location,
    api_version: String,
    kind: String,
    meta: Metadata,
    spec: Value,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Metadata {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    #[expect(
        dead_code,
        reason = "accepted so Kubernetes-style documents parse; no annotation has a meaning yet"
    )]
    annotations: BTreeMap<String, String>,
}

fn split_documents(file: &Path, text: &str) -> Result<Vec<Doc>, ConfigError> {
    let mut out = Vec::new();
    for (i, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(de).map_err(|source| ConfigError::Syntax {
            path: file.to_owned(),
            source,
        })?;
        let mut at = Location {
            file: file.to_owned(),
            document: i + 1,
            object: String::new(),
        };
        let Value::Mapping(mut map) = value else {
            if value.is_null() {
                continue; // an empty document, e.g. after a trailing `---`
            }
            return Err(ConfigError::field(&at, "", "a document must be a mapping"));
        };
        let mut take_str = |key: &str| -> Result<String, ConfigError> {
            match map.remove(key) {
                Some(Value::String(s)) => Ok(s),
                Some(_) => Err(ConfigError::field(&at, key, "must be a string")),
                None => Err(ConfigError::field(&at, key, "is required")),
            }
        };
        let api_version = take_str("apiVersion")?;
        let kind = take_str("kind")?;
        let meta: Metadata = match map.remove("metadata") {
            None => return Err(ConfigError::field(&at, "metadata", "is required")),
            Some(v) => typed(&at, "metadata", v)?,
        };
        at.object = match (kind.as_str(), &meta.namespace) {
            ("Mesh" | "Node" | "Namespace", _) => format!("{kind} {}", meta.name),
            (_, ns) => format!(
                "{kind} {}/{}",
                ns.as_deref().unwrap_or("default"),
                meta.name
            ),
        };
        let spec = map.remove("spec").unwrap_or(Value::Null);
        if let Some((k, _)) = map.into_iter().next() {
            let key = k.as_str().unwrap_or("?").to_owned();
            return Err(ConfigError::field(&at, key, "unknown top-level field"));
        }
        out.push(Doc {
            at,
            api_version,
            kind,
            meta,
            spec,
        });
    }
    Ok(out)
}

/// Deserialize `value` into `T`, reporting the failing field as `prefix.path`.
fn typed<T: serde::de::DeserializeOwned>(
    at: &Location,
    prefix: &str,
    value: Value,
) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let inner = e.path().to_string();
        let field = if inner == "." {
            prefix.to_owned()
        } else {
            format!("{prefix}.{inner}")
        };
        ConfigError::field(at, field, e.inner().to_string())
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NodeSpec {
    address: Ipv4Addr,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MeshSpec {
    #[serde(default)]
    trust_domain: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WorkloadSpec {
    node: String,
    ip: Ipv4Addr,
    #[serde(default)]
    service_account: Option<String>,
    #[serde(default)]
    ports: Vec<RawWorkloadPort>,
    #[serde(default)]
    netns: Option<PathBuf>,
    #[serde(default)]
    cgroup: Option<PathBuf>,
    #[serde(default)]
    mesh: Option<MeshMode>,
    #[serde(default)]
    agent_down: Option<AgentDown>,
    #[serde(default)]
    mtls: Option<Mtls>,
    #[serde(default)]
    quarantine: Option<super::quarantine::Quarantine>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum MeshMode {
    Enabled,
    Disabled,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawWorkloadPort {
    #[serde(default)]
    name: Option<String>,
    port: u16,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ServiceSpec {
    #[serde(rename = "clusterIP")]
    cluster_ip: Ipv4Addr,
    #[serde(default)]
    selector: BTreeMap<String, String>,
    ports: Vec<RawServicePort>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawServicePort {
    #[serde(default)]
    name: Option<String>,
    port: u16,
    #[serde(default)]
    target_port: Option<RawTargetPort>,
    #[serde(default)]
    protocol: Option<RawProtocol>,
    #[serde(default)]
    app_protocol: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawTargetPort {
    Number(u16),
    Name(String),
}

#[derive(Deserialize, Clone, Copy)]
enum RawProtocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

const WEFT_API: &str = "weft.dev/v1alpha1";
/// Namespace labels that set mesh defaults for the workloads in it.
pub const LABEL_MESH: &str = "weft.dev/mesh";
pub const LABEL_AGENT_DOWN: &str = "weft.dev/agent-down";
pub const LABEL_MTLS: &str = "weft.dev/mtls";

fn build(docs: Vec<Doc>) -> Result<Config, ConfigError> {
    let mut cfg = Config::default();
    let mut seen: HashMap<(String, String, String), Location> = HashMap::new();
    let mut pending_workloads = Vec::new();
    let mut pending_routes = Vec::new();
    let mut pending_policies = Vec::new();
    let mut pending_authz = Vec::new();
    let mut pending_tls = Vec::new();
    // HTTPRouteFilters by (namespace, name), for the routes that reference them.
    let mut route_filters: BTreeMap<(String, String), policy::RouteFilter> = BTreeMap::new();
    let mut vips: HashMap<(Ipv4Addr, u16, Protocol), String> = HashMap::new();
    let mut mesh_at: Option<Location> = None;
    for doc in docs {
        let Doc {
            at,
            api_version,
            kind,
            meta,
            spec,
        } = doc;
        let ns = meta
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned());
        let identity = (kind.clone(), ns.clone(), meta.name.clone());
        if let Some(first) = seen.insert(identity, at.clone()) {
            return Err(ConfigError::field(
                &at,
                "metadata.name",
                format!("duplicate {}, first declared at {first}", at.object),
            ));
        }
        check_name(&at, "metadata.name", &meta.name)?;
        match (api_version.as_str(), kind.as_str()) {
            (WEFT_API, "Node") => {
                let spec: NodeSpec = typed(&at, "spec", spec)?;
                let node = Node {
                    name: meta.name.clone(),
                    address: spec.address,
                };
                cfg.nodes.insert(meta.name, node);
            }
            (WEFT_API, "Mesh") => {
                let spec: MeshSpec = typed(&at, "spec", spec)?;
                if let Some(first) = &mesh_at {
                    return Err(ConfigError::field(
                        &at,
                        "kind",
                        format!("only one Mesh document may be declared; the first is at {first}"),
                    ));
                }
                if let Some(td) = &spec.trust_domain {
                    crate::identity::check_trust_domain(td)
                        .map_err(|e| ConfigError::field(&at, "spec.trustDomain", e.to_string()))?;
                }
                cfg.trust_domain = spec.trust_domain;
                mesh_at = Some(at);
            }
            ("v1", "Namespace") => {
                cfg.namespaces
                    .insert(meta.name.clone(), namespace_from_labels(&at, &meta)?);
            }
            (WEFT_API, "Workload") => {
                let spec: WorkloadSpec = typed(&at, "spec", spec)?;
                pending_workloads.push((at, meta, ns, spec));
            }
            ("v1", "Service") => {
                let spec: ServiceSpec = typed(&at, "spec", spec)?;
                let svc = service(&at, meta, ns, spec)?;
                for (i, p) in svc.ports.iter().enumerate() {
                    if let Some(other) = vips.insert((svc.cluster_ip, p.port, p.protocol), svc.id())
                    {
                        return Err(ConfigError::field(
                            &at,
                            format!("spec.ports[{i}]"),
                            format!(
                                "{}:{}/{:?} is already served by Service {other}",
                                svc.cluster_ip, p.port, p.protocol
                            ),
                        ));
                    }
                }
                cfg.services.push(svc);
            }
            ("gateway.networking.k8s.io/v1", "HTTPRoute") => {
                let spec: route::RouteSpec = typed(&at, "spec", spec)?;
                pending_routes.push((at, meta, ns, spec));
            }
            (WEFT_API, "TrafficPolicy") => {
                let spec: policy::PolicySpec = typed(&at, "spec", spec)?;
                pending_policies.push((at, meta, ns, spec));
            }
            (WEFT_API, "AuthorizationPolicy") => {
                let spec: super::authz::AuthzSpec = typed(&at, "spec", spec)?;
                pending_authz.push((at, meta, ns, spec));
            }
            (WEFT_API, "HTTPRouteFilter") => {
                let spec: policy::FilterSpec = typed(&at, "spec", spec)?;
                let f = policy::convert_filter(spec)
                    .map_err(|(field, message)| ConfigError::Field { at, field, message })?;
                route_filters.insert((ns, meta.name), f);
            }
            ("gateway.networking.k8s.io/v1alpha2", "TLSRoute") => {
                let spec: route::TlsRouteSpec = typed(&at, "spec", spec)?;
                pending_tls.push((at, meta, ns, spec));
            }
            (_, "TLSRoute") => {
                return Err(ConfigError::field(
                    &at,
                    "apiVersion",
                    "must be gateway.networking.k8s.io/v1alpha2",
                ));
            }
            (_, "HTTPRoute") => {
                return Err(ConfigError::field(
                    &at,
                    "apiVersion",
                    "must be gateway.networking.k8s.io/v1",
                ));
            }
            (
                _,
                "Mesh"
                | "Node"
                | "Workload"
                | "TrafficPolicy"
                | "HTTPRouteFilter"
                | "AuthorizationPolicy",
            ) => {
                return Err(ConfigError::field(
                    &at,
                    "apiVersion",
                    format!("must be {WEFT_API}"),
                ));
            }
            (_, "Service" | "Namespace") => {
                return Err(ConfigError::field(&at, "apiVersion", "must be v1"));
            }
            _ => {
                return Err(ConfigError::field(
                    &at,
                    "kind",
                    format!("unknown kind {kind:?}; expected Mesh, Node, Namespace, Workload, Service, HTTPRoute, TLSRoute, TrafficPolicy, HTTPRouteFilter or AuthorizationPolicy"),
                ));
            }
        }
    }
    // Workloads last: they refer to nodes and namespaces declared anywhere in the source.
    let mut ips: HashMap<Ipv4Addr, String> = HashMap::new();
    for (at, meta, ns, spec) in pending_workloads {
        let w = workload(&cfg, &at, meta, ns, spec)?;
        // Its identity names it in certificates and DNS names: both parts must be labels.
        if let Err(e) = crate::identity::SpiffeId::workload(
            cfg.trust_domain(),
            &w.namespace,
            &w.service_account,
        ) {
            return Err(ConfigError::field(
                &at,
                "spec.serviceAccount",
                format!("gives no valid workload identity: {e}"),
            ));
        }
        if let Some(other) = ips.insert(w.ip, w.id()) {
            return Err(ConfigError::field(
                &at,
                "spec.ip",
                format!("{} is already the address of workload {other}", w.ip),
            ));
        }
        cfg.workloads.push(w);
    }
    // Routes last: they refer to Services declared anywhere in the source.
    for (at, meta, ns, spec) in pending_routes {
        let ports = service_ports(&cfg.services, &ns);
        let filters: route::RouteFilters<'_> = route_filters
            .iter()
            .filter(|((n, _), _)| *n == ns)
            .map(|((_, name), f)| (name.as_str(), f))
            .collect();
        let r = route::convert(meta.name, ns, spec, &ports, &filters)
            .map_err(|(field, message)| ConfigError::Field { at, field, message })?;
        cfg.routes.push(r);
    }
    for (at, meta, ns, spec) in pending_tls {
        let ports = service_ports(&cfg.services, &ns);
        let r = route::convert_tls(meta.name, ns, spec, &ports)
            .map_err(|(field, message)| ConfigError::Field { at, field, message })?;
        cfg.tls_routes.push(r);
    }
    // Policies last too, and at most one per Service.
    let mut targeted: HashMap<(String, String), Location> = HashMap::new();
    for (at, meta, ns, spec) in pending_policies {
        let names: Vec<&str> = cfg
            .services
            .iter()
            .filter(|s| s.namespace == ns)
            .map(|s| s.name.as_str())
            .collect();
        let p =
            policy::convert_policy(meta.name, ns, spec, &names).map_err(|(field, message)| {
                ConfigError::Field {
                    at: at.clone(),
                    field,
                    message,
                }
            })?;
        if let Some(first) = targeted.insert((p.namespace.clone(), p.service.clone()), at.clone()) {
            return Err(ConfigError::field(
                &at,
                "spec.targetRef",
                format!(
                    "Service {}/{} already has a TrafficPolicy, at {first}",
                    p.namespace, p.service
                ),
            ));
        }
        cfg.policies.push(p);
    }
    // Authorization policies after the Mesh document: principals are of its trust domain.
    for (at, meta, ns, spec) in pending_authz {
        let td = cfg.trust_domain().to_owned();
        let p = super::authz::convert(meta.name, ns, &td, spec)
            .map_err(|(field, message)| ConfigError::Field { at, field, message })?;
        cfg.authorization.push(p);
    }
    Ok(cfg)
}

/// The Services of `namespace` and their TCP ports, for routes to refer to.
fn service_ports<'a>(services: &'a [Service], namespace: &str) -> route::ServicePorts<'a> {
    services
        .iter()
        .filter(|s| s.namespace == namespace)
        .map(|s| {
            let tcp = s.ports.iter().filter(|p| p.protocol == Protocol::Tcp);
            (s.name.as_str(), tcp.map(|p| p.port).collect())
        })
        .collect()
}

fn check_name(at: &Location, field: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(ConfigError::field(
            at,
            field,
            format!("{name:?} is not a valid name (lowercase letters, digits, '-', '.')"),
        ))
    }
}

fn namespace_from_labels(at: &Location, meta: &Metadata) -> Result<Namespace, ConfigError> {
    Ok(Namespace {
        mesh: label_choice(
            at,
            meta,
            LABEL_MESH,
            [("enabled", true), ("disabled", false)],
        )?,
        agent_down: label_choice(
            at,
            meta,
            LABEL_AGENT_DOWN,
            [
                ("fail-closed", AgentDown::FailClosed),
                ("fail-open", AgentDown::FailOpen),
            ],
        )?,
        mtls: label_choice(
            at,
            meta,
            LABEL_MTLS,
            [("strict", Mtls::Strict), ("permissive", Mtls::Permissive)],
        )?,
    })
}

/// A label that takes one of two values: which one, if it is set.
fn label_choice<T: Copy>(
    at: &Location,
    meta: &Metadata,
    label: &str,
    choices: [(&str, T); 2],
) -> Result<Option<T>, ConfigError> {
    let Some(v) = meta.labels.get(label) else {
        return Ok(None);
    };
    match choices.iter().find(|(name, _)| name == v) {
        Some((_, t)) => Ok(Some(*t)),
        None => Err(ConfigError::field(
            at,
            format!("metadata.labels.{label}"),
            format!("{v:?}: expected {} or {}", choices[0].0, choices[1].0),
        )),
    }
}

fn workload(
    cfg: &Config,
    at: &Location,
    meta: Metadata,
    namespace: String,
    spec: WorkloadSpec,
) -> Result<Workload, ConfigError> {
    if !cfg.nodes.contains_key(&spec.node) {
        let known: Vec<_> = cfg.nodes.keys().cloned().collect();
        return Err(ConfigError::field(
            at,
            "spec.node",
            format!(
                "no Node named {:?} is declared (known: {})",
                spec.node,
                known.join(", ")
            ),
        ));
    }
    let mut ports = Vec::new();
    let mut names = BTreeSet::new();
    for (i, p) in spec.ports.into_iter().enumerate() {
        if p.port == 0 || RESERVED_PORTS.contains(&p.port) {
            return Err(ConfigError::field(
                at,
                format!("spec.ports[{i}].port"),
                format!(
                    "{} is not usable: 0 and the agent's ports {RESERVED_PORTS:?} are reserved",
                    p.port
                ),
            ));
        }
        if let Some(n) = &p.name {
            if !names.insert(n.clone()) {
                return Err(ConfigError::field(
                    at,
                    format!("spec.ports[{i}].name"),
                    format!("duplicate port name {n:?}"),
                ));
            }
        }
        ports.push(WorkloadPort {
            name: p.name,
            port: p.port,
        });
    }
    let ns_defaults = cfg.namespaces.get(&namespace).cloned().unwrap_or_default();
    let meshed = match spec.mesh {
        Some(MeshMode::Enabled) => true,
        Some(MeshMode::Disabled) => false,
        None => ns_defaults.mesh.unwrap_or(true),
    };
    if let Some(cg) = &spec.cgroup {
        if cg.is_absolute() {
            return Err(ConfigError::field(
                at,
                "spec.cgroup",
                "must be relative to the cgroup2 mount, e.g. weft/node-a/pod-1",
            ));
        }
    }
    if let Some(q) = &spec.quarantine {
        q.check().map_err(|(i, message)| {
            let field = if i == usize::MAX {
                "spec.quarantine.reason".to_owned()
            } else {
                format!("spec.quarantine.allowFrom[{i}]")
            };
            ConfigError::field(at, field, message)
        })?;
    }
    Ok(Workload {
        name: meta.name,
        namespace,
        node: spec.node,
        ip: spec.ip,
        labels: meta.labels,
        service_account: spec.service_account.unwrap_or_else(|| "default".to_owned()),
        ports,
        netns: spec.netns,
        cgroup: spec.cgroup,
        meshed,
        agent_down: spec
            .agent_down
            .or(ns_defaults.agent_down)
            .unwrap_or_default(),
        mtls: spec.mtls.or(ns_defaults.mtls).unwrap_or_default(),
        quarantine: spec.quarantine.map(|q| {
            std::sync::Arc::new(super::quarantine::Quarantine {
                set_by: super::quarantine::SetBy::Configuration,
                ..q
            })
        }),
    })
}

fn service(
    at: &Location,
    meta: Metadata,
    namespace: String,
    spec: ServiceSpec,
) -> Result<Service, ConfigError> {
    if spec.ports.is_empty() {
        return Err(ConfigError::field(
            at,
            "spec.ports",
            "a Service needs at least one port",
        ));
    }
    let mut ports = Vec::new();
    for (i, p) in spec.ports.into_iter().enumerate() {
        if p.port == 0 {
            return Err(ConfigError::field(
                at,
                format!("spec.ports[{i}].port"),
                "must be 1-65535",
            ));
        }
        let target = match p.target_port {
            None => TargetPort::Number(p.port),
            Some(RawTargetPort::Number(0)) => {
                return Err(ConfigError::field(
                    at,
                    format!("spec.ports[{i}].targetPort"),
                    "must be 1-65535",
                ));
            }
            Some(RawTargetPort::Number(n)) => TargetPort::Number(n),
            Some(RawTargetPort::Name(n)) => TargetPort::Name(n),
        };
        let protocol = match p.protocol {
            None | Some(RawProtocol::Tcp) => Protocol::Tcp,
            Some(RawProtocol::Udp) => Protocol::Udp,
        };
        let app_protocol = match p.app_protocol.as_deref() {
            None => None,
            Some("http" | "kubernetes.io/http") => Some(AppProtocol::Http),
            Some("http2" | "h2c" | "kubernetes.io/h2c" | "grpc") => Some(AppProtocol::Http2),
            Some("tcp") => Some(AppProtocol::Tcp),
            Some("tls" | "https") => Some(AppProtocol::Tls),
            Some(other) => {
                return Err(ConfigError::field(
                    at,
                    format!("spec.ports[{i}].appProtocol"),
                    format!("{other:?}: expected http, http2 (h2c, grpc), tcp or tls"),
                ));
            }
        };
        ports.push(ServicePort {
            name: p.name,
            port: p.port,
            target,
            protocol,
            app_protocol,
        });
    }
    Ok(Service {
        name: meta.name,
        namespace,
        cluster_ip: spec.cluster_ip,
        selector: spec.selector,
        ports,
    })
}

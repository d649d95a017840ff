//! Kubernetes' own kinds as `kubectl get -o yaml` prints them and the API serves them:
//! `v1 Node`, `Pod`, `Service` and `discovery.k8s.io/v1 EndpointSlice`, read into the
//! same model as weft's shorthand kinds. Only the fields weft needs are read; the rest
//! (status, defaults the API server fills in) is accepted and left alone.

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf};

use serde::Deserialize;
use serde_json::Value;

use super::load::{
    typed, ConfigError, Location, MeshMode, Metadata, RawWorkloadPort, Strictness, WorkloadSpec,
    ANNOTATION_CGROUP, ANNOTATION_NETNS, ANNOTATION_QUARANTINE, ANNOTATION_QUARANTINE_ALLOW_FROM,
    LABEL_AGENT_DOWN, LABEL_MESH, LABEL_MTLS,
};
use super::model::{
    AgentDown, AppProtocol, EndpointSlice, Mtls, Node, Protocol, Service, ServicePort,
    SliceEndpoint, SlicePort, TargetPort,
};

/// The label EndpointSlices carry to name their Service.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct NodeStatus {
    #[serde(default)]
    addresses: Vec<NodeAddress>,
}

#[derive(Deserialize)]
struct NodeAddress {
    #[serde(rename = "type")]
    kind: String,
    address: String,
}

/// A `v1 Node`: its name and its InternalIP, where the other nodes reach its agent.
pub(super) fn node(at: &Location, name: &str, status: Value) -> Result<Node, ConfigError> {
    let status: NodeStatus = if status.is_null() {
        NodeStatus::default()
    } else {
        typed(at, "status", status)?
    };
    let address = status
        .addresses
        .iter()
        .filter(|a| a.kind == "InternalIP")
        .find_map(|a| a.address.parse::<Ipv4Addr>().ok())
        .ok_or_else(|| {
            ConfigError::field(
                at,
                "status.addresses",
                "has no IPv4 InternalIP: the other nodes' agents reach this one there",
            )
        })?;
    Ok(Node {
        name: name.to_owned(),
        address,
    })
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PodSpec {
    #[serde(default)]
    node_name: Option<String>,
    #[serde(default)]
    host_network: bool,
    #[serde(default)]
    service_account_name: Option<String>,
    #[serde(default)]
    containers: Vec<Container>,
    #[serde(default)]
    init_containers: Vec<Container>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Container {
    #[serde(default)]
    ports: Vec<ContainerPort>,
    /// `Always` on an init container makes it a sidecar, running beside the others.
    #[serde(default)]
    restart_policy: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContainerPort {
    #[serde(default)]
    name: Option<String>,
    container_port: u16,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PodStatus {
    #[serde(default)]
    phase: Option<String>,
    #[serde(default, rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(default, rename = "podIPs")]
    pod_ips: Vec<PodIp>,
}

#[derive(Deserialize)]
struct PodIp {
    ip: String,
}

/// A `Pod` as a workload, or `None` when it is not one of the mesh's: not scheduled, no
/// IPv4 address yet, finished, or on the node's own network.
pub(super) fn pod(
    at: &Location,
    meta: &Metadata,
    spec: Value,
    status: Value,
) -> Result<Option<WorkloadSpec>, ConfigError> {
    let spec: PodSpec = typed(at, "spec", spec)?;
    let status: PodStatus = if status.is_null() {
        PodStatus::default()
    } else {
        typed(at, "status", status)?
    };
    let finished = matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"));
    let ip = status
        .pod_ip
        .iter()
        .chain(status.pod_ips.iter().map(|p| &p.ip))
        .find_map(|ip| ip.parse::<Ipv4Addr>().ok());
    let (Some(node), Some(ip), false, false) = (spec.node_name, ip, finished, spec.host_network)
    else {
        return Ok(None);
    };
    let annotations = &meta.annotations;
    let path = |key: &str| annotations.get(key).map(PathBuf::from);
    let sidecars = spec
        .init_containers
        .into_iter()
        .filter(|c| c.restart_policy.as_deref() == Some("Always"));
    let ports = spec
        .containers
        .into_iter()
        .chain(sidecars)
        .flat_map(|c| c.ports)
        .map(|p| RawWorkloadPort {
            name: p.name,
            port: p.container_port,
        })
        .collect();
    Ok(Some(WorkloadSpec {
        node,
        ip,
        service_account: spec.service_account_name,
        ports,
        netns: path(ANNOTATION_NETNS),
        cgroup: path(ANNOTATION_CGROUP),
        mesh: annotation_choice(
            at,
            annotations,
            LABEL_MESH,
            [
                ("enabled", MeshMode::Enabled),
                ("disabled", MeshMode::Disabled),
            ],
        )?,
        agent_down: annotation_choice(
            at,
            annotations,
            LABEL_AGENT_DOWN,
            [
                ("fail-closed", AgentDown::FailClosed),
                ("fail-open", AgentDown::FailOpen),
            ],
        )?,
        mtls: annotation_choice(
            at,
            annotations,
            LABEL_MTLS,
            [("strict", Mtls::Strict), ("permissive", Mtls::Permissive)],
        )?,
        quarantine: annotations.get(ANNOTATION_QUARANTINE).map(|reason| {
            super::quarantine::Quarantine {
                reason: reason.clone(),
                allow_from: annotations
                    .get(ANNOTATION_QUARANTINE_ALLOW_FROM)
                    .map(|a| {
                        a.split(',')
                            .map(str::trim)
                            .filter(|s| !s.is_empty())
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_default(),
                set_by: super::quarantine::SetBy::Configuration,
            }
        }),
    }))
}

/// An annotation that takes one of two values: which one, if it is set.
fn annotation_choice<T: Copy>(
    at: &Location,
    annotations: &BTreeMap<String, String>,
    key: &str,
    choices: [(&str, T); 2],
) -> Result<Option<T>, ConfigError> {
    let Some(v) = annotations.get(key) else {
        return Ok(None);
    };
    match choices.iter().find(|(name, _)| name == v) {
        Some((_, t)) => Ok(Some(*t)),
        None => Err(ConfigError::field(
            at,
            format!("metadata.annotations.{key}"),
            format!("{v:?}: expected {} or {}", choices[0].0, choices[1].0),
        )),
    }
}

/// Fields of a Service's spec that weft accepts and does not act on.
const IGNORED_SERVICE_FIELDS: &[&str] = &[
    "allocateLoadBalancerNodePorts",
    "clusterIPs",
    "externalIPs",
    "externalTrafficPolicy",
    "healthCheckNodePort",
    "internalTrafficPolicy",
    "ipFamilies",
    "ipFamilyPolicy",
    "loadBalancerClass",
    "loadBalancerIP",
    "loadBalancerSourceRanges",
    "publishNotReadyAddresses",
    "sessionAffinity",
    "sessionAffinityConfig",
    "trafficDistribution",
];

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServiceSpec {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default, rename = "clusterIP")]
    cluster_ip: Option<String>,
    #[serde(default)]
    selector: BTreeMap<String, String>,
    #[serde(default)]
    ports: Vec<RawServicePort>,
    #[serde(default)]
    external_name: Option<String>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
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
    #[serde(default)]
    #[expect(dead_code, reason = "accepted; weft does not serve node ports")]
    node_port: Option<serde::de::IgnoredAny>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
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
    #[serde(rename = "SCTP")]
    Sctp,
}

/// A `v1 Service` with an address, or `None` for one without (headless, ExternalName).
/// Hand-written files are checked for unknown fields; objects from the API are not.
pub(super) fn service(
    at: &Location,
    meta: Metadata,
    namespace: String,
    spec: Value,
    strictness: Strictness,
) -> Result<Option<Service>, ConfigError> {
    let spec: ServiceSpec = typed(at, "spec", spec)?;
    if strictness == Strictness::File {
        if let Some(k) = spec
            .other
            .keys()
            .find(|k| !IGNORED_SERVICE_FIELDS.contains(&k.as_str()))
        {
            return Err(ConfigError::field(
                at,
                format!("spec.{k}"),
                "unknown field of a Service spec",
            ));
        }
        for (i, p) in spec.ports.iter().enumerate() {
            if let Some(k) = p.other.keys().next() {
                return Err(ConfigError::field(
                    at,
                    format!("spec.ports[{i}].{k}"),
                    "unknown field of a Service port",
                ));
            }
        }
    }
    if spec.kind.as_deref() == Some("ExternalName") || spec.external_name.is_some() {
        return Ok(None);
    }
    let cluster_ip = match spec.cluster_ip.as_deref() {
        Some("None") => return Ok(None),
        None | Some("") => {
            return Err(ConfigError::field(
                at,
                "spec.clusterIP",
                "is required: weft serves a Service at its cluster IP",
            ))
        }
        Some(ip) => ip.parse::<Ipv4Addr>().map_err(|_| {
            ConfigError::field(
                at,
                "spec.clusterIP",
                format!("{ip:?} is not an IPv4 address"),
            )
        })?,
    };
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
            Some(RawProtocol::Sctp) => {
                return Err(ConfigError::field(
                    at,
                    format!("spec.ports[{i}].protocol"),
                    "SCTP is not supported: weft serves TCP and UDP",
                ));
            }
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
            name: p.name.filter(|n| !n.is_empty()),
            port: p.port,
            target,
            protocol,
            app_protocol,
        });
    }
    Ok(Some(Service {
        name: meta.name,
        namespace,
        cluster_ip,
        selector: spec.selector,
        ports,
    }))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawSlice {
    address_type: String,
    #[serde(default)]
    endpoints: Vec<RawEndpoint>,
    #[serde(default)]
    ports: Option<Vec<RawSlicePort>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawEndpoint {
    addresses: Vec<String>,
    #[serde(default)]
    conditions: RawConditions,
    #[serde(default)]
    node_name: Option<String>,
}

#[derive(Deserialize, Default)]
struct RawConditions {
    #[serde(default)]
    ready: Option<bool>,
    #[serde(default)]
    serving: Option<bool>,
    #[serde(default)]
    terminating: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawSlicePort {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    protocol: Option<RawProtocol>,
}

/// A `discovery.k8s.io/v1 EndpointSlice` of a Service, or `None` for one weft does not
/// use: of another address family, or not labelled with its Service.
pub(super) fn endpoint_slice(
    at: &Location,
    meta: Metadata,
    namespace: String,
    body: serde_json::Map<String, Value>,
) -> Result<Option<EndpointSlice>, ConfigError> {
    let raw: RawSlice = typed(at, "", Value::Object(body))?;
    let Some(service) = meta.labels.get(LABEL_SERVICE_NAME).cloned() else {
        return Ok(None);
    };
    if raw.address_type != "IPv4" {
        return Ok(None);
    }
    let mut endpoints = Vec::new();
    for (i, e) in raw.endpoints.into_iter().enumerate() {
        let Some(first) = e.addresses.first() else {
            return Err(ConfigError::field(
                at,
                format!("endpoints[{i}].addresses"),
                "needs an address",
            ));
        };
        let ip = first.parse::<Ipv4Addr>().map_err(|_| {
            ConfigError::field(
                at,
                format!("endpoints[{i}].addresses[0]"),
                format!("{first:?} is not an IPv4 address"),
            )
        })?;
        // Unset conditions mean ready, and serving as ready says (the API's rule).
        let ready = e.conditions.ready.unwrap_or(true);
        endpoints.push(SliceEndpoint {
            ip,
            node: e.node_name,
            ready,
            serving: e.conditions.serving.unwrap_or(ready),
            terminating: e.conditions.terminating.unwrap_or(false),
        });
    }
    let ports = raw
        .ports
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| {
            Some(SlicePort {
                name: p.name.filter(|n| !n.is_empty()),
                port: p.port.filter(|&p| p != 0)?,
                protocol: match p.protocol {
                    None | Some(RawProtocol::Tcp) => Protocol::Tcp,
                    Some(RawProtocol::Udp) => Protocol::Udp,
                    Some(RawProtocol::Sctp) => return None,
                },
            })
        })
        .collect();
    Ok(Some(EndpointSlice {
        name: meta.name,
        namespace,
        service,
        ports,
        endpoints,
    }))
}

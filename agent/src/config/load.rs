//! Documents -> validated [`Config`]. A source is one YAML file or a directory of them
//! (`*.yaml`, `*.yml`, read in name order), each holding any number of `---`-separated
//! Kubernetes-shaped documents (a `kind: List`, as `kubectl get -o yaml` prints, counts as
//! its items), or objects read from the Kubernetes API. Every error names where the object
//! came from (file, document, kind and name) and the field, so an operator can fix it
//! without guessing.
//!
//! Acceptance is per object: an invalid object is reported ([`Rejected`]) and left out,
//! or keeps its last accepted version when there is one, while everything around it
//! applies. Only what cannot be attributed to an object (a file that cannot be read or
//! is not YAML, a document without a kind or a name) refuses the whole change.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use serde_json::Value;

use super::model::{
    AgentDown, Config, EndpointSlice, Mtls, Namespace, Node, Protocol, Service, Workload,
    WorkloadPort,
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
    pub origin: Origin,
    /// `Kind namespace/name`, as far as it could be read.
    pub object: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    File {
        file: PathBuf,
        /// 1-based index of the document in its file.
        document: usize,
        /// 1-based index in a `kind: List` document's `items`.
        item: Option<usize>,
    },
    /// Read from the Kubernetes API.
    Api,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.origin {
            Origin::File {
                file,
                document,
                item,
            } => {
                write!(f, "{}: document {document}", file.display())?;
                if let Some(i) = item {
                    write!(f, " item {i}")?;
                }
            }
            Origin::Api => write!(f, "Kubernetes API")?,
        }
        if !self.object.is_empty() {
            write!(f, " ({})", self.object)?;
        }
        Ok(())
    }
}

impl serde::Serialize for Location {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
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
    pub(super) fn field(
        at: &Location,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self::Field {
            at: at.clone(),
            field: field.into(),
            message: message.into(),
        }
    }
}

/// An object that was not accepted, and why.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Rejected {
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
    /// Where it was read.
    pub at: Location,
    pub field: String,
    pub message: String,
    /// Its last accepted version stays in force (otherwise it is left out).
    pub kept_previous: bool,
}

impl Rejected {
    /// The object `kind` `namespace/name` refused for the field `e` names (nothing of it
    /// kept, until [`Builder::reject`] says otherwise).
    fn of(kind: &str, namespace: Option<&str>, name: &str, e: ConfigError) -> Self {
        let ConfigError::Field { at, field, message } = e else {
            unreachable!("objects are refused for their fields");
        };
        Self {
            kind: kind.to_owned(),
            namespace: namespace.map(str::to_owned),
            name: name.to_owned(),
            at,
            field,
            message,
            kept_previous: false,
        }
    }

    /// The refusal as a [`ConfigError`].
    pub fn error(&self) -> ConfigError {
        ConfigError::field(&self.at, &self.field, &self.message)
    }
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: field `{}`: {}", self.at, self.field, self.message)?;
        if self.kept_previous {
            write!(f, " (its last accepted version stays in force)")?;
        }
        Ok(())
    }
}

/// What a source holds: the accepted configuration and the objects refused.
#[derive(Clone, Debug, Default)]
pub struct Loaded {
    pub config: Config,
    pub rejected: Vec<Rejected>,
}

impl Loaded {
    /// The configuration if every object was accepted, else the first refusal (for
    /// `validate` and tests, where any invalid object is a failure).
    pub fn strict(self) -> Result<Config, ConfigError> {
        match self.rejected.first() {
            Some(r) => Err(r.error()),
            None => Ok(self.config),
        }
    }
}

/// Read and validate every document under `path` (a file or a directory); any invalid
/// object is an error.
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

/// Read and validate the documents of every source together, as one configuration; any
/// invalid object is an error.
pub fn load_sources<'a>(
    sources: impl IntoIterator<Item = Source<'a>>,
) -> Result<Config, ConfigError> {
    load_objects(sources, None)?.strict()
}

/// Read the documents of every source together and accept them object by object: an
/// invalid object is reported and keeps its version in `prev` if it had one there. Errors
/// only when a file cannot be read or parsed, or a document names no object.
pub fn load_objects<'a>(
    sources: impl IntoIterator<Item = Source<'a>>,
    prev: Option<&Config>,
) -> Result<Loaded, ConfigError> {
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
                    split_documents(&file, &text, &mut docs)?;
                }
            }
            Source::Text(name, text) => split_documents(name, text, &mut docs)?,
        }
    }
    Ok(build(docs, [], prev, Strictness::File))
}

/// Parse configuration text as if it came from `name` (tests and `validate -`); any
/// invalid object is an error.
pub fn load_str(name: &Path, text: &str) -> Result<Config, ConfigError> {
    let mut docs = Vec::new();
    split_documents(name, text, &mut docs)?;
    build(docs, [], None, Strictness::File).strict()
}

/// Objects as the Kubernetes API serves them (JSON), accepted one by one like a file's
/// documents. Fields weft does not know are ignored in Kubernetes' own kinds (the API
/// server has validated them, and newer servers add fields); an object without a kind or
/// a name is reported and left out. EndpointSlices come apart, already read (the bulk of a
/// cluster's objects: they are kept in that compact form, not as JSON).
pub fn from_api<'a>(
    objects: impl IntoIterator<Item = Value>,
    slices: impl IntoIterator<Item = &'a SliceRead>,
    prev: Option<&Config>,
) -> Loaded {
    let mut docs = Vec::new();
    let mut unnamed = Vec::new();
    for o in objects {
        match doc_of(api_location(), o) {
            Ok(d) => docs.push(d),
            Err(e) => unnamed.push(e),
        }
    }
    let mut loaded = build(docs, slices, prev, Strictness::Api);
    for e in unnamed {
        if matches!(e, ConfigError::Field { .. }) {
            loaded.rejected.push(Rejected::of("", None, "", e));
        }
    }
    loaded
}

fn api_location() -> Location {
    Location {
        origin: Origin::Api,
        object: String::new(),
    }
}

/// One EndpointSlice as the API serves it, read: the slice, `None` for one weft does not
/// use (another address family, no Service label), or why it is refused.
pub type SliceRead = Result<Option<EndpointSlice>, Box<Rejected>>;

/// Read one EndpointSlice as the API serves it (see [`SliceRead`]).
pub fn endpoint_slice_from_api(obj: Value) -> SliceRead {
    const KIND: &str = "EndpointSlice";
    let doc = doc_of(api_location(), obj).map_err(|e| Rejected::of(KIND, None, "", e))?;
    let ns = doc.namespace();
    let name = doc.meta.name.clone();
    let refused = |e| Box::new(Rejected::of(KIND, Some(&ns), &name, e));
    check_name(&doc.at, "metadata.name", &doc.meta.name).map_err(refused)?;
    super::kube_shapes::endpoint_slice(&doc.at, doc.meta, ns.clone(), doc.rest).map_err(refused)
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

/// How closely Kubernetes' own kinds are checked.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Strictness {
    /// Hand-written files: an unknown field is a mistake and refused.
    File,
    /// The API server validated the object; fields newer than weft are ignored.
    Api,
}

/// One document, with where it came from.
struct Doc {
    at: Location,
    api_version: String,
    kind: String,
    meta: Metadata,
    spec: Value,
    status: Value,
    /// Top-level fields besides apiVersion, kind, metadata, spec and status (an
    /// EndpointSlice keeps its content there).
    rest: serde_json::Map<String, Value>,
}

impl Doc {
    fn namespace(&self) -> String {
        self.meta
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned())
    }

    /// Refuse top-level fields the kind does not have.
    fn no_rest(&self) -> Result<(), ConfigError> {
        match self.rest.keys().next() {
            Some(k) => Err(ConfigError::field(&self.at, k, "unknown top-level field")),
            None => Ok(()),
        }
    }
}

/// `metadata`, with every field of Kubernetes' ObjectMeta accepted so objects read back
/// from a cluster parse; weft reads the name, namespace, labels and annotations.
#[derive(Deserialize, Default)]
#[expect(dead_code, reason = "the rest of ObjectMeta is accepted and not read")]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct Metadata {
    pub(super) name: String,
    #[serde(default)]
    pub(super) namespace: Option<String>,
    #[serde(default)]
    pub(super) labels: BTreeMap<String, String>,
    #[serde(default)]
    pub(super) annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub(super) uid: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    pub(super) resource_version: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    pub(super) generation: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    pub(super) creation_timestamp: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    pub(super) deletion_timestamp: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    pub(super) deletion_grace_period_seconds: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    pub(super) generate_name: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    pub(super) owner_references: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    pub(super) finalizers: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    pub(super) managed_fields: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    pub(super) self_link: Option<serde::de::IgnoredAny>,
}

fn split_documents(file: &Path, text: &str, out: &mut Vec<Doc>) -> Result<(), ConfigError> {
    for (i, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(de).map_err(|source| ConfigError::Syntax {
            path: file.to_owned(),
            source,
        })?;
        let at = |item| Location {
            origin: Origin::File {
                file: file.to_owned(),
                document: i + 1,
                item,
            },
            object: String::new(),
        };
        if value.is_null() {
            continue; // an empty document, e.g. after a trailing `---`
        }
        // `kubectl get -o yaml` of several objects prints one `kind: List`.
        if value.get("kind").and_then(Value::as_str) == Some("List") {
            let Some(Value::Array(items)) = value.get("items") else {
                return Err(ConfigError::field(&at(None), "items", "a List needs items"));
            };
            for (j, item) in items.iter().enumerate() {
                out.push(doc_of(at(Some(j + 1)), item.clone())?);
            }
            continue;
        }
        out.push(doc_of(at(None), value)?);
    }
    Ok(())
}

/// Split an object into its kind, metadata and content.
fn doc_of(mut at: Location, value: Value) -> Result<Doc, ConfigError> {
    let Value::Object(mut map) = value else {
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
    let status = map.remove("status").unwrap_or(Value::Null);
    Ok(Doc {
        at,
        api_version,
        kind,
        meta,
        spec,
        status,
        rest: map,
    })
}

/// Deserialize `value` into `T`, reporting the failing field as `prefix.path`.
pub(super) fn typed<T: serde::de::DeserializeOwned>(
    at: &Location,
    prefix: &str,
    value: Value,
) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let inner = e.path().to_string();
        let field = match (prefix, inner.as_str()) {
            (p, ".") => p.to_owned(),
            ("", i) => i.to_owned(),
            (p, i) => format!("{p}.{i}"),
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
pub(super) struct WorkloadSpec {
    pub(super) node: String,
    pub(super) ip: Ipv4Addr,
    #[serde(default)]
    pub(super) service_account: Option<String>,
    #[serde(default)]
    pub(super) ports: Vec<RawWorkloadPort>,
    #[serde(default)]
    pub(super) netns: Option<PathBuf>,
    #[serde(default)]
    pub(super) cgroup: Option<PathBuf>,
    #[serde(default)]
    pub(super) mesh: Option<MeshMode>,
    #[serde(default)]
    pub(super) agent_down: Option<AgentDown>,
    #[serde(default)]
    pub(super) mtls: Option<Mtls>,
    #[serde(default)]
    pub(super) quarantine: Option<super::quarantine::Quarantine>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
pub(super) enum MeshMode {
    Enabled,
    Disabled,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct RawWorkloadPort {
    #[serde(default)]
    pub(super) name: Option<String>,
    pub(super) port: u16,
}

const WEFT_API: &str = "weft.dev/v1alpha1";
/// Namespace labels that set mesh defaults for the workloads in it.
pub const LABEL_MESH: &str = "weft.dev/mesh";
pub const LABEL_AGENT_DOWN: &str = "weft.dev/agent-down";
pub const LABEL_MTLS: &str = "weft.dev/mtls";
/// Pod annotations: the pod's network namespace and cgroup, where no CNI plugin hands
/// them to the agent (file mode, snapshots).
pub const ANNOTATION_NETNS: &str = "weft.dev/netns";
pub const ANNOTATION_CGROUP: &str = "weft.dev/cgroup";
/// Pod annotations that quarantine it: the reason, and the debug sources still allowed
/// (comma-separated, as `spec.quarantine.allowFrom` of a Workload).
pub const ANNOTATION_QUARANTINE: &str = "weft.dev/quarantine";
pub const ANNOTATION_QUARANTINE_ALLOW_FROM: &str = "weft.dev/quarantine-allow-from";

/// The kinds weft reads, as `apiVersion` and `kind`.
const KINDS: &[(&str, &str)] = &[
    (WEFT_API, "Mesh"),
    (WEFT_API, "Node"),
    (WEFT_API, "Workload"),
    (WEFT_API, "TrafficPolicy"),
    (WEFT_API, "HTTPRouteFilter"),
    (WEFT_API, "AuthorizationPolicy"),
    ("v1", "Node"),
    ("v1", "Namespace"),
    ("v1", "Pod"),
    ("v1", "Service"),
    ("discovery.k8s.io/v1", "EndpointSlice"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"),
    ("gateway.networking.k8s.io/v1", "GRPCRoute"),
    // TLSRoute graduated to v1; the experimental channel's versions read the same.
    ("gateway.networking.k8s.io/v1", "TLSRoute"),
    ("gateway.networking.k8s.io/v1alpha3", "TLSRoute"),
    ("gateway.networking.k8s.io/v1alpha2", "TLSRoute"),
    ("gateway.networking.k8s.io/v1beta1", "ReferenceGrant"),
];

/// Which model object a document declares: documents of two kinds can declare the same
/// one (a weft `Node` and a `v1 Node`, a `Workload` and a `Pod`).
fn model_kind(kind: &str) -> &str {
    match kind {
        "Pod" => "Workload",
        k => k,
    }
}

/// The configuration being built, and what was refused on the way.
struct Builder<'p> {
    cfg: Config,
    prev: Option<&'p Config>,
    rejected: Vec<Rejected>,
    /// Service ports already taken, by address, port and protocol.
    vips: HashMap<(Ipv4Addr, u16, Protocol), String>,
}

impl Builder<'_> {
    /// Report `e` against the object of `doc`'s kind and name, keeping its previous
    /// version if there is one.
    fn reject(&mut self, kind: &str, namespace: Option<&str>, name: &str, e: ConfigError) {
        let mut r = Rejected::of(kind, namespace, name, e);
        r.kept_previous = self.keep_previous(kind, namespace.unwrap_or("default"), name);
        self.rejected.push(r);
    }

    /// Put the previously accepted version of an object back, if there is one that still
    /// fits beside the rest.
    fn keep_previous(&mut self, kind: &str, ns: &str, name: &str) -> bool {
        let Some(prev) = self.prev else {
            return false;
        };
        let same = |n: &str, m: &str| n == ns && m == name;
        match model_kind(kind) {
            "Mesh" => {
                self.cfg.trust_domain = prev.trust_domain.clone();
                true
            }
            "Node" => prev
                .nodes
                .get(name)
                .map(|n| self.cfg.nodes.insert(name.to_owned(), n.clone()))
                .is_some(),
            "Namespace" => prev
                .namespaces
                .get(name)
                .map(|n| self.cfg.namespaces.insert(name.to_owned(), n.clone()))
                .is_some(),
            "Workload" => {
                let Some(w) = prev.workloads.iter().find(|w| same(&w.namespace, &w.name)) else {
                    return false;
                };
                if self.cfg.workloads.iter().any(|o| o.ip == w.ip) {
                    return false;
                }
                self.cfg.workloads.push(w.clone());
                true
            }
            "Service" => {
                let Some(s) = prev.services.iter().find(|s| same(&s.namespace, &s.name)) else {
                    return false;
                };
                self.add_service(s.clone()).is_ok()
            }
            "EndpointSlice" => restore(&prev.endpoint_slices, &mut self.cfg.endpoint_slices, |s| {
                same(&s.namespace, &s.name)
            }),
            "HTTPRoute" | "GRPCRoute" => restore(&prev.routes, &mut self.cfg.routes, |r| {
                r.kind.as_str() == kind && same(&r.namespace, &r.name)
            }),
            "ReferenceGrant" => restore(&prev.grants, &mut self.cfg.grants, |g| {
                same(&g.namespace, &g.name)
            }),
            "TLSRoute" => restore(&prev.tls_routes, &mut self.cfg.tls_routes, |r| {
                same(&r.namespace, &r.name)
            }),
            "TrafficPolicy" => {
                let Some(p) = prev.policies.iter().find(|p| same(&p.namespace, &p.name)) else {
                    return false;
                };
                if self.cfg.policies.iter().any(|o| {
                    o.namespace == p.namespace && o.services.iter().any(|s| p.services.contains(s))
                }) {
                    return false;
                }
                self.cfg.policies.push(p.clone());
                true
            }
            "AuthorizationPolicy" => {
                restore(&prev.authorization, &mut self.cfg.authorization, |p| {
                    same(&p.namespace, &p.name)
                })
            }
            _ => false,
        }
    }

    /// Add a Service whose ports no other Service serves.
    fn add_service(&mut self, svc: Service) -> Result<(), (usize, String)> {
        for (i, p) in svc.ports.iter().enumerate() {
            if let Some(other) = self.vips.get(&(svc.cluster_ip, p.port, p.protocol)) {
                return Err((
                    i,
                    format!(
                        "{}:{}/{:?} is already served by Service {other}",
                        svc.cluster_ip, p.port, p.protocol
                    ),
                ));
            }
        }
        for p in &svc.ports {
            self.vips
                .insert((svc.cluster_ip, p.port, p.protocol), svc.id());
        }
        self.cfg.services.push(svc);
        Ok(())
    }
}

/// An HTTPRoute or a GRPCRoute, read into the same model.
enum RouteDoc {
    Http(route::RouteSpec),
    Grpc(route::GrpcRouteSpec),
}

/// Put the object of `prev` that `is_it` picks back into `into`; whether there was one.
fn restore<T: Clone>(prev: &[T], into: &mut Vec<T>, is_it: impl Fn(&T) -> bool) -> bool {
    prev.iter()
        .find(|o| is_it(o))
        .map(|o| into.push(o.clone()))
        .is_some()
}

/// A document waiting for the objects it refers to.
struct Pending<S> {
    at: Location,
    kind: String,
    meta: Metadata,
    ns: String,
    spec: S,
}

fn build<'a>(
    docs: Vec<Doc>,
    slices: impl IntoIterator<Item = &'a SliceRead>,
    prev: Option<&Config>,
    strictness: Strictness,
) -> Loaded {
    let mut b = Builder {
        cfg: Config::default(),
        prev,
        rejected: Vec::new(),
        vips: HashMap::new(),
    };
    // EndpointSlices read ahead: they refer to nothing.
    for s in slices {
        match s {
            Ok(Some(s)) => b.cfg.endpoint_slices.push(s.clone()),
            Ok(None) => {}
            Err(r) => {
                let mut r = Rejected::clone(r);
                r.kept_previous = b.keep_previous(
                    "EndpointSlice",
                    r.namespace.as_deref().unwrap_or("default"),
                    &r.name,
                );
                b.rejected.push(r);
            }
        }
    }
    let mut seen: HashMap<(String, String, String), Location> = HashMap::new();
    let mut pending_workloads: Vec<Pending<WorkloadSpec>> = Vec::new();
    let mut pending_routes = Vec::new();
    let mut pending_policies = Vec::new();
    let mut pending_authz = Vec::new();
    let mut pending_tls = Vec::new();
    // HTTPRouteFilters by (namespace, name), for the routes that reference them.
    let mut route_filters: BTreeMap<(String, String), policy::RouteFilter> = BTreeMap::new();
    let mut mesh_at: Option<Location> = None;
    // The Mesh document first: authorization policies and identities depend on it.
    let (mesh, docs): (Vec<Doc>, Vec<Doc>) = docs
        .into_iter()
        .partition(|d| d.kind == "Mesh" && d.api_version == WEFT_API);
    for doc in mesh.into_iter().chain(docs) {
        let ns = doc.namespace();
        let cluster_scoped = matches!(doc.kind.as_str(), "Mesh" | "Node" | "Namespace");
        let ns_of = (!cluster_scoped).then_some(ns.as_str());
        let kind = doc.kind.clone();
        let name = doc.meta.name.clone();
        let identity = (model_kind(&kind).to_owned(), ns.clone(), name.clone());
        if let Some(first) = seen.get(&identity) {
            let e = ConfigError::field(
                &doc.at,
                "metadata.name",
                format!("duplicate {}, first declared at {first}", doc.at.object),
            );
            // The first declaration stands: nothing of the duplicate is kept.
            b.rejected.push(Rejected::of(&kind, ns_of, &name, e));
            continue;
        }
        seen.insert(identity, doc.at.clone());
        let res = accept(
            &mut b,
            doc,
            ns.clone(),
            strictness,
            &mut mesh_at,
            &mut pending_workloads,
            &mut pending_routes,
            &mut pending_policies,
            &mut pending_authz,
            &mut pending_tls,
            &mut route_filters,
        );
        if let Err(e) = res {
            b.reject(&kind, ns_of, &name, e);
        }
    }
    // Workloads next: they refer to nodes and namespaces declared anywhere in the source.
    let mut ips: HashMap<Ipv4Addr, String> =
        b.cfg.workloads.iter().map(|w| (w.ip, w.id())).collect();
    for p in pending_workloads {
        let (kind, ns, name) = (p.kind.clone(), p.ns.clone(), p.meta.name.clone());
        let res = workload(&b.cfg, p).and_then(|(w, at)| {
            // Its identity names it in certificates and DNS names: both parts must be
            // labels.
            if let Err(e) = crate::identity::SpiffeId::workload(
                b.cfg.trust_domain(),
                &w.namespace,
                &w.service_account,
            ) {
                return Err(ConfigError::field(
                    &at,
                    if kind == "Pod" {
                        "spec.serviceAccountName"
                    } else {
                        "spec.serviceAccount"
                    },
                    format!("gives no valid workload identity: {e}"),
                ));
            }
            if let Some(other) = ips.get(&w.ip) {
                return Err(ConfigError::field(
                    &at,
                    if kind == "Pod" {
                        "status.podIP"
                    } else {
                        "spec.ip"
                    },
                    format!("{} is already the address of workload {other}", w.ip),
                ));
            }
            Ok(w)
        });
        match res {
            Ok(w) => {
                ips.insert(w.ip, w.id());
                b.cfg.workloads.push(w);
            }
            Err(e) => {
                b.reject(&kind, Some(&ns), &name, e);
                if let Some(w) = b.cfg.workloads.last() {
                    ips.insert(w.ip, w.id());
                }
            }
        }
    }
    // Routes: they refer to Services declared anywhere in the source (Services do not
    // change from here on: they are set aside while routes are converted).
    let services = std::mem::take(&mut b.cfg.services);
    {
        let ports = service_ports(&services);
        let grants = b.cfg.grants.clone();
        let refs = route::Refs {
            services: &ports,
            grants: &grants,
        };
        each_pending(
            &mut b,
            pending_routes,
            |_, name, ns, spec| {
                let filters: route::RouteFilters<'_> = route_filters
                    .iter()
                    .filter(|((n, _), _)| *n == ns)
                    .map(|((_, name), f)| (name.as_str(), f))
                    .collect();
                match spec {
                    RouteDoc::Http(spec) => route::convert(name, ns.clone(), spec, &refs, &filters),
                    RouteDoc::Grpc(spec) => {
                        route::convert_grpc(name, ns.clone(), spec, &refs, &filters)
                    }
                }
            },
            |cfg, r| cfg.routes.push(r),
        );
        each_pending(
            &mut b,
            pending_tls,
            |_, name, ns, spec| route::convert_tls(name, ns.clone(), spec, &refs),
            |cfg, r| cfg.tls_routes.push(r),
        );
    }
    b.cfg.services = services;
    // Policies last too, and at most one per Service.
    each_pending(
        &mut b,
        pending_policies,
        |cfg, name, ns, spec| {
            let names: Vec<&str> = cfg
                .services
                .iter()
                .filter(|s| s.namespace == ns)
                .map(|s| s.name.as_str())
                .collect();
            let p = policy::convert_policy(name, ns.clone(), spec, &names)?;
            let taken = cfg
                .policies
                .iter()
                .filter(|o| o.namespace == p.namespace)
                .find_map(|o| {
                    p.services
                        .iter()
                        .find(|s| o.services.contains(s))
                        .map(|s| (o, s))
                });
            match taken {
                Some((first, svc)) => Err((
                    "spec.targetRefs".to_owned(),
                    format!(
                        "Service {}/{svc} already has a TrafficPolicy, {}",
                        p.namespace, first.name
                    ),
                )),
                None => Ok(p),
            }
        },
        |cfg, p| cfg.policies.push(p),
    );
    // Authorization policies after the Mesh document: principals are of its trust domain.
    each_pending(
        &mut b,
        pending_authz,
        |cfg, name, ns, spec| super::authz::convert(name, ns, cfg.trust_domain(), spec),
        |cfg, p| cfg.authorization.push(p),
    );
    Loaded {
        config: b.cfg,
        rejected: b.rejected,
    }
}

/// Convert documents that refer to others, now that those are in: each accepted, or
/// refused (keeping its previous version) on its own.
fn each_pending<S, T>(
    b: &mut Builder<'_>,
    pending: Vec<Pending<S>>,
    convert: impl Fn(&Config, String, String, S) -> Result<T, (String, String)>,
    push: impl Fn(&mut Config, T),
) {
    for p in pending {
        let Pending {
            at,
            kind,
            meta,
            ns,
            spec,
        } = p;
        let name = meta.name.clone();
        match convert(&b.cfg, meta.name, ns.clone(), spec) {
            Ok(t) => push(&mut b.cfg, t),
            Err((field, message)) => b.reject(
                &kind,
                Some(&ns),
                &name,
                ConfigError::Field { at, field, message },
            ),
        }
    }
}

/// Take in one document: convert what stands alone, queue what refers to others.
#[expect(
    clippy::too_many_arguments,
    reason = "the builder's queues, one per kind"
)]
fn accept(
    b: &mut Builder<'_>,
    doc: Doc,
    ns: String,
    strictness: Strictness,
    mesh_at: &mut Option<Location>,
    pending_workloads: &mut Vec<Pending<WorkloadSpec>>,
    pending_routes: &mut Vec<Pending<RouteDoc>>,
    pending_policies: &mut Vec<Pending<policy::PolicySpec>>,
    pending_authz: &mut Vec<Pending<super::authz::AuthzSpec>>,
    pending_tls: &mut Vec<Pending<route::TlsRouteSpec>>,
    route_filters: &mut BTreeMap<(String, String), policy::RouteFilter>,
) -> Result<(), ConfigError> {
    let at = doc.at.clone();
    check_name(&at, "metadata.name", &doc.meta.name)?;
    macro_rules! pending {
        ($meta:expr, $spec:expr) => {
            Pending {
                at: at.clone(),
                kind: doc.kind.clone(),
                meta: $meta,
                ns: ns.clone(),
                spec: $spec,
            }
        };
    }
    let known = |v: &str, k: &str| KINDS.contains(&(v, k));
    if !known(&doc.api_version, &doc.kind) {
        let versions: Vec<&str> = KINDS
            .iter()
            .filter(|(_, k)| *k == doc.kind)
            .map(|(v, _)| *v)
            .collect();
        if versions.is_empty() {
            let kinds: BTreeSet<&str> = KINDS.iter().map(|(_, k)| *k).collect();
            return Err(ConfigError::field(
                &at,
                "kind",
                format!(
                    "unknown kind {:?}; expected one of {}",
                    doc.kind,
                    kinds.into_iter().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        return Err(ConfigError::field(
            &at,
            "apiVersion",
            format!("must be {}", versions.join(" or ")),
        ));
    }
    match (doc.api_version.as_str(), doc.kind.as_str()) {
        (WEFT_API, "Node") => {
            doc.no_rest()?;
            let spec: NodeSpec = typed(&at, "spec", doc.spec)?;
            let node = Node {
                name: doc.meta.name.clone(),
                address: spec.address,
            };
            b.cfg.nodes.insert(doc.meta.name, node);
        }
        ("v1", "Node") => {
            let node = super::kube_shapes::node(&at, &doc.meta.name, doc.status)?;
            b.cfg.nodes.insert(doc.meta.name, node);
        }
        (WEFT_API, "Mesh") => {
            doc.no_rest()?;
            let spec: MeshSpec = typed(&at, "spec", doc.spec)?;
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
            b.cfg.trust_domain = spec.trust_domain;
            *mesh_at = Some(at);
        }
        ("v1", "Namespace") => {
            b.cfg.namespaces.insert(
                doc.meta.name.clone(),
                namespace_from_labels(&at, &doc.meta)?,
            );
        }
        (WEFT_API, "Workload") => {
            doc.no_rest()?;
            let spec: WorkloadSpec = typed(&at, "spec", doc.spec)?;
            pending_workloads.push(pending!(doc.meta, spec));
        }
        ("v1", "Pod") => {
            // Pods that have no address yet, have finished, or share the node's network
            // are not workloads of the mesh: nothing to refuse.
            if let Some(spec) = super::kube_shapes::pod(&at, &doc.meta, doc.spec, doc.status)? {
                pending_workloads.push(pending!(doc.meta, spec));
            }
        }
        ("v1", "Service") => {
            if strictness == Strictness::File {
                doc.no_rest()?;
            }
            let Some(svc) = super::kube_shapes::service(&at, doc.meta, ns, doc.spec, strictness)?
            else {
                return Ok(()); // headless or ExternalName: no address to serve
            };
            b.add_service(svc)
                .map_err(|(i, m)| ConfigError::field(&at, format!("spec.ports[{i}]"), m))?;
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            if let Some(s) = super::kube_shapes::endpoint_slice(&at, doc.meta, ns, doc.rest)? {
                b.cfg.endpoint_slices.push(s);
            }
        }
        ("gateway.networking.k8s.io/v1", "HTTPRoute") => {
            doc.no_rest()?;
            let spec: route::RouteSpec = typed(&at, "spec", doc.spec)?;
            pending_routes.push(pending!(doc.meta, RouteDoc::Http(spec)));
        }
        ("gateway.networking.k8s.io/v1", "GRPCRoute") => {
            doc.no_rest()?;
            let spec: route::GrpcRouteSpec = typed(&at, "spec", doc.spec)?;
            pending_routes.push(pending!(doc.meta, RouteDoc::Grpc(spec)));
        }
        ("gateway.networking.k8s.io/v1beta1", "ReferenceGrant") => {
            doc.no_rest()?;
            let spec: route::GrantSpec = typed(&at, "spec", doc.spec)?;
            let g = route::convert_grant(doc.meta.name, ns, spec)
                .map_err(|(field, message)| ConfigError::Field { at, field, message })?;
            b.cfg.grants.push(g);
        }
        (WEFT_API, "TrafficPolicy") => {
            doc.no_rest()?;
            let spec: policy::PolicySpec = typed(&at, "spec", doc.spec)?;
            pending_policies.push(pending!(doc.meta, spec));
        }
        (WEFT_API, "AuthorizationPolicy") => {
            doc.no_rest()?;
            let spec: super::authz::AuthzSpec = typed(&at, "spec", doc.spec)?;
            pending_authz.push(pending!(doc.meta, spec));
        }
        (WEFT_API, "HTTPRouteFilter") => {
            doc.no_rest()?;
            let spec: policy::FilterSpec = typed(&at, "spec", doc.spec)?;
            let f = policy::convert_filter(spec)
                .map_err(|(field, message)| ConfigError::Field { at, field, message })?;
            route_filters.insert((ns, doc.meta.name), f);
        }
        (_, "TLSRoute") => {
            doc.no_rest()?;
            let spec: route::TlsRouteSpec = typed(&at, "spec", doc.spec)?;
            pending_tls.push(pending!(doc.meta, spec));
        }
        _ => unreachable!("every kind of KINDS is handled"),
    }
    Ok(())
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

/// Every Service's TCP ports (and their names), for routes to refer to.
fn service_ports(services: &[Service]) -> route::ServicePorts<'_> {
    services
        .iter()
        .map(|s| {
            let tcp = s.ports.iter().filter(|p| p.protocol == Protocol::Tcp);
            (
                (s.namespace.as_str(), s.name.as_str()),
                tcp.map(|p| (p.port, p.name.as_deref())).collect(),
            )
        })
        .collect()
}

/// A `Workload`, or a `Pod` read as one: its fields are named as the document names them.
fn workload(cfg: &Config, p: Pending<WorkloadSpec>) -> Result<(Workload, Location), ConfigError> {
    let Pending {
        at,
        kind,
        meta,
        ns: namespace,
        spec,
    } = p;
    let pod = kind == "Pod";
    if !cfg.nodes.contains_key(&spec.node) {
        let known: Vec<_> = cfg.nodes.keys().cloned().collect();
        return Err(ConfigError::field(
            &at,
            if pod { "spec.nodeName" } else { "spec.node" },
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
        let field = |f: &str| {
            if pod {
                format!("spec.containers[].ports[{i}].{f}")
            } else {
                format!("spec.ports[{i}].{f}")
            }
        };
        if p.port == 0 || RESERVED_PORTS.contains(&p.port) {
            return Err(ConfigError::field(
                &at,
                field(if pod { "containerPort" } else { "port" }),
                format!(
                    "{} is not usable: 0 and the agent's ports {RESERVED_PORTS:?} are reserved",
                    p.port
                ),
            ));
        }
        if let Some(n) = &p.name {
            if !names.insert(n.clone()) {
                return Err(ConfigError::field(
                    &at,
                    field("name"),
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
    // A Workload is meshed unless it or its namespace says otherwise; a Pod only when its
    // namespace or itself opts in, as in a cluster where the mesh is being rolled out.
    let meshed = match spec.mesh {
        Some(MeshMode::Enabled) => true,
        Some(MeshMode::Disabled) => false,
        None => ns_defaults.mesh.unwrap_or(!pod),
    };
    if let Some(cg) = &spec.cgroup {
        if cg.is_absolute() {
            return Err(ConfigError::field(
                &at,
                if pod {
                    format!("metadata.annotations.{ANNOTATION_CGROUP}")
                } else {
                    "spec.cgroup".to_owned()
                },
                "must be relative to the cgroup2 mount, e.g. weft/node-a/pod-1",
            ));
        }
    }
    if let Some(q) = &spec.quarantine {
        q.check().map_err(|(i, message)| {
            let field = match (pod, i == usize::MAX) {
                (false, true) => "spec.quarantine.reason".to_owned(),
                (false, false) => format!("spec.quarantine.allowFrom[{i}]"),
                (true, true) => format!("metadata.annotations.{ANNOTATION_QUARANTINE}"),
                (true, false) => {
                    format!("metadata.annotations.{ANNOTATION_QUARANTINE_ALLOW_FROM}[{i}]")
                }
            };
            ConfigError::field(&at, field, message)
        })?;
    }
    let w = Workload {
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
    };
    Ok((w, at))
}

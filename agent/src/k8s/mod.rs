//! Kubernetes mode: the cluster's objects, watched through the API server with kube-rs
//! and read into the same model as file mode (`config::from_api`), so the datapath and
//! the proxy cannot tell the sources apart.
//!
//! Each kind has a watcher (list, then watch from the list's resourceVersion, with
//! bookmarks; a 410 Gone or a broken stream starts a fresh list; API errors back off
//! exponentially) feeding a reflector cache. A change to any cache wakes the agent's
//! control loop, which rebuilds the configuration from the caches. Objects are trimmed
//! before they are cached: `managedFields`, the last-applied annotation, and every field
//! of a Pod weft does not read.

use std::{collections::HashMap, path::Path, sync::Arc, time::Duration};

use anyhow::Context as _;
use futures_util::StreamExt as _;
use kube::{
    api::{Api, ApiResource, DynamicObject, GroupVersionKind},
    runtime::{reflector, watcher, WatchStreamExt as _},
    Client,
};
use serde_json::Value;
use tokio::{
    sync::{watch, Notify},
    task::JoinHandle,
};

use crate::config::SliceRead;

pub mod status;

/// A kind weft watches.
struct Kind {
    group: &'static str,
    /// The versions weft reads, preferred first: the first the API server serves is
    /// watched (the API server converts between the versions of one resource).
    versions: &'static [&'static str],
    kind: &'static str,
    plural: &'static str,
    /// Whether the agent waits for it before it starts: Kubernetes' own kinds are always
    /// there; the Gateway API's and weft's own CRDs may not be installed (yet).
    required: bool,
}

const KINDS: &[Kind] = &[
    Kind {
        group: "",
        versions: &["v1"],
        kind: "Node",
        plural: "nodes",
        required: true,
    },
    Kind {
        group: "",
        versions: &["v1"],
        kind: "Namespace",
        plural: "namespaces",
        required: true,
    },
    Kind {
        group: "",
        versions: &["v1"],
        kind: "Pod",
        plural: "pods",
        required: true,
    },
    Kind {
        group: "",
        versions: &["v1"],
        kind: "Service",
        plural: "services",
        required: true,
    },
    Kind {
        group: "discovery.k8s.io",
        versions: &["v1"],
        kind: "EndpointSlice",
        plural: "endpointslices",
        required: true,
    },
    Kind {
        group: "gateway.networking.k8s.io",
        versions: &["v1"],
        kind: "HTTPRoute",
        plural: "httproutes",
        required: false,
    },
    Kind {
        group: "gateway.networking.k8s.io",
        versions: &["v1"],
        kind: "GRPCRoute",
        plural: "grpcroutes",
        required: false,
    },
    Kind {
        group: "gateway.networking.k8s.io",
        versions: &["v1", "v1alpha3", "v1alpha2"],
        kind: "TLSRoute",
        plural: "tlsroutes",
        required: false,
    },
    Kind {
        group: "gateway.networking.k8s.io",
        versions: &["v1beta1"],
        kind: "ReferenceGrant",
        plural: "referencegrants",
        required: false,
    },
    Kind {
        group: "weft.dev",
        versions: &["v1alpha1"],
        kind: "Mesh",
        plural: "meshes",
        required: false,
    },
    Kind {
        group: "weft.dev",
        versions: &["v1alpha1"],
        kind: "TrafficPolicy",
        plural: "trafficpolicies",
        required: false,
    },
    Kind {
        group: "weft.dev",
        versions: &["v1alpha1"],
        kind: "HTTPRouteFilter",
        plural: "httproutefilters",
        required: false,
    },
    Kind {
        group: "weft.dev",
        versions: &["v1alpha1"],
        kind: "AuthorizationPolicy",
        plural: "authorizationpolicies",
        required: false,
    },
];

/// What weft-ca watches: which workload runs on which node, and the trust domain.
pub const CA_KINDS: [&str; 4] = ["Node", "Namespace", "Pod", "Mesh"];

/// The API server weft reads, from a kubeconfig file or, without one, as kube-rs infers
/// it (`KUBECONFIG`, `~/.kube/config`, then the pod's service account in a cluster).
pub async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .with_context(|| format!("using the kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("finding the Kubernetes API (no kubeconfig, not in a cluster)")?,
    };
    let url = config.cluster_url.to_string();
    Client::try_from(config).with_context(|| format!("connecting to the Kubernetes API at {url}"))
}

/// What changed in the caches since the control loop last looked.
#[derive(Debug, Default)]
pub struct Changes {
    /// Something other than an EndpointSlice changed (or a kind was listed again): the
    /// whole configuration has to be read again.
    pub everything: bool,
    /// EndpointSlices applied or deleted, by namespace and name.
    pub slices: Vec<(String, String)>,
}

/// EndpointSlices as read (`config::SliceRead`), by namespace and name: the bulk of a
/// cluster's objects, kept compact instead of as JSON.
type Slices = HashMap<(String, String), Arc<SliceRead>>;

/// How a watcher tells the control loop a cache changed: the change logged, the
/// generation moved, the loop woken.
#[derive(Clone, Default)]
struct Signal {
    changes: Arc<std::sync::Mutex<Changes>>,
    /// Woken whenever a cache changed (an object applied or deleted, or a re-list done).
    changed: Arc<Notify>,
    /// Counts those changes.
    generation: Arc<std::sync::atomic::AtomicU64>,
}

impl Signal {
    /// A change of the EndpointSlice `slice`, or of anything (`None`).
    fn raise(&self, slice: Option<(String, String)>) {
        {
            let mut log = self.changes.lock().unwrap_or_else(|p| p.into_inner());
            match slice {
                Some(k) => log.slices.push(k),
                None => log.everything = true,
            }
        }
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.changed.notify_one();
    }
}

/// Whether a kind's watch is failing, so a failure is logged once and its end too.
struct Health {
    kind: &'static str,
    failing: bool,
}

impl Health {
    fn ok(&mut self) {
        if std::mem::take(&mut self.failing) {
            tracing::info!(kind = self.kind, "watching again");
        }
    }

    /// The watcher backs off and retries (a fresh list after 410 Gone).
    fn failed(&mut self, e: &watcher::Error) {
        if std::mem::replace(&mut self.failing, true) {
            tracing::debug!(kind = self.kind, error = %e, "watching still fails");
        } else {
            tracing::warn!(kind = self.kind, error = %e, "watching failed; retrying with backoff");
        }
    }
}

/// An object as the API serves it, apiVersion and kind filled in.
fn as_served(o: impl serde::Serialize, ar: &ApiResource) -> Option<Value> {
    let mut v = serde_json::to_value(o).ok()?;
    if let Value::Object(m) = &mut v {
        m.insert("apiVersion".into(), Value::from(ar.api_version.as_str()));
        m.insert("kind".into(), Value::from(ar.kind.as_str()));
    }
    Some(v)
}

/// An object's namespace and name.
fn key_of(o: &DynamicObject) -> (String, String) {
    (
        o.metadata.namespace.clone().unwrap_or_default(),
        o.metadata.name.clone().unwrap_or_default(),
    )
}

/// The caches of every watched kind.
pub struct Cluster {
    client: Client,
    caches: Vec<(&'static Kind, ApiResource, reflector::Store<DynamicObject>)>,
    /// EndpointSlices, when watched, and whether they have been listed once.
    slices: Option<(Arc<std::sync::RwLock<Slices>>, watch::Receiver<bool>)>,
    signal: Signal,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Cluster {
    /// Start watching every kind.
    pub async fn watch(client: &Client) -> Self {
        Self::watch_only(client, None).await
    }

    /// Start watching the kinds named (every kind weft reads when `None`).
    pub async fn watch_only(client: &Client, only: Option<&[&str]>) -> Self {
        let signal = Signal::default();
        let mut caches = Vec::new();
        let mut tasks = Vec::new();
        let mut slices = None;
        for kind in KINDS
            .iter()
            .filter(|k| only.is_none_or(|o| o.contains(&k.kind)))
        {
            let ar = served(client, kind).await;
            if kind.kind == "EndpointSlice" {
                let map = Arc::new(std::sync::RwLock::new(Slices::new()));
                let (listed, ready) = watch::channel(false);
                let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
                let sink = SliceSink {
                    ar,
                    map: map.clone(),
                    listed,
                    signal: signal.clone(),
                };
                tasks.push(tokio::spawn(sink.run(api)));
                slices = Some((map, ready));
                continue;
            }
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
            let writer = reflector::store::Writer::new(ar.clone());
            caches.push((kind, ar.clone(), writer.as_reader()));
            let stream = watcher(api, watcher::Config::default())
                .default_backoff()
                .modify(move |o: &mut DynamicObject| trim(kind.kind, o))
                .reflect(writer);
            let signal = signal.clone();
            tasks.push(tokio::spawn(async move {
                let mut stream = std::pin::pin!(stream);
                let mut health = Health {
                    kind: kind.kind,
                    failing: false,
                };
                while let Some(event) = stream.next().await {
                    match event {
                        Ok(
                            watcher::Event::Apply(_)
                            | watcher::Event::Delete(_)
                            | watcher::Event::InitDone,
                        ) => {
                            health.ok();
                            signal.raise(None);
                        }
                        Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                        Err(e) => health.failed(&e),
                    }
                }
            }));
        }
        Self {
            client: client.clone(),
            caches,
            slices,
            signal,
            tasks,
        }
    }

    /// Set (a string) or remove (null) annotations of a pod, with a merge patch.
    pub async fn annotate_pod(
        &self,
        namespace: &str,
        name: &str,
        annotations: Value,
    ) -> kube::Result<()> {
        let pods: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            namespace,
            &ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("", "v1", "Pod"), "pods"),
        );
        let patch = serde_json::json!({"metadata": {"annotations": annotations}});
        pods.patch(
            name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .map(|_| ())
    }

    /// Wakes whenever a cache changed (an object applied or deleted, or a re-list done).
    pub fn changed(&self) -> &Notify {
        &self.signal.changed
    }

    /// What changed since the last call.
    pub fn take_changes(&self) -> Changes {
        std::mem::take(
            &mut *self
                .signal
                .changes
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        )
    }

    /// Every EndpointSlice, as read.
    pub fn slices(&self) -> Vec<Arc<SliceRead>> {
        self.slices.as_ref().map_or_else(Vec::new, |(map, _)| {
            map.read()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .cloned()
                .collect()
        })
    }

    /// One EndpointSlice as read; `None` when it is not there.
    pub fn slice(&self, namespace: &str, name: &str) -> Option<Arc<SliceRead>> {
        let (map, _) = self.slices.as_ref()?;
        map.read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// A number that moves whenever any cache changed.
    pub fn generation(&self) -> u64 {
        self.signal
            .generation
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Wait until every required kind has been listed once; the kinds still missing when
    /// `timeout` passes are returned.
    pub async fn synced(&self, timeout: Duration) -> Result<(), Vec<&'static str>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut missing = Vec::new();
        if let Some((_, ready)) = &self.slices {
            let mut ready = ready.clone();
            if tokio::time::timeout_at(deadline, ready.wait_for(|listed| *listed))
                .await
                .is_err()
            {
                missing.push("EndpointSlice");
            }
        }
        for (kind, _, store) in self.caches.iter().filter(|(k, _, _)| k.required) {
            if tokio::time::timeout_at(deadline, store.wait_until_ready())
                .await
                .is_err()
            {
                missing.push(kind.kind);
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(missing)
        }
    }

    /// The caches, by kind (for the status writer).
    pub fn caches(&self) -> Vec<(String, ApiResource, reflector::Store<DynamicObject>)> {
        self.caches
            .iter()
            .map(|(k, ar, s)| (k.kind.to_owned(), ar.clone(), s.clone()))
            .collect()
    }

    /// Every cached object, as the API serves it (apiVersion and kind filled in).
    pub fn objects(&self) -> Vec<Value> {
        let mut out = Vec::new();
        for (_, ar, store) in &self.caches {
            out.extend(store.state().iter().filter_map(|o| as_served(&**o, ar)));
        }
        out
    }
}

/// Watches EndpointSlices into their compact cache: each object is read as it arrives
/// (`config::endpoint_slice_from_api`) and its JSON dropped. A (re-)list replaces the
/// whole cache once it is complete, as kube's reflector does.
struct SliceSink {
    ar: ApiResource,
    map: Arc<std::sync::RwLock<Slices>>,
    listed: watch::Sender<bool>,
    signal: Signal,
}

impl SliceSink {
    fn read(&self, o: DynamicObject) -> ((String, String), Arc<SliceRead>) {
        let key = key_of(&o);
        let v = as_served(o, &self.ar).unwrap_or(Value::Null);
        (key, Arc::new(crate::config::endpoint_slice_from_api(v)))
    }

    fn slices(&self) -> std::sync::RwLockWriteGuard<'_, Slices> {
        self.map.write().unwrap_or_else(|p| p.into_inner())
    }

    async fn run(self, api: Api<DynamicObject>) {
        let stream = watcher(api, watcher::Config::default()).default_backoff();
        let mut stream = std::pin::pin!(stream);
        let mut listing: Option<Slices> = None;
        let mut health = Health {
            kind: "EndpointSlice",
            failing: false,
        };
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Init) => listing = Some(Slices::new()),
                Ok(watcher::Event::InitApply(o)) => {
                    let (k, v) = self.read(o);
                    listing.get_or_insert_with(Slices::new).insert(k, v);
                }
                Ok(watcher::Event::InitDone) => {
                    *self.slices() = listing.take().unwrap_or_default();
                    self.listed.send_replace(true);
                    health.ok();
                    self.signal.raise(None);
                }
                Ok(watcher::Event::Apply(o)) => {
                    let (k, v) = self.read(o);
                    self.slices().insert(k.clone(), v);
                    self.signal.raise(Some(k));
                }
                Ok(watcher::Event::Delete(o)) => {
                    let k = key_of(&o);
                    self.slices().remove(&k);
                    self.signal.raise(Some(k));
                }
                Err(e) => health.failed(&e),
            }
        }
    }
}

/// The resource of `kind` at the first of its versions the API server serves: a version
/// it answers a one-object list for. When none answers (the CRD is not installed, the
/// API is unreachable), the preferred one: its watcher retries with backoff.
async fn served(client: &Client, kind: &Kind) -> ApiResource {
    let at = |v: &str| {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(kind.group, v, kind.kind),
            kind.plural,
        )
    };
    if let [only] = kind.versions {
        return at(only);
    }
    for v in kind.versions {
        let ar = at(v);
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        let one = kube::api::ListParams::default().limit(1);
        match tokio::time::timeout(Duration::from_secs(10), api.list_metadata(&one)).await {
            Ok(Ok(_)) => return ar,
            Ok(Err(kube::Error::Api(e))) if e.code == 404 => continue,
            // Not a "no such version": keep the preferred one and let the watcher retry.
            _ => break,
        }
    }
    at(kind.versions[0])
}

/// Drop what weft never reads before an object is cached.
fn trim(kind: &str, o: &mut DynamicObject) {
    o.metadata.managed_fields = None;
    if let Some(a) = o.metadata.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
    if kind != "Pod" {
        return;
    }
    let keep = |v: &Value, fields: &[&str]| -> Value {
        let mut m = serde_json::Map::new();
        for f in fields {
            if let Some(x) = v.get(*f) {
                m.insert((*f).to_owned(), x.clone());
            }
        }
        Value::Object(m)
    };
    let containers = |v: Option<&Value>| -> Value {
        Value::Array(
            v.and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|c| keep(c, &["name", "ports", "restartPolicy"]))
                .collect(),
        )
    };
    let spec = o.data.get("spec").cloned().unwrap_or(Value::Null);
    let mut s = keep(
        &spec,
        &[
            "nodeName",
            "hostNetwork",
            "serviceAccountName",
            "restartPolicy",
        ],
    );
    s["containers"] = containers(spec.get("containers"));
    s["initContainers"] = containers(spec.get("initContainers"));
    let status = o.data.get("status").cloned().unwrap_or(Value::Null);
    let st = keep(&status, &["phase", "podIP", "podIPs"]);
    o.data = serde_json::json!({"spec": s, "status": st});
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// (group, resource, verb) for every rule of the named Role or ClusterRole.
    fn granted(role_kind: &str, name: &str, file: &str) -> BTreeSet<(String, String, String)> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy")
            .join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        let mut out = BTreeSet::new();
        for doc in serde_norway::Deserializer::from_str(&text) {
            let v: Value = serde::Deserialize::deserialize(doc).unwrap();
            if v["kind"] != role_kind || v["metadata"]["name"] != name {
                continue;
            }
            for rule in v["rules"].as_array().unwrap() {
                let list = |k: &str| -> Vec<String> {
                    rule[k]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_str().unwrap().to_owned())
                        .collect()
                };
                for g in list("apiGroups") {
                    for r in list("resources") {
                        for verb in list("verbs") {
                            out.insert((g.clone(), r.clone(), verb));
                        }
                    }
                }
            }
        }
        assert!(
            !out.is_empty(),
            "no {role_kind} {name} in {}",
            path.display()
        );
        out
    }

    fn grant(g: &str, r: &str, verb: &str) -> (String, String, String) {
        (g.to_owned(), r.to_owned(), verb.to_owned())
    }

    /// What watching `kinds` takes: list and watch (kube-runtime's watcher).
    fn watching<'a>(kinds: impl Iterator<Item = &'a Kind>) -> BTreeSet<(String, String, String)> {
        kinds
            .flat_map(|k| ["list", "watch"].map(|verb| grant(k.group, k.plural, verb)))
            .collect()
    }

    #[test]
    fn rbac_grants_exactly_what_the_agent_uses() {
        let mut used = watching(KINDS.iter());
        // weftctl quarantine annotates the pod (app.rs, quarantine_through_api).
        used.insert(grant("", "pods", "patch"));
        for k in KINDS
            .iter()
            .filter(|k| status::WRITES_STATUS.contains(&k.kind))
        {
            used.insert(grant(k.group, &format!("{}/status", k.plural), "patch"));
        }
        assert_eq!(granted("ClusterRole", "weft-agent", "rbac.yaml"), used);
        // The status writer's Lease: read, made once, renewed (kube's get, create and
        // replace).
        let lease: BTreeSet<_> = ["get", "create", "update"]
            .map(|v| grant("coordination.k8s.io", "leases", v))
            .into();
        assert_eq!(granted("Role", "weft-status-writer", "rbac.yaml"), lease);
    }

    #[test]
    fn rbac_grants_exactly_what_the_ca_uses() {
        let used = watching(KINDS.iter().filter(|k| CA_KINDS.contains(&k.kind)));
        assert_eq!(granted("ClusterRole", "weft-ca", "weft-ca.yaml"), used);
    }
}

//! The node's resolved view of the configuration: services with their endpoints, and the
//! workloads that run on this node. Built whole from a [`Config`] and swapped atomically;
//! the proxy only reads it, the control side only replaces it.

use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, SocketAddrV4},
    sync::{atomic::Ordering, Arc},
};

use hyper::http::uri::Authority;

use crate::{
    config::{
        policy::TrafficPolicy,
        route::{Filter, HttpRoute, Parent, TlsRoute},
        AppProtocol, Config, EndpointSlice, Protocol, Service, ServicePort, TargetPort, Workload,
    },
    identity::SpiffeId,
    proxy::http::plan::{Resolve, RoutePlan},
    traffic::{EndpointStats, Pool, ServiceTraffic, TokenBucket},
};

/// A service address as clients dial it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceAddr {
    pub vip: SocketAddrV4,
    pub protocol: Protocol,
}

#[derive(Debug)]
pub struct ServiceEntry {
    /// `namespace/name`.
    pub name: Arc<str>,
    pub namespace: String,
    pub addr: ServiceAddr,
    pub endpoints: Vec<Endpoint>,
    /// What the port speaks, when declared (skips protocol detection).
    pub app_protocol: Option<AppProtocol>,
    /// The HTTPRoutes and GRPCRoutes of its own namespace attached to this service port
    /// (producer routes, in name order), compiled.
    pub routes: Arc<RoutePlan>,
    /// TLSRoutes of its own namespace attached to this service port, in name order.
    pub tls_routes: Vec<Arc<TlsRoute>>,
    /// Routes of other namespaces attached to it (consumer routes), by namespace: for
    /// that namespace's clients they take the place of the producer routes.
    pub consumers: Vec<Consumer>,
    /// The service's TrafficPolicy, or the defaults.
    pub policy: Arc<TrafficPolicy>,
    /// Pods it selects that are quarantined (not among `endpoints`), `namespace/name`.
    pub quarantined: Vec<Arc<str>>,
    /// What requests to it have run up; kept across reloads.
    pub traffic: Arc<ServiceTraffic>,
}

impl Pool for ServiceEntry {
    fn size(&self) -> usize {
        self.endpoints.len()
    }

    fn stats(&self, i: usize) -> &EndpointStats {
        &self.endpoints[i].stats
    }
}

impl Endpoint {
    /// How telemetry names the workload behind it.
    pub fn peer(&self) -> crate::telemetry::Peer {
        crate::telemetry::Peer {
            pod: Some(self.workload.clone()),
            workload: Some(self.app.clone()),
            identity: self.identity.clone(),
        }
    }
}

/// The routes one namespace attached to another namespace's service port.
#[derive(Clone, Debug)]
pub struct Consumer {
    pub namespace: String,
    pub routes: Arc<RoutePlan>,
    pub tls_routes: Vec<Arc<TlsRoute>>,
}

impl ServiceEntry {
    /// The HTTP routes for a client of `namespace`: its namespace's consumer routes when
    /// it has any (the Gateway API's mesh profile), else the service's own.
    pub fn routes_for(&self, namespace: Option<&str>) -> &Arc<RoutePlan> {
        self.consumer(namespace)
            .map(|c| &c.routes)
            .filter(|r| !r.is_empty())
            .unwrap_or(&self.routes)
    }

    /// The TLSRoutes for a client of `namespace`, likewise.
    pub fn tls_routes_for(&self, namespace: Option<&str>) -> &[Arc<TlsRoute>] {
        self.consumer(namespace)
            .map(|c| &c.tls_routes)
            .filter(|r| !r.is_empty())
            .unwrap_or(&self.tls_routes)
    }

    fn consumer(&self, namespace: Option<&str>) -> Option<&Consumer> {
        let ns = namespace.filter(|ns| *ns != self.namespace)?;
        self.consumers.iter().find(|c| c.namespace == ns)
    }

    /// Up to `n` distinct endpoints to try for one connection: the next one in round-robin
    /// order first, then the ones after it. The cursor moves by one per connection.
    pub fn candidates(&self, n: usize) -> impl Iterator<Item = &Endpoint> {
        let len = self.endpoints.len();
        let start = if len == 0 {
            0
        } else {
            self.traffic.rr.fetch_add(1, Ordering::Relaxed) % len
        };
        (0..n.min(len)).map(move |i| &self.endpoints[(start + i) % len])
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Endpoint {
    pub addr: SocketAddrV4,
    /// `addr` as a URI authority, made once for every request sent to it.
    #[serde(skip)]
    pub authority: Authority,
    /// `namespace/name` of the workload (pod) behind it.
    pub workload: Arc<str>,
    /// Its name in metrics (`telemetry::canonical_name`), shared by the pods of one app.
    pub app: Arc<str>,
    /// Its SPIFFE ID when it is meshed.
    pub identity: Option<Arc<str>>,
    pub node: Arc<str>,
    /// Whether the workload is in the mesh (reached through its node's agent).
    pub meshed: bool,
    /// Latency, load and failures seen by this node; kept across reloads.
    #[serde(flatten)]
    pub stats: Arc<EndpointStats>,
}

impl Endpoint {
    /// An endpoint of a workload weft knows.
    fn of(addr: SocketAddrV4, names: &Names, meshed: bool, stats: Arc<EndpointStats>) -> Self {
        Self {
            addr,
            authority: Authority::try_from(addr.to_string())
                .expect("an IPv4 address and port is an authority"),
            workload: names.pod.clone(),
            app: names.app.clone(),
            identity: names.identity.clone(),
            node: names.node.clone(),
            meshed,
            stats,
        }
    }

    /// Published in an EndpointSlice, and no pod weft knows: outside the mesh, named by
    /// its address and its Service.
    fn outside(
        addr: SocketAddrV4,
        service: &str,
        node: Option<&str>,
        stats: Arc<EndpointStats>,
    ) -> Self {
        Self {
            addr,
            authority: Authority::try_from(addr.to_string())
                .expect("an IPv4 address and port is an authority"),
            workload: Arc::from(addr.ip().to_string()),
            app: Arc::from(service),
            identity: None,
            node: Arc::from(node.unwrap_or_default()),
            meshed: false,
            stats,
        }
    }
}

/// The names of one workload, made once per configuration.
struct Names {
    pod: Arc<str>,
    node: Arc<str>,
    app: Arc<str>,
    identity: Option<Arc<str>>,
}

#[derive(Debug, Default)]
pub struct NodeState {
    pub node: String,
    /// Bumped on every accepted configuration.
    pub generation: u64,
    pub services: BTreeMap<ServiceAddr, Arc<ServiceEntry>>,
    /// Workloads scheduled on this node, by IP.
    pub local: BTreeMap<Ipv4Addr, Workload>,
    /// Every workload of the cluster, by IP (to recognise peers and endpoints).
    pub workloads: Arc<HashMap<Ipv4Addr, Workload>>,
    /// TCP service addresses by namespace, then name (looked up per request without
    /// allocating); shared by the states an EndpointSlice change makes, which move no
    /// address.
    pub by_name: Arc<HashMap<String, HashMap<String, Vec<ServiceAddr>>>>,
    /// Token buckets of route rules' rate limits, by [`Filter::Extension`] `bucket`.
    pub buckets: HashMap<String, Arc<TokenBucket>>,
    /// The mesh's trust domain.
    pub trust_domain: String,
    /// The identity of every meshed workload of the cluster, by IP.
    pub identities: Arc<HashMap<Ipv4Addr, SpiffeId>>,
    /// Every node's address, by name (where its agent's tunnel listens).
    pub node_addresses: HashMap<String, Ipv4Addr>,
    /// The authorization policies selecting each meshed workload (those with any), by IP.
    pub authz: Arc<HashMap<Ipv4Addr, crate::config::authz::Policies>>,
    /// The metrics name of each of those workloads (policy decisions are counted by it).
    pub authz_apps: Arc<HashMap<Ipv4Addr, Arc<str>>>,
}

impl NodeState {
    /// The state for `cfg`; what requests ran up under `prev` (latency, failures,
    /// ejections, budgets, buckets) carries over for services and endpoints still there.
    pub fn build(node: &str, cfg: &Config, generation: u64, prev: Option<&NodeState>) -> Self {
        // Names shared by every endpoint of a workload, and an index of workloads by
        // (namespace, label, value) so a selector visits only the workloads it can match.
        let trust_domain = cfg.trust_domain().to_owned();
        let names: Vec<Names> = {
            // Shared strings: pods of one app share its name, of one account its identity.
            let mut interned: HashMap<String, Arc<str>> = HashMap::new();
            let mut intern = |s: String| {
                interned
                    .entry(s)
                    .or_insert_with_key(|k| Arc::from(k.as_str()))
                    .clone()
            };
            cfg.workloads
                .iter()
                .map(|w| Names {
                    pod: Arc::from(w.id()),
                    node: intern(w.node.clone()),
                    app: intern(crate::telemetry::canonical_name(w)),
                    identity: w
                        .meshed
                        .then(|| {
                            SpiffeId::workload(&trust_domain, &w.namespace, &w.service_account).ok()
                        })
                        .flatten()
                        .map(|id| intern(id.to_string())),
                })
                .collect()
        };
        let mut by_label: HashMap<(&str, &str, &str), Vec<usize>> = HashMap::new();
        for (i, w) in cfg.workloads.iter().enumerate() {
            for (k, v) in &w.labels {
                by_label
                    .entry((w.namespace.as_str(), k.as_str(), v.as_str()))
                    .or_default()
                    .push(i);
            }
        }
        let mut buckets = HashMap::new();
        for r in &cfg.routes {
            for rule in &r.rules {
                for f in &rule.filters {
                    if let Filter::Extension {
                        rate_limit: Some(_),
                        bucket,
                        ..
                    } = f
                    {
                        let b = prev
                            .and_then(|p| p.buckets.get(bucket))
                            .cloned()
                            .unwrap_or_default();
                        buckets.insert(bucket.clone(), b);
                    }
                }
            }
        }
        // Route backends and mirrors resolve to service addresses when compiled.
        let by_id: HashMap<(&str, &str), &Service> = cfg
            .services
            .iter()
            .map(|s| ((s.namespace.as_str(), s.name.as_str()), s))
            .collect();
        let service_addr = |ns: &str, name: &str, port: u16| {
            let s = by_id.get(&(ns, name))?;
            s.ports
                .iter()
                .find(|p| p.port == port && p.protocol == Protocol::Tcp)
                .map(|p| ServiceAddr {
                    vip: SocketAddrV4::new(s.cluster_ip, p.port),
                    protocol: p.protocol,
                })
        };
        let resolve = Resolve {
            service: &service_addr,
            buckets: &buckets,
        };
        // Services with EndpointSlices take their endpoints from them; endpoints are
        // matched to workloads by address.
        let mut slices: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
        for s in &cfg.endpoint_slices {
            slices
                .entry((s.namespace.as_str(), s.service.as_str()))
                .or_default()
                .push(s);
        }
        let by_ip: HashMap<Ipv4Addr, usize> = cfg
            .workloads
            .iter()
            .enumerate()
            .map(|(i, w)| (w.ip, i))
            .collect();
        let mut services = BTreeMap::new();
        let mut by_name: HashMap<String, HashMap<String, Vec<ServiceAddr>>> = HashMap::new();
        // Services without a TrafficPolicy share the defaults.
        let default_policy = Arc::new(TrafficPolicy::default());
        for svc in &cfg.services {
            let selected: Vec<usize> = match svc.selector.iter().next() {
                None => vec![],
                Some((k, v)) => by_label
                    .get(&(svc.namespace.as_str(), k.as_str(), v.as_str()))
                    .map(|c| {
                        c.iter()
                            .copied()
                            .filter(|&i| svc.selects(&cfg.workloads[i]))
                            .collect()
                    })
                    .unwrap_or_default(),
            };
            let policy = cfg
                .policies
                .iter()
                .find(|p| p.namespace == svc.namespace && p.services.contains(&svc.name))
                .map_or_else(|| default_policy.clone(), |p| Arc::new(p.policy.clone()));
            for port in &svc.ports {
                let before = prev.and_then(|p| p.service_in(&svc.namespace, &svc.name, port.port));
                let picked = match slices.get(&(svc.namespace.as_str(), svc.name.as_str())) {
                    Some(sl) => from_slices(sl, port, |ip| by_ip.get(ip).copied()),
                    None => selected
                        .iter()
                        .filter_map(|&i| {
                            let w = &cfg.workloads[i];
                            let target = match &port.target {
                                TargetPort::Number(n) => *n,
                                TargetPort::Name(name) => w.port_named(name)?,
                            };
                            Some((SocketAddrV4::new(w.ip, target), Some(i), None))
                        })
                        .collect(),
                };
                let quarantined = picked
                    .iter()
                    .filter_map(|&(_, i, _)| i)
                    .filter(|&i| cfg.workloads[i].quarantine.is_some())
                    .map(|i| names[i].pod.clone())
                    .collect();
                let endpoints = picked
                    .into_iter()
                    .filter(|&(_, i, _)| i.is_none_or(|i| cfg.workloads[i].quarantine.is_none()))
                    .map(|(addr, i, node)| {
                        let stats = before
                            .and_then(|b| b.endpoints.iter().find(|e| e.addr == addr))
                            .map(|e| e.stats.clone())
                            .unwrap_or_default();
                        match i {
                            Some(i) => {
                                Endpoint::of(addr, &names[i], cfg.workloads[i].meshed, stats)
                            }
                            None => Endpoint::outside(addr, &svc.id(), node, stats),
                        }
                    })
                    .collect();
                let addr = ServiceAddr {
                    vip: SocketAddrV4::new(svc.cluster_ip, port.port),
                    protocol: port.protocol,
                };
                let (own, mut others) = attached(&cfg.routes, svc, port.port);
                let routes = Arc::new(RoutePlan::compile(&own, &resolve));
                let (tls_routes, mut tls_others) = attached(&cfg.tls_routes, svc, port.port);
                let namespaces: std::collections::BTreeSet<String> =
                    others.keys().chain(tls_others.keys()).cloned().collect();
                let consumers = namespaces
                    .into_iter()
                    .map(|ns| Consumer {
                        routes: Arc::new(RoutePlan::compile(
                            &others.remove(&ns).unwrap_or_default(),
                            &resolve,
                        )),
                        tls_routes: tls_others.remove(&ns).unwrap_or_default(),
                        namespace: ns,
                    })
                    .collect();
                let entry = Arc::new(ServiceEntry {
                    name: Arc::from(svc.id()),
                    namespace: svc.namespace.clone(),
                    addr,
                    endpoints,
                    app_protocol: port.app_protocol,
                    routes,
                    tls_routes,
                    consumers,
                    policy: policy.clone(),
                    quarantined,
                    traffic: before.map(|b| b.traffic.clone()).unwrap_or_default(),
                });
                if port.protocol == Protocol::Tcp {
                    by_name
                        .entry(svc.namespace.clone())
                        .or_default()
                        .entry(svc.name.clone())
                        .or_default()
                        .push(addr);
                }
                services.insert(addr, entry);
            }
        }
        let workloads: HashMap<_, _> = cfg.workloads.iter().map(|w| (w.ip, w.clone())).collect();
        let local = cfg
            .workloads
            .iter()
            .filter(|w| w.node == node)
            .map(|w| (w.ip, w.clone()))
            .collect();
        // The loader checked that every workload has a valid identity.
        let identities = cfg
            .workloads
            .iter()
            .filter(|w| w.meshed)
            .filter_map(|w| {
                let id = SpiffeId::workload(&trust_domain, &w.namespace, &w.service_account);
                Some((w.ip, id.ok()?))
            })
            .collect();
        let node_addresses = cfg
            .nodes
            .values()
            .map(|n| (n.name.clone(), n.address))
            .collect();
        let policies: Vec<Arc<crate::config::authz::AuthorizationPolicy>> =
            cfg.authorization.iter().cloned().map(Arc::new).collect();
        let authz: HashMap<Ipv4Addr, crate::config::authz::Policies> = cfg
            .workloads
            .iter()
            .filter(|w| w.meshed)
            .filter_map(|w| {
                let selecting: Vec<_> = policies.iter().filter(|p| p.selects(w)).cloned().collect();
                (!selecting.is_empty()).then_some((w.ip, crate::config::authz::Policies(selecting)))
            })
            .collect();
        let authz_apps = cfg
            .workloads
            .iter()
            .filter(|w| authz.contains_key(&w.ip))
            .map(|w| (w.ip, Arc::from(crate::telemetry::canonical_name(w))))
            .collect();
        Self {
            node: node.to_owned(),
            generation,
            services,
            by_name: Arc::new(by_name),
            local,
            workloads: Arc::new(workloads),
            buckets,
            trust_domain,
            identities: Arc::new(identities),
            node_addresses,
            authz: Arc::new(authz),
            authz_apps: Arc::new(authz_apps),
        }
    }

    /// This state with the endpoints of the `changed` services (namespace, name) taken
    /// again from `cfg`'s EndpointSlices, everything else shared: what one EndpointSlice
    /// change costs, in proportion to the services it touches. The service addresses
    /// rebuilt are returned for the maps; `None` when a changed service takes its
    /// endpoints from a selector (no slices), which needs [`NodeState::build`].
    pub fn with_slices_of(
        &self,
        cfg: &Config,
        changed: &std::collections::HashSet<(String, String)>,
        generation: u64,
    ) -> Option<(Self, Vec<ServiceAddr>)> {
        let is_changed = |ns: &str, name: &str| changed.iter().any(|(n, m)| n == ns && m == name);
        let mut slices: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
        for s in &cfg.endpoint_slices {
            if is_changed(&s.namespace, &s.service) {
                slices
                    .entry((s.namespace.as_str(), s.service.as_str()))
                    .or_default()
                    .push(s);
            }
        }
        let mut services = self.services.clone();
        let mut touched = Vec::new();
        for svc in cfg
            .services
            .iter()
            .filter(|s| is_changed(&s.namespace, &s.name))
        {
            let sl = slices.get(&(svc.namespace.as_str(), svc.name.as_str()))?;
            for port in &svc.ports {
                let addr = ServiceAddr {
                    vip: SocketAddrV4::new(svc.cluster_ip, port.port),
                    protocol: port.protocol,
                };
                let Some(before) = self.services.get(&addr) else {
                    continue;
                };
                let picked = from_slices(sl, port, |ip| self.workloads.get(ip));
                let mut quarantined = Vec::new();
                let mut endpoints = Vec::new();
                for (addr, w, node) in picked {
                    if let Some(w) = w.filter(|w| w.quarantine.is_some()) {
                        quarantined.push(Arc::from(w.id()));
                        continue;
                    }
                    let stats = before
                        .endpoints
                        .iter()
                        .find(|e| e.addr == addr)
                        .map(|e| e.stats.clone())
                        .unwrap_or_default();
                    endpoints.push(match w {
                        Some(w) => {
                            let names = Names {
                                pod: Arc::from(w.id()),
                                node: Arc::from(w.node.as_str()),
                                app: Arc::from(crate::telemetry::canonical_name(w)),
                                identity: self
                                    .identities
                                    .get(addr.ip())
                                    .map(|i| Arc::from(i.to_string())),
                            };
                            Endpoint::of(addr, &names, w.meshed, stats)
                        }
                        None => Endpoint::outside(addr, &svc.id(), node, stats),
                    });
                }
                let entry = Arc::new(ServiceEntry {
                    name: before.name.clone(),
                    namespace: before.namespace.clone(),
                    addr,
                    endpoints,
                    app_protocol: before.app_protocol,
                    routes: before.routes.clone(),
                    tls_routes: before.tls_routes.clone(),
                    consumers: before.consumers.clone(),
                    policy: before.policy.clone(),
                    quarantined,
                    traffic: before.traffic.clone(),
                });
                services.insert(addr, entry);
                touched.push(addr);
            }
        }
        Some((
            Self {
                node: self.node.clone(),
                generation,
                services,
                by_name: self.by_name.clone(),
                local: self.local.clone(),
                workloads: self.workloads.clone(),
                buckets: self.buckets.clone(),
                trust_domain: self.trust_domain.clone(),
                identities: self.identities.clone(),
                node_addresses: self.node_addresses.clone(),
                authz: self.authz.clone(),
                authz_apps: self.authz_apps.clone(),
            },
            touched,
        ))
    }

    /// The authorization decision for a connection or request to the meshed workload at
    /// `dst` (allowed when no policy selects it, or it is not meshed).
    pub fn authorize(
        &self,
        dst: Ipv4Addr,
        req: &crate::config::authz::Request<'_>,
    ) -> crate::config::authz::Decision {
        self.authz
            .get(&dst)
            .map(|p| p.decide(req))
            .unwrap_or_default()
    }

    /// How telemetry names the workload at `ip` (nothing known when it is not a workload).
    pub fn peer(&self, ip: Ipv4Addr) -> crate::telemetry::Peer {
        let Some(w) = self.workloads.get(&ip) else {
            return crate::telemetry::Peer::default();
        };
        crate::telemetry::Peer {
            pod: Some(Arc::from(w.id())),
            workload: Some(Arc::from(crate::telemetry::canonical_name(w))),
            identity: self.identities.get(&ip).map(|i| Arc::from(i.to_string())),
        }
    }

    /// The namespace of the workload at `ip`, when weft knows it.
    pub fn namespace_of(&self, ip: Ipv4Addr) -> Option<&str> {
        self.workloads.get(&ip).map(|w| w.namespace.as_str())
    }

    /// This node's own address, when it is declared.
    pub fn own_address(&self) -> Option<Ipv4Addr> {
        self.node_addresses.get(&self.node).copied()
    }

    /// The identities of this node's meshed workloads: what its agent holds certificates
    /// for.
    pub fn local_identities(&self) -> std::collections::BTreeSet<SpiffeId> {
        self.local
            .keys()
            .filter_map(|ip| self.identities.get(ip).cloned())
            .collect()
    }

    /// Where a meshed workload of another node is reached: its identity and its node's
    /// address.
    pub fn tunnel_to(&self, ip: Ipv4Addr) -> Option<(&SpiffeId, Ipv4Addr)> {
        let w = self.workloads.get(&ip)?;
        Some((
            self.identities.get(&ip)?,
            *self.node_addresses.get(&w.node)?,
        ))
    }

    /// A TCP service port by namespace, name and port (route backends).
    pub fn service_in(&self, namespace: &str, name: &str, port: u16) -> Option<&Arc<ServiceEntry>> {
        let addr = self
            .by_name
            .get(namespace)?
            .get(name)?
            .iter()
            .find(|a| a.vip.port() == port)?;
        self.services.get(addr)
    }

    /// `NAME.NAMESPACE[.svc[.cluster.local]]:PORT` as one of that Service's endpoints, when
    /// this node knows the Service and it has one. How the agent reaches the CA in a
    /// cluster: its own network is the host's, where neither cluster DNS nor service
    /// addresses are served.
    pub fn endpoint_for(&self, addr: &str) -> Option<std::net::SocketAddr> {
        let (host, port) = addr.rsplit_once(':')?;
        let port: u16 = port.parse().ok()?;
        let host = host.strip_suffix(".cluster.local").unwrap_or(host);
        let host = host.strip_suffix(".svc").unwrap_or(host);
        let (name, namespace) = host.split_once('.')?;
        if namespace.contains('.') {
            return None;
        }
        let e = self
            .service_in(namespace, name, port)?
            .candidates(1)
            .next()?;
        Some(std::net::SocketAddr::V4(e.addr))
    }

    pub fn service(&self, vip: SocketAddrV4, protocol: Protocol) -> Option<&Arc<ServiceEntry>> {
        self.services.get(&ServiceAddr { vip, protocol })
    }
}

/// An endpoint picked for a service port: its address, the workload behind it when weft
/// knows it (as the caller finds workloads by address), and its node.
type Picked<'a, W> = (SocketAddrV4, Option<W>, Option<&'a str>);

/// The endpoints of `port` that its Service's EndpointSlices publish: the ready ones, or
/// when none is, those still serving while they terminate (as kube-proxy does). Each
/// address once, in the slices' order.
fn from_slices<'a, W>(
    slices: &[&'a EndpointSlice],
    port: &ServicePort,
    workload: impl Fn(&Ipv4Addr) -> Option<W>,
) -> Vec<Picked<'a, W>> {
    let pick = |want: &dyn Fn(&crate::config::SliceEndpoint) -> bool| {
        let mut out: Vec<Picked<'a, W>> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for s in slices {
            let Some(sp) = s
                .ports
                .iter()
                .find(|p| p.name == port.name && p.protocol == port.protocol)
            else {
                continue;
            };
            for e in s.endpoints.iter().filter(|e| want(e)) {
                let addr = SocketAddrV4::new(e.ip, sp.port);
                if seen.insert(addr) {
                    out.push((addr, workload(&e.ip), e.node.as_deref()));
                }
            }
        }
        out
    };
    let ready = pick(&|e| e.ready);
    if ready.is_empty() {
        pick(&|e| e.serving && e.terminating)
    } else {
        ready
    }
}

/// A route kind that attaches to Services through `parentRefs`.
trait Attaches: Clone {
    fn name(&self) -> &str;
    fn namespace(&self) -> &str;
    fn parents(&self) -> &[Parent];
}

impl Attaches for HttpRoute {
    fn name(&self) -> &str {
        &self.name
    }
    fn namespace(&self) -> &str {
        &self.namespace
    }
    fn parents(&self) -> &[Parent] {
        &self.parents
    }
}

impl Attaches for TlsRoute {
    fn name(&self) -> &str {
        &self.name
    }
    fn namespace(&self) -> &str {
        &self.namespace
    }
    fn parents(&self) -> &[Parent] {
        &self.parents
    }
}

/// The routes attached to `port` of `svc` (a parent without a port takes every port), in
/// name order: those of the Service's own namespace, and those of others by namespace.
type Attached<R> = (Vec<Arc<R>>, BTreeMap<String, Vec<Arc<R>>>);

fn attached<R: Attaches>(routes: &[R], svc: &Service, port: u16) -> Attached<R> {
    let mut by_namespace: BTreeMap<String, Vec<Arc<R>>> = BTreeMap::new();
    for r in routes.iter().filter(|r| {
        r.parents().iter().any(|p| {
            p.namespace == svc.namespace
                && p.service == svc.name
                && p.port.is_none_or(|p| p == port)
        })
    }) {
        by_namespace
            .entry(r.namespace().to_owned())
            .or_default()
            .push(Arc::new(r.clone()));
    }
    for rs in by_namespace.values_mut() {
        rs.sort_by(|a, b| a.name().cmp(b.name()));
    }
    let own = by_namespace.remove(&svc.namespace).unwrap_or_default();
    (own, by_namespace)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load_str;
    use std::path::Path;

    const DOCS: &str = r#"
apiVersion: weft.dev/v1alpha1
kind: Node
metadata: {name: a}
spec: {address: 192.168.50.1}
---
apiVersion: weft.dev/v1alpha1
kind: Node
metadata: {name: b}
spec: {address: 192.168.50.2}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {name: web-1, labels: {app: web}}
spec: {node: a, ip: 10.1.1.2, ports: [{name: http, port: 8080}]}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {name: web-2, labels: {app: web}}
spec: {node: b, ip: 10.1.2.2, ports: [{name: http, port: 9090}]}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{port: 80, targetPort: http}]
"#;

    #[test]
    fn named_target_ports_resolve_per_workload() {
        let cfg = load_str(Path::new("t.yaml"), DOCS).unwrap();
        let st = NodeState::build("a", &cfg, 1, None);
        let svc = st
            .service("10.96.0.10:80".parse().unwrap(), Protocol::Tcp)
            .unwrap();
        let addrs: Vec<_> = svc.endpoints.iter().map(|e| e.addr.to_string()).collect();
        assert_eq!(addrs, ["10.1.1.2:8080", "10.1.2.2:9090"]);
        assert_eq!(st.local.len(), 1);
        assert_eq!(st.workloads.len(), 2);
    }

    #[test]
    fn an_endpoint_slice_change_rebuilds_its_service_as_a_full_build_would() {
        let slice = |eps: &str| {
            format!("{DOCS}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-x, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{eps}]\n")
        };
        let before = load_str(Path::new("t.yaml"), &slice("{addresses: [10.1.1.2]}")).unwrap();
        let after = load_str(
            Path::new("t.yaml"),
            &slice("{addresses: [10.1.1.2]}, {addresses: [10.1.2.2]}"),
        )
        .unwrap();
        let st = NodeState::build("a", &before, 1, None);
        let vip = "10.96.0.10:80".parse().unwrap();
        let changed = [("default".to_owned(), "web".to_owned())].into();
        let (next, touched) = st.with_slices_of(&after, &changed, 2).unwrap();
        assert_eq!(touched.len(), 1);
        let full = NodeState::build("a", &after, 2, Some(&st));
        let eps = |s: &NodeState| {
            s.service(vip, Protocol::Tcp)
                .unwrap()
                .endpoints
                .iter()
                .map(|e| {
                    (
                        e.addr,
                        e.workload.to_string(),
                        e.identity.clone(),
                        e.node.to_string(),
                    )
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(eps(&next), eps(&full));
        assert_eq!(eps(&next).len(), 2);
        // Lookups by name see the new entry; what requests ran up is kept.
        assert!(Arc::ptr_eq(
            next.service_in("default", "web", 80).unwrap(),
            next.service(vip, Protocol::Tcp).unwrap()
        ));
        assert!(Arc::ptr_eq(
            &next.service(vip, Protocol::Tcp).unwrap().traffic,
            &st.service(vip, Protocol::Tcp).unwrap().traffic
        ));
        // A service without slices needs the full build.
        let none = load_str(Path::new("t.yaml"), DOCS).unwrap();
        assert!(st.with_slices_of(&none, &changed, 3).is_none());
    }

    #[test]
    fn a_service_name_resolves_to_an_endpoint() {
        let cfg = load_str(Path::new("t.yaml"), DOCS).unwrap();
        let st = NodeState::build("a", &cfg, 1, None);
        for name in [
            "web.default:80",
            "web.default.svc:80",
            "web.default.svc.cluster.local:80",
        ] {
            let got = st.endpoint_for(name).map(|a| a.to_string());
            assert!(
                matches!(got.as_deref(), Some("10.1.1.2:8080" | "10.1.2.2:9090")),
                "{name}: {got:?}"
            );
        }
        assert_eq!(st.endpoint_for("web.default:81"), None, "no such port");
        assert_eq!(
            st.endpoint_for("10.96.0.10:80"),
            None,
            "addresses are left alone"
        );
        assert_eq!(st.endpoint_for("ca.example.com:15012"), None);
    }

    #[test]
    fn round_robin_visits_every_endpoint_and_falls_back_in_order() {
        let cfg = load_str(Path::new("t.yaml"), DOCS).unwrap();
        let st = NodeState::build("a", &cfg, 1, None);
        let svc = st
            .service("10.96.0.10:80".parse().unwrap(), Protocol::Tcp)
            .unwrap();
        let nodes = |n| svc.candidates(n).map(|e| &*e.node).collect::<Vec<_>>();
        assert_eq!(nodes(3), ["a", "b"], "at most every endpoint once");
        assert_eq!(
            nodes(3),
            ["b", "a"],
            "the next connection starts one further"
        );
        assert_eq!(nodes(1), ["a"]);
        assert_eq!(nodes(1), ["b"]);
    }
}

//! The composition root: checks, configuration, datapath, pods, proxies, admin API, reload
//! and shutdown, wired in that order. Nothing else in the agent starts tasks of its own.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::AsRawFd,
    path::PathBuf,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use arc_swap::ArcSwap;
use tokio::{
    net::UnixListener,
    signal::unix::{signal, SignalKind},
    sync::{mpsc, Mutex},
};
use weft_common::TUNNEL_PORT;

use crate::{
    admin::{self, AdminState, Status},
    config::{self, Config},
    datapath::{preflight, Datapath, DatapathOptions},
    enroll::{self, Enrolled},
    handoff::{self, Inherited},
    identity::{
        certs::{Identities, Source},
        client::CaClient,
        SpiffeId,
    },
    netns::HostNetns,
    proxy::{
        conn::{Drain, Pod},
        tunnel::server::TunnelServer,
        ProxyConfig, ProxyInputs,
    },
    state::NodeState,
    telemetry::access_log::AccessLog,
};
use config::quarantine::{Overrides, SetBy};

/// Where the configuration comes from.
#[derive(Clone, Debug)]
pub enum ConfigSource {
    /// A YAML file or a directory of them, polled for changes.
    Files(PathBuf),
    /// The Kubernetes API, watched; `namespace` holds the status writer's Lease.
    Kubernetes {
        kubeconfig: Option<PathBuf>,
        namespace: String,
    },
}

impl std::fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Files(p) => write!(f, "{}", p.display()),
            Self::Kubernetes {
                kubeconfig: None, ..
            } => write!(f, "the Kubernetes API"),
            Self::Kubernetes {
                kubeconfig: Some(k),
                ..
            } => write!(f, "the Kubernetes API ({})", k.display()),
        }
    }
}

/// The configuration source, opened.
enum Feed {
    Files(PathBuf),
    #[cfg(feature = "kubernetes")]
    Kubernetes(crate::k8s::Cluster, crate::k8s::status::StatusWriter),
}

impl Feed {
    async fn open(opts: &AgentOptions) -> anyhow::Result<Self> {
        match &opts.config {
            ConfigSource::Files(p) => Ok(Self::Files(p.clone())),
            #[cfg(not(feature = "kubernetes"))]
            ConfigSource::Kubernetes { .. } => {
                anyhow::bail!("this weft-agent was built without the kubernetes feature")
            }
            #[cfg(feature = "kubernetes")]
            ConfigSource::Kubernetes {
                kubeconfig,
                namespace,
            } => {
                let client = crate::k8s::client(kubeconfig.as_deref()).await?;
                let cluster = crate::k8s::Cluster::watch(&client).await;
                let writer = crate::k8s::status::StatusWriter::start(
                    client.clone(),
                    cluster.caches(),
                    opts.node.clone(),
                    namespace.clone(),
                );
                // Nothing can be served before the cluster is known: wait, saying why.
                loop {
                    match cluster.synced(Duration::from_secs(10)).await {
                        Ok(()) => break,
                        Err(missing) => tracing::warn!(
                            kinds = %missing.join(", "),
                            "still waiting for the first list from the Kubernetes API"
                        ),
                    }
                }
                Ok(Self::Kubernetes(cluster, writer))
            }
        }
    }

    /// The configuration `loaded` was applied: what it made of each object goes into the
    /// objects' status (Kubernetes; files have `weftctl status`).
    #[cfg_attr(not(feature = "kubernetes"), expect(unused_variables))]
    fn applied(&self, loaded: &config::Loaded) {
        match self {
            Self::Files(_) => {}
            #[cfg(feature = "kubernetes")]
            Self::Kubernetes(_, writer) => writer.publish(loaded),
        }
    }

    /// Everything the source holds now, accepted object by object against `prev`.
    fn load(&self, prev: Option<&Config>) -> Result<config::Loaded, config::ConfigError> {
        match self {
            Self::Files(p) => config::load_objects([config::Source::Path(p)], prev),
            #[cfg(feature = "kubernetes")]
            Self::Kubernetes(c, _) => Ok(config::from_api(
                c.objects(),
                c.slices().iter().map(|s| &**s),
                prev,
            )),
        }
    }

    /// Resolves when the source says it changed (never for files: they are polled).
    async fn changed(&self) {
        match self {
            Self::Files(_) => std::future::pending().await,
            #[cfg(feature = "kubernetes")]
            Self::Kubernetes(c, _) => c.changed().notified().await,
        }
    }

    /// A value that moves when the files change (`None` for the API: it says so itself).
    fn fingerprint(&self) -> Option<u64> {
        match self {
            Self::Files(p) => config::watch::fingerprint(p),
            #[cfg(feature = "kubernetes")]
            Self::Kubernetes(..) => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub node: String,
    pub config: ConfigSource,
    /// Where `weft-cni` records the pods it sets up (their network namespaces).
    pub cni_dir: Option<PathBuf>,
    /// The pods' cgroup v2 directory: absolute, or relative to the cgroup2 mount.
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
    pub run_dir: PathBuf,
    pub btf: PathBuf,
    pub accelerate: bool,
    pub reload_interval: Duration,
    /// After SIGTERM, how long to keep serving while waiting for a successor to take over.
    pub handoff_wait: Duration,
    /// How long open connections may take to finish once accepting stopped.
    pub drain_timeout: Duration,
    /// Timeouts and limits of the proxy.
    pub proxy: ProxyConfig,
    /// Sizes of the service maps when they are created.
    pub capacity: crate::datapath::services::Capacity,
    /// `--max-connections` was not given: at most what the open-file limit allows.
    pub max_connections_from_open_files: bool,
    /// Where workload certificates come from.
    pub identity: IdentitySource,
    /// How long to wait at start for the first certificates before serving without them.
    pub identity_wait: Duration,
    /// The Prometheus scrape port, if any.
    pub metrics_address: Option<std::net::SocketAddr>,
    /// Where access log lines go, if anywhere.
    pub access_log: Option<crate::telemetry::access_log::Target>,
    /// The share of successful requests logged.
    pub access_log_sample: f64,
    /// Whether requests and connections are recorded (metrics, access log, tap).
    pub request_telemetry: bool,
    /// The log filter, changeable through the admin API.
    pub log_level: admin::LogLevel,
    /// Where spans go, if anywhere.
    pub trace: Option<crate::telemetry::trace::TraceOptions>,
    /// When the pre-fault detector speaks up (and whether it quarantines).
    pub prefault: crate::telemetry::prefault::Thresholds,
}

/// Where the agent gets its workloads' certificates (flags of `weft-agent run`).
#[derive(Clone, Debug)]
pub enum IdentitySource {
    /// None: connections to other nodes fail (single-node use only).
    None,
    /// A `weft-ca` at `address`, asked with the node's credentials; peers are checked
    /// against `bundle`.
    Ca {
        address: String,
        node_cert: PathBuf,
        node_key: PathBuf,
        bundle: PathBuf,
    },
    /// A CA directory the agent signs with itself (development, the demo).
    Local { dir: PathBuf, ttl: Duration },
    /// Certificates kept current by someone else, in `<dir>/<namespace>/<account>/`.
    Files { dir: PathBuf },
}

pub async fn run(opts: AgentOptions) -> anyhow::Result<()> {
    let started = Instant::now();

    // 1. Privileges and kernel features, before anything is touched; as many open files
    //    as the system allows.
    let mounts = preflight::check(&opts.bpffs, &opts.btf)?;
    let (open_files_at_start, open_files) = raise_open_files();
    let mut proxy_config = opts.proxy;
    let limits = &mut proxy_config.limits;
    // Two descriptors per connection, and room for the agent's own (maps, programs,
    // listeners, namespaces).
    let reserve = (open_files / 2).min(1024);
    let affordable = u32::try_from((open_files - reserve) / 2).unwrap_or(u32::MAX);
    if open_files == 0 {
        // The limit could not be read: keep the connection limit as it was set.
    } else if opts.max_connections_from_open_files {
        limits.per_node = limits.per_node.min(affordable.max(1));
    } else if limits.per_node > affordable {
        tracing::warn!(open_files, max_connections = limits.per_node, "the open-file limit is below what --max-connections needs (two descriptors per connection): accepting will fail, and back off, before the connection limit is reached");
    }
    let limits = *limits;

    // 2. Configuration, parsed and validated before anything binds, with the quarantines
    //    set at run time on this node (kept in the run directory).
    let mut overrides = Overrides::load(opts.run_dir.join("quarantine.json"));
    let feed = Feed::open(&opts).await?;
    // The CNI plugin's notices, listened for before the first read of its records so no
    // pod set up meanwhile waits for the next change.
    let cni_changed = Arc::new(tokio::sync::Notify::new());
    if let Some(dir) = &opts.cni_dir {
        crate::cni::serve(dir, cni_changed.clone()).with_context(|| {
            format!(
                "listening for the CNI plugin in {} (--cni-state-dir)",
                dir.display()
            )
        })?;
    }
    let (cfg, mut accepted) = load_config(&feed, &opts, &overrides, None)
        .context("the initial configuration is invalid")?;
    feed.applied(&accepted);
    if !cfg.nodes.contains_key(&opts.node) {
        bail!(
            "--node {:?} is not declared as a Node in {}",
            opts.node,
            opts.config
        );
    }

    // 3. The cgroup the pods live under; the agent itself must be outside it.
    let cgroup = if opts.cgroup.is_absolute() {
        opts.cgroup.clone()
    } else {
        mounts.cgroup2.join(&opts.cgroup)
    };
    check_own_cgroup(&mounts.cgroup2, &cgroup)?;

    // 4. The datapath: load, adopt or attach, pinned under bpffs. Nothing is written to
    //    the maps yet: a running predecessor still owns them.
    let (mut dp, capture) = Datapath::start(&DatapathOptions {
        node: opts.node.clone(),
        cgroup: cgroup.clone(),
        bpffs: mounts.bpffs.clone(),
        accelerate: opts.accelerate,
        capacity: opts.capacity,
    })?;
    let state = Arc::new(ArcSwap::from_pointee(NodeState::build(
        &opts.node, &cfg, 1, None,
    )));
    // What parsing the first configuration took goes back to the system.
    release_parser_memory();

    // 4b. Certificates for this node's workloads, before anything is served.
    let identities = Arc::new(identities(&opts, cfg.trust_domain(), &state)?);
    identities.want(state.load().local_identities());
    wait_for_certificates(&identities, opts.identity_wait).await;

    // 5. Listeners from a predecessor, if one is running (graceful restart). Once it has
    //    handed them over it writes nothing more, so from here this agent is the maps'
    //    only writer.
    crate::peer::private_dir(&opts.run_dir)
        .with_context(|| format!("creating {} (mode 0700)", opts.run_dir.display()))?;
    let handoff_path = opts.run_dir.join("handoff.sock");
    let mut inherited =
        handoff::receive(&handoff_path).context("taking over listeners from the running agent")?;
    let inherited_count = inherited.len();
    if inherited_count > 0 {
        tracing::info!(
            listeners = inherited_count,
            "took over the listeners of the previous agent"
        );
    }

    // 6. The maps: take them over, report what happened while no agent ran, write the
    //    services.
    dp.take_ownership()?;
    let while_down = report_while_down(&mut dp);
    tracing::info!(cgroup = %cgroup.display(), pins = %dp.pin_root().display(), attachment = ?dp.attachment, "datapath ready");

    // 7. Proxy inputs, and every meshed pod of this node enrolled; then the services.
    //    In this order a fresh attachment (an upgrade that changed the pin layout) knows
    //    every meshed pod before its connect4 sees any service, and the other version's
    //    programs are removed only after both.
    let (drain_trigger, drain) = Drain::new();
    let mut inputs = ProxyInputs::new(
        state.clone(),
        Arc::new(capture),
        proxy_config,
        drain,
        identities.store.clone(),
    );
    inputs.node_addrs = Arc::new(own_addresses());
    let log = match &opts.access_log {
        Some(target) => Some(
            AccessLog::start(target, opts.access_log_sample, inputs.metrics.clone())
                .with_context(|| format!("opening the access log {target:?}"))?,
        ),
        None => None,
    };
    let tracing = match &opts.trace {
        Some(t) => Some(crate::telemetry::trace::Tracing::start(t).map_err(anyhow::Error::msg)?),
        None => None,
    };
    inputs = inputs.with_telemetry(opts.request_telemetry, log, tracing);
    let metrics = inputs.metrics.clone();
    tokio::spawn(identities.clone().run());
    let host = HostNetns::current().context("opening the agent's own network namespace")?;
    // The node's tunnel listener (mTLS from peer agents), taken over or bound.
    let host_cookie =
        crate::netns::own_netns_cookie().context("reading the agent's netns cookie")?;
    let address = cfg.nodes[&opts.node].address;
    let tunnel_listener = match inherited.take(host_cookie, handoff::ListenerKind::Tunnel) {
        Some(l) => l,
        None => crate::netns::listen(SocketAddrV4::new(address, TUNNEL_PORT), 4096).with_context(|| {
            format!("binding the tunnel listener on {address}:{TUNNEL_PORT} (the address of Node {}: is it an address of this host?)", opts.node)
        })?,
    };
    let tunnel_fd: std::os::fd::OwnedFd = tunnel_listener
        .try_clone()
        .context("duplicating the tunnel listener")?
        .into();
    tokio::spawn(
        TunnelServer::new(
            tokio::net::TcpListener::from_std(tunnel_listener)
                .context("registering the tunnel listener")?,
            inputs.clone(),
        )
        .run(),
    );
    let mut pods = Pods {
        enrolled: HashMap::new(),
        failed: HashMap::new(),
        host,
        inputs: inputs.clone(),
    };
    pods.reconcile(&mut dp, &state.load(), &mut inherited);
    dp.remove_leftovers(&state.load().local.keys().copied().collect());
    dp.sync_services(&state.load())
        .context("writing the service maps")?;
    dp.remove_other_versions();

    let status = Arc::new(ArcSwap::from_pointee(Status {
        ready: true,
        pid: std::process::id(),
        node: opts.node.clone(),
        config_generation: 1,
        attachment: Some(dp.attachment),
        foreign_programs: dp.foreign.clone(),
        startup_ms: Some(started.elapsed().as_millis() as u64),
        inherited_listeners: inherited_count,
        enrolled: pods.names(),
        while_agent_down: while_down,
        limits: admin::Limits {
            open_files,
            open_files_at_start,
            max_connections: limits.per_node,
            max_connections_per_pod: limits.per_pod,
        },
        config_source: opts.config.to_string(),
        rejected: accepted.rejected.clone(),
        ..Status::default()
    }));
    tracing::info!(
        ms = started.elapsed().as_millis() as u64,
        pods = pods.enrolled.len(),
        "capturing"
    );
    let datapath = Arc::new(Mutex::new(dp));

    // 8. Admin API, the scrape port, and the handoff socket for a successor.
    let (control_tx, mut control_rx) = mpsc::channel(8);
    tokio::spawn(crate::telemetry::window::run(
        state.clone(),
        inputs.telemetry.windows.clone(),
    ));
    tokio::spawn(crate::telemetry::prefault::run(
        state.clone(),
        inputs.telemetry.clone(),
        control_tx.clone(),
        opts.prefault,
    ));
    let admin_state = AdminState {
        log_level: opts.log_level.clone(),
        control: control_tx,
        status: status.clone(),
        state: state.clone(),
        metrics: metrics.clone(),
        telemetry: inputs.telemetry.clone(),
        datapath: datapath.clone(),
        identities: identities.clone(),
        tunnels: inputs.tunnels.clone(),
        conns: inputs.conns.clone(),
        pods: inputs.pods.clone(),
    };
    if let Some(addr) = opts.metrics_address {
        // SO_REUSEPORT: during a handoff both agents hold the port until the old one exits.
        let listener = crate::netns::listen_addr(addr, 128)
            .with_context(|| format!("binding the metrics address {addr} (--metrics-address)"))?;
        tokio::spawn(admin::serve(
            tokio::net::TcpListener::from_std(listener)
                .context("registering the metrics listener")?,
            admin_state.clone(),
            admin::Scope::Metrics,
            opts.proxy.timeouts.header_read,
        ));
    }
    let admin_path = opts.run_dir.join("admin.sock");
    let admin_listener =
        admin::bind(&admin_path).with_context(|| format!("binding {}", admin_path.display()))?;
    tokio::spawn(admin::serve(
        admin_listener,
        admin_state,
        admin::Scope::Full,
        opts.proxy.timeouts.header_read,
    ));
    let (successor_tx, mut successor_rx) = mpsc::channel(1);
    let _ = std::fs::remove_file(&handoff_path);
    let handoff_listener = UnixListener::bind(&handoff_path)
        .with_context(|| format!("binding {}", handoff_path.display()))?;
    let handoff_errors = metrics.clone();
    tokio::spawn(async move {
        let mut backoff = crate::proxy::listener::Backoff::new(&handoff_errors.accept_errors);
        loop {
            match handoff_listener.accept().await {
                Ok((s, _)) => {
                    backoff.succeeded();
                    if successor_tx.send(s).await.is_err() {
                        break;
                    }
                }
                Err(e) => backoff.failed(&e, "the handoff socket").await,
            }
        }
    });

    // 9. Reload on change; on SIGTERM or a successor, hand over and drain.
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(opts.reload_interval);
    let mut fingerprint = feed.fingerprint();
    // Set when the Kubernetes API or the CNI plugin reported a change; applied on the next tick, which
    // comes at once (changes arriving together are applied together).
    let mut notified = false;
    let mut generation = 1;
    let mut terminating: Option<tokio::time::Instant> = None;
    loop {
        let handoff_deadline = terminating.map(|t| t + opts.handoff_wait);
        tokio::select! {
            _ = tick.tick() => {
                // Unreadable for now (out of descriptors, say): look again next tick.
                let fp = feed.fingerprint().or(fingerprint);
                let changed = fp != fingerprint || std::mem::take(&mut notified);
                fingerprint = fp;
                let mut dp = datapath.lock().await;
                if dp.is_dirty() {
                    // A sync that failed and could not be rolled back: until it succeeds the
                    // maps may disagree with the proxy's state.
                    match dp.sync_services(&state.load()) {
                        Ok(()) => tracing::info!("the service maps agree with the configuration again"),
                        Err(e) => tracing::error!(error = %e, "the service maps still disagree with the configuration; retrying"),
                    }
                }
                // Kubernetes: when only EndpointSlices changed, only their services are
                // rebuilt and written (anything else reads the whole cluster again).
                let slices_only = match &feed {
                    #[cfg(feature = "kubernetes")]
                    Feed::Kubernetes(cluster, _) if changed => {
                        let ch = cluster.take_changes();
                        !ch.everything && !ch.slices.is_empty() && tokio::task::block_in_place(|| {
                            slices_changed(cluster, &ch.slices, &mut accepted, &state, &mut dp, generation + 1)
                        })
                    }
                    _ => false,
                };
                if slices_only {
                    generation += 1;
                    status.rcu(|s| Status { config_generation: generation, ..(**s).clone() });
                } else if changed {
                    match load_config(&feed, &opts, &overrides, Some(&accepted)).map_err(anyhow::Error::from).and_then(|(cfg, loaded)| apply(&opts, &cfg, generation + 1, &state, &mut dp).map(|()| loaded)) {
                        Ok(loaded) => {
                            generation += 1;
                            identities.want(state.load().local_identities());
                            let rejected = loaded.rejected.clone();
                            feed.applied(&loaded);
                            accepted = loaded;
                            status.rcu(|s| Status { config_generation: generation, last_config_error: None, rejected: rejected.clone(), ..(**s).clone() });
                            tracing::info!(generation, "configuration reloaded");
                            release_parser_memory();
                        }
                        Err(e) => {
                            tracing::error!(error = %format!("{e:#}"), "configuration change refused; the last good configuration stays in force");
                            status.rcu(|s| Status { last_config_error: Some(format!("{e:#}")), config_reload_errors: s.config_reload_errors + 1, ..(**s).clone() });
                        }
                    }
                }
                inputs.tunnels.pool.sweep(opts.proxy.timeouts.idle);
                // Also retries pods whose enrolment failed (e.g. netns not there yet).
                tokio::task::block_in_place(|| pods.reconcile(&mut dp, &state.load(), &mut Inherited::default()));
                let names = pods.names();
                if names != status.load().enrolled {
                    status.rcu(|s| Status { enrolled: names.clone(), ..(**s).clone() });
                }
            }
            () = feed.changed() => {
                notified = true;
                // Let the rest of a burst of events land in the caches first.
                tokio::time::sleep(Duration::from_millis(1)).await;
                tick.reset_immediately();
            }
            () = cni_changed.notified() => {
                // A pod set up or torn down on this node: its record is in the directory.
                notified = true;
                tick.reset_immediately();
            }
            Some(cmd) = control_rx.recv() => {
                // In a cluster a quarantine is the pod's annotation, for every node: the
                // API carries it, and the watch brings it back here like any change.
                #[cfg(feature = "kubernetes")]
                if let Feed::Kubernetes(cluster, _) = &feed {
                    let answer = quarantine_through_api(cluster, cmd.what, &state.load()).await;
                    let _ = cmd.reply.send(answer.map(|()| generation));
                    continue;
                }
                let mut dp = datapath.lock().await;
                let answer = control(cmd.what, &mut overrides, &state.load()).and_then(|()| {
                    // The accepted configuration, with the changed quarantines on it.
                    let cfg = effective(&accepted.config, &opts, &overrides);
                    apply(&opts, &cfg, generation + 1, &state, &mut dp).map_err(|e| format!("{e:#}"))
                });
                if answer.is_ok() {
                    generation += 1;
                    status.rcu(|s| Status { config_generation: generation, ..(**s).clone() });
                }
                let _ = cmd.reply.send(answer.map(|()| generation));
            }
            Some(successor) = successor_rx.recv() => {
                let mut listeners = pods.listener_fds();
                listeners.push((host_cookie, handoff::ListenerKind::Tunnel, tunnel_fd.as_raw_fd()));
                let stream = successor.into_std().and_then(|s| { s.set_nonblocking(false)?; Ok(s) });
                match stream.and_then(|s| tokio::task::block_in_place(|| handoff::send(s, &listeners))) {
                    Ok(()) => {
                        tracing::info!(listeners = listeners.len(), "handed the listeners to a new agent; draining");
                        break;
                    }
                    Err(e) => tracing::warn!(error = %e, "handoff to a new agent failed; still serving"),
                }
            }
            _ = sigterm.recv(), if terminating.is_none() => {
                tracing::info!(wait_ms = opts.handoff_wait.as_millis() as u64, "SIGTERM: serving until a successor takes over or the wait ends");
                status.rcu(|s| Status { draining: true, ..(**s).clone() });
                terminating = Some(tokio::time::Instant::now());
            }
            _ = sigint.recv() => {
                tracing::info!("SIGINT: stopping");
                break;
            }
            _ = sleep_until_opt(handoff_deadline) => {
                tracing::info!("no successor took over; stopping");
                break;
            }
        }
    }

    // Drain: stop accepting, let open connections finish, keep the datapath pinned.
    drain_trigger.start();
    status.rcu(|s| Status {
        ready: false,
        draining: true,
        ..(**s).clone()
    });
    let deadline = Instant::now() + opts.drain_timeout;
    while metrics.active_connections.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::info!(
        open = metrics.active_connections.load(Ordering::Relaxed),
        "drained; exiting (eBPF programs and maps stay pinned)"
    );
    if let Some(t) = &inputs.telemetry.tracing {
        tokio::task::block_in_place(|| t.shutdown());
    }
    Ok(())
}

/// The source's configuration as this node applies it (see [`effective`]), and what the
/// source accepted (the versions a later change falls back to, object by object).
/// Objects refused are logged.
fn load_config(
    feed: &Feed,
    opts: &AgentOptions,
    overrides: &Overrides,
    prev: Option<&config::Loaded>,
) -> Result<(Config, config::Loaded), config::ConfigError> {
    let loaded = feed.load(prev.map(|p| &p.config))?;
    for r in &loaded.rejected {
        if prev.is_none_or(|p| !p.rejected.contains(r)) {
            tracing::error!(object = %format!("{} {}", r.kind, r.name), error = %r, "configuration object refused");
        }
    }
    Ok((effective(&loaded.config, opts, overrides), loaded))
}

/// The accepted configuration with what only this node knows on it: the quarantines set
/// here at run time, and the network namespaces the CNI plugin recorded.
fn effective(accepted: &Config, opts: &AgentOptions, overrides: &Overrides) -> Config {
    let mut cfg = accepted.clone();
    overrides.apply(&mut cfg);
    if let Some(dir) = &opts.cni_dir {
        crate::cni::apply(&crate::cni::load(dir), &mut cfg, &opts.node);
    }
    cfg
}

#[cfg(feature = "kubernetes")]
/// Apply a change of these EndpointSlices alone: read them from the cache, rebuild only
/// the services they belong to, write only those to the maps, swap the state. `false`
/// (nothing changed) when the change needs the full path: a slice refused now or before,
/// or a service that takes its endpoints from its selector.
fn slices_changed(
    cluster: &crate::k8s::Cluster,
    keys: &[(String, String)],
    accepted: &mut config::Loaded,
    state: &ArcSwap<NodeState>,
    dp: &mut Datapath,
    generation: u64,
) -> bool {
    if accepted.rejected.iter().any(|r| r.kind == "EndpointSlice") {
        return false;
    }
    let mut updates = Vec::new();
    for (ns, name) in keys {
        if updates.iter().any(|(n, m, _)| n == ns && m == name) {
            continue;
        }
        let new = match cluster.slice(ns, name).as_deref() {
            None => None,
            Some(Ok(s)) => s.clone(),
            Some(Err(_)) => return false,
        };
        updates.push((ns.clone(), name.clone(), new));
    }
    let slices = &mut accepted.config.endpoint_slices;
    let mut affected = std::collections::HashSet::new();
    for (ns, name, new) in updates {
        if let Some(i) = slices
            .iter()
            .position(|s| s.namespace == ns && s.name == name)
        {
            let old = slices.remove(i);
            affected.insert((old.namespace, old.service));
        }
        if let Some(s) = new {
            affected.insert((s.namespace.clone(), s.service.clone()));
            slices.push(s);
        }
    }
    let Some((next, addrs)) = state
        .load()
        .with_slices_of(&accepted.config, &affected, generation)
    else {
        return false;
    };
    if let Err(e) = dp.sync_some_services(&next, &addrs) {
        tracing::warn!(error = %e, "writing the changed services failed; reading the whole configuration again");
        return false;
    }
    state.store(Arc::new(next));
    tracing::debug!(services = addrs.len(), generation, "EndpointSlices applied");
    true
}

#[cfg(feature = "kubernetes")]
/// Carry out a quarantine change asked for through the admin API by annotating the pod
/// through the Kubernetes API (`weft.dev/quarantine`, `weft.dev/quarantine-allow-from`).
async fn quarantine_through_api(
    cluster: &crate::k8s::Cluster,
    what: admin::Change,
    st: &NodeState,
) -> Result<(), String> {
    let quarantined = |pod: &str| {
        st.workloads
            .values()
            .find(|w| w.id() == pod)
            .map(|w| w.quarantine.is_some())
    };
    let (pod, annotations) = match what {
        admin::Change::Quarantine { pod, quarantine } => {
            match quarantined(&pod) {
                None => return Err(format!("no pod {pod} in the cluster")),
                Some(true) => return Err(format!("{pod} is quarantined already")),
                Some(false) => {}
            }
            quarantine.check().map_err(|(_, e)| e)?;
            let allow =
                (!quarantine.allow_from.is_empty()).then(|| quarantine.allow_from.join(","));
            (
                pod,
                serde_json::json!({
                    config::ANNOTATION_QUARANTINE: quarantine.reason,
                    config::ANNOTATION_QUARANTINE_ALLOW_FROM: allow,
                }),
            )
        }
        admin::Change::Unquarantine { pod } => {
            if quarantined(&pod) != Some(true) {
                return Err(format!("{pod} is not quarantined"));
            }
            (
                pod,
                serde_json::json!({
                    config::ANNOTATION_QUARANTINE: null,
                    config::ANNOTATION_QUARANTINE_ALLOW_FROM: null,
                }),
            )
        }
    };
    let (namespace, name) = pod
        .split_once('/')
        .ok_or_else(|| format!("{pod}: expected NAMESPACE/NAME"))?;
    cluster
        .annotate_pod(namespace, name, annotations)
        .await
        .map_err(|e| format!("annotating pod {pod} through the Kubernetes API: {e}"))?;
    tracing::warn!(%pod, "quarantine changed through the Kubernetes API (weftctl)");
    Ok(())
}

/// Carry out a change asked for through the admin API (the caller applies it).
fn control(what: admin::Change, overrides: &mut Overrides, st: &NodeState) -> Result<(), String> {
    let declared = |pod: &str| {
        st.workloads.values().find(|w| w.id() == pod).map(|w| {
            w.quarantine
                .as_ref()
                .is_some_and(|q| q.set_by == SetBy::Configuration)
        })
    };
    match what {
        admin::Change::Quarantine { pod, quarantine } => {
            match declared(&pod) {
                None => return Err(format!("no workload {pod} in the configuration")),
                Some(true) => {
                    return Err(format!(
                        "{pod} is quarantined by the configuration already (spec.quarantine)"
                    ))
                }
                Some(false) => {}
            }
            quarantine.check().map_err(|(_, e)| e)?;
            tracing::warn!(%pod, reason = %quarantine.reason, "quarantined (weftctl)");
            overrides
                .set(&pod, quarantine)
                .map_err(|e| format!("keeping the quarantine in the run directory: {e}"))
        }
        admin::Change::Unquarantine { pod } => {
            if declared(&pod) == Some(true) {
                return Err(format!(
                    "{pod} is quarantined by the configuration (spec.quarantine): lift it there"
                ));
            }
            match overrides.lift(&pod) {
                Ok(true) => {
                    tracing::info!(%pod, "quarantine lifted (weftctl)");
                    Ok(())
                }
                Ok(false) => Err(format!("{pod} is not quarantined")),
                Err(e) => Err(format!("updating the run directory: {e}")),
            }
        }
    }
}

/// The IPv4 addresses of the agent's own network namespace (the node's).
fn own_addresses() -> std::collections::HashSet<Ipv4Addr> {
    nix::ifaddrs::getifaddrs()
        .map(|addrs| {
            addrs
                .filter_map(|a| a.address?.as_sockaddr_in().map(|s| s.ip()))
                .collect()
        })
        .unwrap_or_default()
}

/// The certificate source the options name.
fn identities(
    opts: &AgentOptions,
    trust_domain: &str,
    state: &Arc<ArcSwap<NodeState>>,
) -> anyhow::Result<Identities> {
    Ok(match &opts.identity {
        IdentitySource::None => {
            tracing::warn!("no identity source (--ca-address, --ca-dir or --cert-dir): connections to pods of other nodes will fail");
            Identities::new(Source::None, None)
        }
        IdentitySource::Ca {
            address,
            node_cert,
            node_key,
            bundle,
        } => {
            let state = state.clone();
            let client = CaClient::new(
                address.clone(),
                trust_domain,
                node_cert.clone(),
                node_key.clone(),
                Some(Arc::new(move |addr: &str| state.load().endpoint_for(addr))),
            )
            .context("the node's credentials for the CA")?;
            Identities::new(Source::Ca(client), Some(bundle.clone()))
        }
        IdentitySource::Local { dir, ttl } => Identities::new(
            Source::Local {
                dir: dir.clone(),
                node: SpiffeId::node(trust_domain, &opts.node)
                    .with_context(|| format!("--node {:?} as an identity", opts.node))?,
                ttl: *ttl,
            },
            None,
        ),
        IdentitySource::Files { dir } => Identities::new(Source::Files(dir.clone()), None),
    })
}

/// Wait until every local workload has a certificate, or `wait` has passed (then say which
/// are missing: their tunnels fail until the certificates arrive).
async fn wait_for_certificates(identities: &Identities, wait: Duration) {
    let deadline = Instant::now() + wait;
    loop {
        identities.refresh().await;
        if identities.complete() {
            return;
        }
        if Instant::now() >= deadline {
            let pending: Vec<String> = identities
                .pending()
                .iter()
                .map(ToString::to_string)
                .collect();
            tracing::warn!(
                ?pending,
                "serving without every workload certificate; still trying"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Raise the soft RLIMIT_NOFILE to the hard limit: every proxied connection holds two
/// descriptors. Returns the limit before and after.
fn raise_open_files() -> (u64, u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return (0, 0);
    };
    if soft < hard {
        if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            tracing::warn!(error = %e, soft, hard, "could not raise the open-file limit");
            return (soft, soft);
        }
    }
    (soft, hard)
}

/// Parsing a large configuration builds a big transient document tree; hand the freed
/// memory back to the system instead of keeping it in the allocator's free lists.
fn release_parser_memory() {
    // SAFETY: malloc_trim only releases free heap memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

async fn sleep_until_opt(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Alert on what the datapath did on its own since the last agent: connects that bypassed
/// the mesh or were refused because no agent listened.
fn report_while_down(dp: &mut Datapath) -> std::collections::BTreeMap<String, u64> {
    const WATCHED: [&str; 4] = [
        "fail_open_bypass",
        "fail_closed_refused",
        "inbound_bypass",
        "inbound_refused",
    ];
    let mut out = std::collections::BTreeMap::new();
    for (name, n) in dp.take_unacknowledged() {
        if WATCHED.contains(&name) {
            if n > 0 && name.ends_with("bypass") {
                tracing::warn!(
                    counter = name,
                    connections = n,
                    "connections bypassed the mesh while no agent ran (fail-open workloads)"
                );
            } else if n > 0 {
                tracing::warn!(
                    counter = name,
                    connections = n,
                    "connections were refused while no agent ran (fail-closed workloads)"
                );
            }
            out.insert(name.to_owned(), n);
        }
    }
    out
}

/// Accept a new configuration: swap the state, then bring the maps in line.
fn apply(
    opts: &AgentOptions,
    cfg: &Config,
    generation: u64,
    state: &ArcSwap<NodeState>,
    dp: &mut Datapath,
) -> anyhow::Result<()> {
    if !cfg.nodes.contains_key(&opts.node) {
        tracing::warn!(node = %opts.node, "this node is no longer declared; keeping its pods as they are");
    }
    let next = NodeState::build(&opts.node, cfg, generation, Some(&state.load()));
    dp.sync_services(&next).context(
        "writing the service maps (the maps and the proxy keep the previous configuration)",
    )?;
    state.store(Arc::new(next));
    Ok(())
}

/// The pods this agent serves.
struct Pods {
    enrolled: HashMap<Ipv4Addr, Enrolled>,
    /// Last enrolment error per pod, so a retried failure is logged once.
    failed: HashMap<Ipv4Addr, String>,
    host: Arc<HostNetns>,
    inputs: ProxyInputs,
}

impl Pods {
    /// Enrol meshed local pods that are not enrolled (or changed), let go of the others.
    fn reconcile(&mut self, dp: &mut Datapath, st: &NodeState, inherited: &mut Inherited) {
        let wanted: HashMap<Ipv4Addr, &config::Workload> = st
            .local
            .iter()
            .filter(|(_, w)| w.meshed)
            .map(|(ip, w)| (*ip, w))
            .collect();
        // A changed declaration of the same pod (same address and netns: labels, ports,
        // posture) is applied in place, so the pod is never unmeshed in between and keeps
        // its listeners and connections.
        for (ip, e) in self.enrolled.iter_mut() {
            let Some(w) = wanted.get(ip) else { continue };
            if **w == e.workload || w.netns != e.workload.netns {
                continue;
            }
            let inbound = e
                .listeners
                .iter()
                .find(|(k, _)| *k == handoff::ListenerKind::Inbound)
                .map(|(_, fd)| fd);
            match dp.enroll(w, &e.netns, inbound) {
                Ok(()) => {
                    tracing::info!(workload = %w.id(), "declaration changed; updated in place");
                    e.workload = (*w).clone();
                }
                Err(err) => {
                    tracing::warn!(workload = %w.id(), error = %err, "updating in place failed; enrolling again")
                }
            }
        }
        let gone: Vec<Ipv4Addr> = self
            .enrolled
            .iter()
            .filter(|(ip, e)| wanted.get(ip).is_none_or(|w| **w != e.workload))
            .map(|(ip, _)| *ip)
            .collect();
        self.failed.retain(|ip, _| wanted.contains_key(ip));
        let mut changed = !gone.is_empty();
        for ip in gone {
            if let Some(e) = self.enrolled.remove(&ip) {
                dp.unenroll(e.netns.cookie());
                tracing::info!(workload = %e.workload.id(), "unenrolled");
            }
        }
        for (ip, w) in wanted {
            if self.enrolled.contains_key(&ip) {
                continue;
            }
            match enroll::enroll(dp, w, &self.host, &self.inputs, inherited) {
                Ok(e) => {
                    self.failed.remove(&ip);
                    self.enrolled.insert(ip, e);
                    changed = true;
                }
                Err(e) => {
                    // Retried on every tick; said once per distinct error.
                    let msg = e.to_string();
                    if self.failed.get(&ip) != Some(&msg) {
                        tracing::error!(error = %msg, "enrolment failed; will retry");
                        self.failed.insert(ip, msg);
                    }
                }
            }
        }
        if changed {
            let map: HashMap<Ipv4Addr, Arc<Pod>> = self
                .enrolled
                .iter()
                .map(|(ip, e)| (*ip, e.pod.clone()))
                .collect();
            self.inputs.pods.store(Arc::new(map));
        }
    }

    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.enrolled.values().map(|e| e.workload.id()).collect();
        v.sort();
        v
    }

    fn listener_fds(&self) -> Vec<(u64, handoff::ListenerKind, i32)> {
        self.enrolled
            .values()
            .flat_map(|e| {
                e.listeners
                    .iter()
                    .map(|(k, fd)| (e.netns.cookie(), *k, fd.as_raw_fd()))
            })
            .collect()
    }
}

/// Refuse to attach to a cgroup that contains the agent: its own sockets would be captured.
fn check_own_cgroup(cgroup2: &std::path::Path, target: &std::path::Path) -> anyhow::Result<()> {
    if !target.is_dir() {
        bail!(
            "--cgroup {}: no such cgroup v2 directory (cgroup2 is mounted at {})",
            target.display(),
            cgroup2.display()
        );
    }
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    if let Some(rel) = own.lines().find_map(|l| l.strip_prefix("0::")) {
        let own_dir = cgroup2.join(rel.trim_start_matches('/'));
        if own_dir.starts_with(target) {
            bail!(
                "weft-agent runs in cgroup {} which is inside --cgroup {}: its own sockets would be captured. \
                 Run the agent outside the pods' cgroup subtree.",
                own_dir.display(),
                target.display()
            );
        }
    }
    Ok(())
}

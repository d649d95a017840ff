//! The eBPF datapath: load weft's object, attach (or adopt) its programs, and keep its maps
//! in step with the node's state.
//!
//! Everything that must outlive the agent is pinned under
//! `<bpffs>/weft/<node>/v<ABI_VERSION>/`: `maps/` (every map), `links/` (the cgroup
//! programs' links) and `pods/<netns-cookie>` (each pod's sk_lookup link). A crashed agent
//! therefore leaves capture attached, and its successor adopts the pinned links whose
//! program is byte-identical (same kernel tag) to its own, replaces the others, and removes
//! directories of other ABI versions.

pub mod coexist;
pub mod mounts;
pub mod preflight;
pub mod services;

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsFd as _, AsRawFd},
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap as BpfHashMap, IterableMap as _, MapData, PerCpuArray, SockHash},
    programs::{
        links::{FdLink, PinnedLink},
        loaded_programs, CgroupAttachMode, CgroupSockAddr, SkLookup, SkMsg, SockOps,
    },
    Ebpf, EbpfLoader,
};
use weft_common::{
    maps, programs, settings, workload_flags, ConnKey, DeliveryKey, EndpointKey, InboundKey,
    InboundPort, ServiceKey, ServiceValue, SockAddr4, SockPairKey, Stat, Workload as WorkloadValue,
    ABI_VERSION,
};

use crate::{
    config::{AgentDown, Workload},
    netns::PodNetns,
    state::NodeState,
};

/// Cgroup programs are attached as bpf_links, which always coexist with other links on the
/// same cgroup; the kernel rejects BPF_F_ALLOW_MULTI on link creation, so the mode is 0.
const LINK_MODE: CgroupAttachMode = CgroupAttachMode::Single;

/// The compiled eBPF object, built by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weft"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("this weft-agent was built with AYA_BUILD_SKIP=1 and carries no eBPF object; rebuild it without that variable")]
    NoObject,
    #[error("loading the eBPF object failed (is the kernel new enough, 5.15+ with BTF?): {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF program {name}: its link: {source}")]
    Link {
        name: &'static str,
        source: aya::programs::links::LinkError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("eBPF map {name} is missing from the object")]
    MissingMap { name: &'static str },
    #[error("pinning under {path}: {message}")]
    Pin { path: PathBuf, message: String },
    #[error("cgroup {path}: {source} (does the directory exist under the cgroup2 mount?)")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("eBPF map {map} holds at most {max} entries and this configuration needs {needed}: declare less, or give the maps more room with {flag} (docs/operations.md, \"Map sizes\")")]
    Capacity {
        map: &'static str,
        needed: usize,
        max: u32,
        flag: &'static str,
    },
    #[error("service {0} is not in the maps yet: a full sync is needed")]
    NotWritten(String),
    #[error("{first}; putting the previous contents back failed too ({rollback}); the next reload tick tries again")]
    RollbackFailed {
        first: Box<DatapathError>,
        rollback: Box<DatapathError>,
    },
    #[cfg(test)]
    #[error("injected failure")]
    Injected,
}

fn prog_err(name: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> DatapathError {
    move |source| DatapathError::Program { name, source }
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

fn pin_err(path: &Path) -> impl FnOnce(String) -> DatapathError + '_ {
    move |message| DatapathError::Pin {
        path: path.to_owned(),
        message,
    }
}

#[derive(Clone, Debug)]
pub struct DatapathOptions {
    pub node: String,
    /// Absolute path of the cgroup v2 directory the pods live under.
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
    /// Turn on sockops/sk_msg redirection between local sockets.
    pub accelerate: bool,
    /// Sizes of `SERVICES` and `ENDPOINTS` when they are created (pinned maps keep theirs).
    pub capacity: services::Capacity,
}

impl services::Capacity {
    /// The sizes ebpf/src/maps.rs declares.
    pub const DEFAULT: Self = Self {
        services: 262_144,
        endpoints: 1_048_576,
    };
}

/// How the cgroup programs came to be attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Attachment {
    /// A pinned link with the identical program was already attached: kept as it was.
    Adopted,
    /// Attached now (first start, or the pinned program differed and was replaced).
    Attached,
}

/// The maps the proxy uses per connection: `ORIG_DST` (read) and `DELIVERIES` (written).
/// Both are used through `&self`, with no lock, from any task.
pub struct CaptureMaps {
    orig_dst: BpfHashMap<MapData, ConnKey, SockAddr4>,
    deliveries: BpfHashMap<MapData, DeliveryKey, u8>,
    local_socks: SockHash<MapData, SockPairKey>,
    accelerate: bool,
}

impl CaptureMaps {
    /// The original destination of a captured connection, removed from `ORIG_DST` as it
    /// is read: an entry is used once, so the map holds only connections not yet accepted.
    pub fn take_orig_dst(&self, netns_cookie: u64, client: SocketAddrV4) -> Option<SocketAddrV4> {
        let key = ConnKey {
            netns_cookie,
            src_ip: raw_ip(*client.ip()),
            src_port: client.port(),
            _pad: 0,
        };
        // One system call: BPF_MAP_LOOKUP_AND_DELETE_ELEM (hash maps, Linux 5.14+).
        const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
        let mut v = SockAddr4::default();
        raw_map_op(
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            self.orig_dst.map().fd().as_fd(),
            &key,
            std::ptr::from_mut(&mut v) as u64,
        )
        .ok()?;
        Some(SocketAddrV4::new(ip_of(v.ip), v.port))
    }

    pub fn announce_delivery(&self, src: SocketAddrV4, dst: SocketAddrV4) -> std::io::Result<()> {
        raw_update(
            self.deliveries.map().fd().as_fd(),
            &delivery_key(src, dst),
            &1u8,
        )
    }

    /// Remove an announced delivery once its connect has ended, either way.
    pub fn withdraw_delivery(&self, src: SocketAddrV4, dst: SocketAddrV4) {
        let _ = raw_delete(self.deliveries.map().fd().as_fd(), &delivery_key(src, dst));
    }

    /// Add the agent's end of a captured loopback connection to `LOCAL_SOCKS` (when
    /// acceleration is on), so sk_msg redirects between it and the app's end.
    pub fn accelerate(
        &self,
        netns_cookie: u64,
        local: SocketAddrV4,
        remote: SocketAddrV4,
        sock: &impl AsRawFd,
    ) -> std::io::Result<()> {
        if !self.accelerate {
            return Ok(());
        }
        let key = SockPairKey {
            netns_cookie,
            local_ip: raw_ip(*local.ip()),
            remote_ip: raw_ip(*remote.ip()),
            local_port: local.port(),
            remote_port: remote.port(),
            _pad: 0,
        };
        let fd = sock.as_raw_fd() as u32;
        raw_update(self.local_socks.fd().as_fd(), &key, &fd)
    }
}

/// `SERVICES` and `ENDPOINTS` as the service sync writes them.
struct AyaTables<'a> {
    services: &'a mut BpfHashMap<MapData, ServiceKey, ServiceValue>,
    endpoints: &'a mut BpfHashMap<MapData, EndpointKey, SockAddr4>,
}

impl services::ServiceTables for AyaTables<'_> {
    fn put_service(&mut self, k: &ServiceKey, v: &ServiceValue) -> Result<(), DatapathError> {
        self.services
            .insert(k, v, 0)
            .map_err(map_err(maps::SERVICES))
    }

    fn drop_service(&mut self, k: &ServiceKey) {
        let _ = self.services.remove(k);
    }

    fn put_endpoint(&mut self, k: &EndpointKey, v: &SockAddr4) -> Result<(), DatapathError> {
        self.endpoints
            .insert(k, v, 0)
            .map_err(map_err(maps::ENDPOINTS))
    }

    fn drop_endpoint(&mut self, k: &EndpointKey) {
        let _ = self.endpoints.remove(k);
    }
}

fn delivery_key(src: SocketAddrV4, dst: SocketAddrV4) -> DeliveryKey {
    DeliveryKey {
        src_ip: raw_ip(*src.ip()),
        dst_ip: raw_ip(*dst.ip()),
        src_port: src.port(),
        dst_port: dst.port(),
    }
}

/// BPF_MAP_UPDATE_ELEM through a shared reference (aya's typed maps want `&mut` to write).
fn raw_update<K, V>(fd: std::os::fd::BorrowedFd<'_>, key: &K, value: &V) -> std::io::Result<()> {
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    raw_map_op(
        BPF_MAP_UPDATE_ELEM,
        fd,
        key,
        std::ptr::from_ref(value) as u64,
    )
}

/// BPF_MAP_DELETE_ELEM through a shared reference.
fn raw_delete<K>(fd: std::os::fd::BorrowedFd<'_>, key: &K) -> std::io::Result<()> {
    const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
    raw_map_op(BPF_MAP_DELETE_ELEM, fd, key, 0)
}

fn raw_map_op<K>(
    cmd: libc::c_long,
    fd: std::os::fd::BorrowedFd<'_>,
    key: &K,
    value: u64,
) -> std::io::Result<()> {
    #[repr(C)]
    struct Attr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let attr = Attr {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key: std::ptr::from_ref(key) as u64,
        value,
        flags: 0,
    };
    // SAFETY: attr points at a valid bpf_attr prefix for these commands; key (and value,
    // when the command reads or writes one) point at values of the map's key and value
    // sizes, alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &raw const attr,
            std::mem::size_of::<Attr>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

pub fn ip_of(raw: u32) -> Ipv4Addr {
    Ipv4Addr::from(raw.to_ne_bytes())
}

pub fn raw_ip(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// What the datapath holds for one enrolled pod.
struct PodEntry {
    ip: Ipv4Addr,
    ports: Vec<u16>,
}

pub struct Datapath {
    ebpf: Ebpf,
    root: PathBuf,
    services: BpfHashMap<MapData, ServiceKey, ServiceValue>,
    endpoints: BpfHashMap<MapData, EndpointKey, SockAddr4>,
    workloads: BpfHashMap<MapData, u64, WorkloadValue>,
    inbound_ports: BpfHashMap<MapData, InboundKey, InboundPort>,
    inbound_lsn: SockHash<MapData, u32>,
    stats: PerCpuArray<MapData, u64>,
    acked: Array<MapData, u64>,
    /// What this agent wrote to `SERVICES` and `ENDPOINTS` (read from them when it takes
    /// ownership of the maps; `None` until then).
    written: Option<services::Written>,
    /// The sizes of `SERVICES` and `ENDPOINTS` as the kernel has them.
    capacity: services::Capacity,
    /// The last sync failed and could not be rolled back: try again.
    dirty: bool,
    pods: HashMap<u64, PodEntry>,
    pub attachment: Attachment,
    /// Other owners' programs on weft's cgroup hooks, found at start.
    pub foreign: Vec<coexist::Foreign>,
    accelerate: bool,
}

impl Datapath {
    /// Load the object (reusing pinned maps), attach or adopt the cgroup programs, and
    /// hand out the maps the proxy uses per connection.
    pub fn start(opts: &DatapathOptions) -> Result<(Self, CaptureMaps), DatapathError> {
        if OBJECT.is_empty() {
            return Err(DatapathError::NoObject);
        }
        let node_dir = opts.bpffs.join("weft").join(&opts.node);
        let root = node_dir.join(format!("v{ABI_VERSION}"));
        for sub in ["maps", "links", "pods"] {
            std::fs::create_dir_all(root.join(sub)).map_err(|e| pin_err(&root)(e.to_string()))?;
        }
        let mut loader = EbpfLoader::new();
        loader
            .default_map_pin_directory(root.join("maps"))
            .map_max_entries(maps::SERVICES, opts.capacity.services)
            .map_max_entries(maps::ENDPOINTS, opts.capacity.endpoints);
        // Socket-storage maps are BTF maps, which carry no pinning flag: pin them by name
        // here, so every program of this version shares one instance across restarts.
        let storage_pins: Vec<(&str, PathBuf)> = maps::SOCKET_STORAGE
            .iter()
            .map(|m| (*m, root.join("maps").join(m)))
            .collect();
        for (name, path) in &storage_pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(OBJECT)?;

        let cgroup = File::open(&opts.cgroup).map_err(|source| DatapathError::Cgroup {
            path: opts.cgroup.clone(),
            source,
        })?;
        let links = root.join("links");
        let mut attachment = Attachment::Adopted;
        let mut attached = |fresh: bool| {
            if fresh {
                attachment = Attachment::Attached;
            }
        };
        for name in [
            programs::CONNECT4,
            programs::CONNECT6,
            programs::GETPEERNAME4,
            programs::GETPEERNAME6,
            programs::SENDMSG4,
            programs::RECVMSG4,
        ] {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load().map_err(prog_err(name))?;
            let tag = prog.info().map_err(prog_err(name))?.tag();
            attached(adopt_or_attach(&links.join(name), tag, || {
                let id = prog.attach(&cgroup, LINK_MODE).map_err(prog_err(name))?;
                let link = prog.take_link(id).map_err(prog_err(name))?;
                FdLink::try_from(link).map_err(|source| DatapathError::Link { name, source })
            })?);
        }
        {
            let name = programs::SOCKOPS;
            let prog: &mut SockOps = program(&mut ebpf, name)?;
            prog.load().map_err(prog_err(name))?;
            let tag = prog.info().map_err(prog_err(name))?.tag();
            attached(adopt_or_attach(&links.join(name), tag, || {
                let id = prog.attach(&cgroup, LINK_MODE).map_err(prog_err(name))?;
                let link = prog.take_link(id).map_err(prog_err(name))?;
                FdLink::try_from(link).map_err(|source| DatapathError::Link { name, source })
            })?);
        }

        // Other owners' programs on the same hooks: named at start, never touched.
        let ours: Vec<u32> = [
            programs::CONNECT4,
            programs::CONNECT6,
            programs::GETPEERNAME4,
            programs::GETPEERNAME6,
            programs::SENDMSG4,
            programs::RECVMSG4,
            programs::SOCKOPS,
        ]
        .iter()
        .filter_map(|name| {
            FdLink::from(PinnedLink::from_pin(links.join(name)).ok()?)
                .info()
                .ok()
        })
        .map(|i| i.program_id())
        .collect();
        let foreign = coexist::foreign(&cgroup, &ours).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot list the other programs on the pods' cgroup hooks");
            Vec::new()
        });
        for f in &foreign {
            if f.conflict {
                tracing::warn!(cgroup = %opts.cgroup.display(), "{f}; attach weft's programs first, or to a cgroup below the other's (docs/install.md, \"Beside another CNI\")");
            } else {
                tracing::info!(cgroup = %opts.cgroup.display(), "{f}");
            }
        }

        let local_socks: SockHash<MapData, SockPairKey> = take_map(&mut ebpf, maps::LOCAL_SOCKS)?;
        {
            let name = programs::SK_MSG;
            let prog: &mut SkMsg = program(&mut ebpf, name)?;
            prog.load().map_err(prog_err(name))?;
            // Attaching replaces whatever sk_msg program the pinned map had. The attachment
            // belongs to the map, so it is not detached when this agent exits.
            let id = prog.attach(local_socks.fd()).map_err(prog_err(name))?;
            std::mem::forget(prog.take_link(id).map_err(prog_err(name))?);
        }
        {
            let name = programs::SK_LOOKUP;
            let prog: &mut SkLookup = program(&mut ebpf, name)?;
            prog.load().map_err(prog_err(name))?;
        }

        let services: BpfHashMap<MapData, ServiceKey, ServiceValue> =
            take_map(&mut ebpf, maps::SERVICES)?;
        let endpoints: BpfHashMap<MapData, EndpointKey, SockAddr4> =
            take_map(&mut ebpf, maps::ENDPOINTS)?;
        let size = |m: &MapData, name| m.info().map(|i| i.max_entries()).map_err(map_err(name));
        let capacity = services::Capacity {
            services: size(services.map(), maps::SERVICES)?,
            endpoints: size(endpoints.map(), maps::ENDPOINTS)?,
        };
        if capacity != opts.capacity {
            tracing::warn!(pinned = ?capacity, asked = ?opts.capacity, "the pinned SERVICES/ENDPOINTS maps keep the size they were created with; to resize them, stop the agent and remove the pins (docs/operations.md, \"Map sizes\")");
        }
        let capture = CaptureMaps {
            orig_dst: take_map(&mut ebpf, maps::ORIG_DST)?,
            deliveries: take_map(&mut ebpf, maps::DELIVERIES)?,
            local_socks,
            accelerate: opts.accelerate,
        };
        let dp = Self {
            endpoints,
            workloads: take_map(&mut ebpf, maps::WORKLOADS)?,
            inbound_ports: take_map(&mut ebpf, maps::INBOUND_PORTS)?,
            inbound_lsn: take_map(&mut ebpf, maps::INBOUND_LSN)?,
            stats: take_map(&mut ebpf, maps::STATS)?,
            acked: take_map(&mut ebpf, maps::ACKED)?,
            services,
            written: None,
            capacity,
            dirty: false,
            accelerate: opts.accelerate,
            pods: HashMap::new(),
            ebpf,
            root,
            attachment,
            foreign,
        };
        Ok((dp, capture))
    }

    /// Remove pinned objects of other ABI versions, detaching their programs. Call once this
    /// version has every pod enrolled and the services written: until then the other
    /// version's programs keep the pods captured (or fenced), so an upgrade that changes
    /// the pin layout never leaves a meshed pod unmeshed.
    pub fn remove_other_versions(&self) {
        if let Some(node_dir) = self.root.parent() {
            remove_other_versions(node_dir);
        }
    }

    pub fn pin_root(&self) -> &Path {
        &self.root
    }

    /// Become the one agent that writes the maps: read what they hold (a previous agent's
    /// service ids included) and apply this agent's settings. Called once the previous
    /// agent, if any, has handed over and stopped writing.
    pub fn take_ownership(&mut self) -> Result<(), DatapathError> {
        let written = services::Written::read(self.services.iter().filter_map(Result::ok), |k| {
            self.endpoints.get(k, 0).ok()
        });
        tracing::debug!(services = written.len(), "read the service maps");
        self.written = Some(written);
        let mut settings_map: Array<&mut MapData, u32> =
            Array::try_from(self.ebpf.map_mut(maps::SETTINGS).ok_or(
                DatapathError::MissingMap {
                    name: maps::SETTINGS,
                },
            )?)
            .map_err(map_err(maps::SETTINGS))?;
        settings_map
            .set(settings::ACCELERATE, u32::from(self.accelerate), 0)
            .map_err(map_err(maps::SETTINGS))
    }

    /// Make `SERVICES` and `ENDPOINTS` say what `state` says, or leave them as they were
    /// (services.rs). A failure that could not even be rolled back marks the maps dirty;
    /// [`Self::is_dirty`] tells the caller to sync again.
    pub fn sync_services(&mut self, state: &NodeState) -> Result<(), DatapathError> {
        let desired = services::desired(state);
        self.sync_with(|written, tables, cap| written.sync(tables, &desired, cap))
    }

    /// Write the endpoints of these services (already in the maps) from `state`: one
    /// watched change costs in proportion to the services it touched.
    pub fn sync_some_services(
        &mut self,
        state: &NodeState,
        addrs: &[crate::state::ServiceAddr],
    ) -> Result<(), DatapathError> {
        let subset = services::desired_of(state, addrs);
        self.sync_with(|written, tables, cap| written.sync_some(tables, &subset, cap))
    }

    /// Run one transaction on the service maps; one that could not even be rolled back
    /// leaves them dirty.
    fn sync_with(
        &mut self,
        f: impl FnOnce(
            &mut services::Written,
            &mut AyaTables<'_>,
            services::Capacity,
        ) -> Result<(), DatapathError>,
    ) -> Result<(), DatapathError> {
        let written = self.written.as_mut().expect("take_ownership first");
        let mut tables = AyaTables {
            services: &mut self.services,
            endpoints: &mut self.endpoints,
        };
        let res = f(written, &mut tables, self.capacity);
        self.dirty = matches!(res, Err(DatapathError::RollbackFailed { .. }));
        res
    }

    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Enrol a meshed pod: how connect4 treats it, which inbound ports sk_lookup steers,
    /// where the agent's inbound listener is, and the sk_lookup program on its netns.
    ///
    /// Without a listener the pod is *fenced*: known as meshed, with its inbound ports
    /// steered, but to no listener, so its posture applies as if no agent ran (fail-closed:
    /// its connects to services and every connection to it are refused). For a pod whose
    /// enrolment failed: it must not be left unmeshed meanwhile.
    pub fn enroll(
        &mut self,
        w: &Workload,
        netns: &PodNetns,
        inbound_listener: Option<&impl AsRawFd>,
    ) -> Result<(), DatapathError> {
        let cookie = netns.cookie();
        let mut flags = workload_flags::MESHED;
        if w.agent_down == AgentDown::FailOpen {
            flags |= workload_flags::FAIL_OPEN;
        }
        let ip = raw_ip(w.ip);
        match inbound_listener {
            Some(l) => self
                .inbound_lsn
                .insert(ip, l.as_raw_fd(), 0)
                .map_err(map_err(maps::INBOUND_LSN))?,
            None => {
                let _ = self.inbound_lsn.remove(&ip);
            }
        }
        // Every port of the pod's IP: its declared ports, and port 0, the wildcard
        // sk_lookup falls back to, so no port is reachable around the agent.
        let ports: Vec<u16> = w
            .ports
            .iter()
            .map(|p| p.port)
            .chain(std::iter::once(0))
            .collect();
        for port in &ports {
            let key = InboundKey {
                ip,
                port: *port,
                _pad: 0,
            };
            self.inbound_ports
                .insert(key, InboundPort { flags }, 0)
                .map_err(map_err(maps::INBOUND_PORTS))?;
        }
        if let Some(old) = self.pods.get(&cookie) {
            for port in old.ports.iter().filter(|p| !ports.contains(p)) {
                let _ = self.inbound_ports.remove(&InboundKey {
                    ip: raw_ip(old.ip),
                    port: *port,
                    _pad: 0,
                });
            }
        }
        self.workloads
            .insert(cookie, WorkloadValue { flags, _pad: 0 }, 0)
            .map_err(map_err(maps::WORKLOADS))?;
        self.attach_sk_lookup(netns)?;
        self.pods.insert(cookie, PodEntry { ip: w.ip, ports });
        Ok(())
    }

    fn attach_sk_lookup(&mut self, netns: &PodNetns) -> Result<(), DatapathError> {
        let name = programs::SK_LOOKUP;
        let pin = self.root.join("pods").join(netns.cookie().to_string());
        let prog: &mut SkLookup = program(&mut self.ebpf, name)?;
        let tag = prog.info().map_err(prog_err(name))?.tag();
        adopt_or_attach(&pin, tag, || {
            let id = prog.attach(netns.as_fd()).map_err(prog_err(name))?;
            Ok(prog.take_link(id).map_err(prog_err(name))?.into())
        })?;
        Ok(())
    }

    /// Take a pod out of the datapath: its connects are no longer captured, its inbound
    /// ports no longer steered.
    pub fn unenroll(&mut self, cookie: u64) {
        let _ = self.workloads.remove(&cookie);
        if let Some(p) = self.pods.remove(&cookie) {
            for port in &p.ports {
                let _ = self.inbound_ports.remove(&InboundKey {
                    ip: raw_ip(p.ip),
                    port: *port,
                    _pad: 0,
                });
            }
            let _ = self.inbound_lsn.remove(&raw_ip(p.ip));
        }
        let _ = std::fs::remove_file(self.root.join("pods").join(cookie.to_string()));
    }

    /// Forget pods a previous agent enrolled that this one has not: their WORKLOADS
    /// entries, inbound ports and sk_lookup pins. Call after the first enrolment pass.
    pub fn remove_leftovers(&mut self, local_ips: &HashSet<Ipv4Addr>) {
        let stale: Vec<u64> = self
            .workloads
            .keys()
            .filter_map(Result::ok)
            .filter(|c| !self.pods.contains_key(c))
            .collect();
        for cookie in stale {
            let _ = self.workloads.remove(&cookie);
        }
        let enrolled: HashSet<u32> = self.pods.values().map(|p| raw_ip(p.ip)).collect();
        let stale_ports: Vec<InboundKey> = self
            .inbound_ports
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !enrolled.contains(&k.ip) || !local_ips.contains(&ip_of(k.ip)))
            .collect();
        for key in stale_ports {
            let _ = self.inbound_ports.remove(&key);
        }
        if let Ok(dir) = std::fs::read_dir(self.root.join("pods")) {
            for entry in dir.flatten() {
                let keep = entry
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<u64>().ok())
                    .is_some_and(|c| self.pods.contains_key(&c));
                if !keep {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
    }

    /// Sum of each per-CPU counter.
    pub fn stats(&self) -> Vec<(&'static str, u64)> {
        Stat::ALL
            .iter()
            .map(|s| {
                let total = self
                    .stats
                    .get(&(*s as u32), 0)
                    .map(|v| v.iter().sum())
                    .unwrap_or(0);
                (s.name(), total)
            })
            .collect()
    }

    /// How much each counter grew since an agent last acknowledged it (on a fresh start:
    /// what happened while no agent ran), and acknowledge the current values.
    pub fn take_unacknowledged(&mut self) -> Vec<(&'static str, u64)> {
        let mut out = Vec::new();
        for (i, (name, total)) in self.stats().into_iter().enumerate() {
            let seen = self.acked.get(&(i as u32), 0).unwrap_or(0);
            out.push((name, total.saturating_sub(seen)));
            let _ = self.acked.set(i as u32, total, 0);
        }
        out
    }

    /// What the kernel's `SERVICES` map holds for a service address: its id and how many
    /// endpoints it balances over (`None`: not a service to the kernel).
    pub fn lookup_service(
        &self,
        vip: SocketAddrV4,
        protocol: crate::config::Protocol,
    ) -> Option<(u32, u32)> {
        let v = self
            .services
            .get(&services::service_key(vip, protocol), 0)
            .ok()?;
        Some((v.id, v.count))
    }

    /// The programs this agent loaded, as the kernel describes them (`weftctl bpf`):
    /// name, type, kernel id, tag, sizes; run counts and time when the kernel keeps them
    /// (sysctl kernel.bpf_stats_enabled=1).
    pub fn programs(&self) -> Vec<serde_json::Value> {
        self.ebpf
            .programs()
            .filter_map(|(name, p)| {
                let i = p.info().ok()?;
                Some(serde_json::json!({
                    "name": name,
                    "type": format!("{:?}", i.program_type()),
                    "id": i.id(),
                    "tag": format!("{:016x}", i.tag()),
                    "jitted_bytes": i.size_jitted(),
                    "verified_instructions": i.verified_instruction_count(),
                    "run_count": i.run_count(),
                    "run_time_ns": i.run_time().as_nanos() as u64,
                }))
            })
            .collect()
    }

    /// The sizes of `SERVICES` and `ENDPOINTS` this agent writes within.
    pub fn capacity(&self) -> services::Capacity {
        self.capacity
    }

    /// The service map as the kernel sees it (for `weftctl maps`).
    pub fn dump_services(&self) -> Vec<(SocketAddrV4, u8, u32, Vec<SocketAddrV4>)> {
        let mut out = Vec::new();
        for (k, v) in self.services.iter().filter_map(Result::ok) {
            let eps = (0..v.count)
                .filter_map(|i| {
                    self.endpoints
                        .get(
                            &EndpointKey {
                                service: v.id,
                                index: i,
                            },
                            0,
                        )
                        .ok()
                })
                .map(|e| SocketAddrV4::new(ip_of(e.ip), e.port))
                .collect();
            out.push((SocketAddrV4::new(ip_of(k.ip), k.port), k.proto, v.id, eps));
        }
        out.sort();
        out
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = ebpf.program_mut(name).ok_or(DatapathError::Program {
        name,
        source: aya::programs::ProgramError::UnexpectedProgramType,
    })?;
    p.try_into().map_err(prog_err(name))
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let m = ebpf
        .take_map(name)
        .ok_or(DatapathError::MissingMap { name })?;
    T::try_from(m).map_err(map_err(name))
}

/// Keep the link pinned at `pin` if its program is the one with kernel tag `tag` (adopt);
/// otherwise attach with `attach` and pin the new link there, replacing the old one.
/// Returns whether a new link was attached.
fn adopt_or_attach(
    pin: &Path,
    tag: u64,
    attach: impl FnOnce() -> Result<FdLink, DatapathError>,
) -> Result<bool, DatapathError> {
    if adopt(pin, tag) {
        return Ok(false);
    }
    replace_pin(attach()?, pin)?;
    Ok(true)
}

/// Keep the link pinned at `pin` if its program has kernel tag `tag`.
fn adopt(pin: &Path, tag: u64) -> bool {
    let Ok(link) = PinnedLink::from_pin(pin) else {
        return false;
    };
    let fd: FdLink = link.into();
    let Ok(info) = fd.info() else {
        return false;
    };
    let prog_id = info.program_id();
    loaded_programs()
        .filter_map(Result::ok)
        .any(|p| p.id() == prog_id && p.tag() == tag)
}

/// Pin `link` at `pin`, replacing (and so detaching) whatever link was pinned there.
fn replace_pin(link: FdLink, pin: &Path) -> Result<(), DatapathError> {
    // bpffs refuses names with a dot (reserved for the kernel's own files).
    let mut fresh = pin.as_os_str().to_owned();
    fresh.push("_new");
    let fresh = PathBuf::from(fresh);
    let _ = std::fs::remove_file(&fresh);
    link.pin(&fresh)
        .map_err(|e| pin_err(pin)(format!("{e:?}")))?;
    std::fs::rename(&fresh, pin).map_err(|e| pin_err(pin)(format!("rename: {e}")))?;
    Ok(())
}

/// Remove pinned objects of other ABI versions (detaching their programs), once this
/// version is attached.
fn remove_other_versions(node_dir: &Path) {
    let current = format!("v{ABI_VERSION}");
    let Ok(dir) = std::fs::read_dir(node_dir) else {
        return;
    };
    for entry in dir.flatten() {
        if entry.file_name().to_str() != Some(current.as_str()) {
            tracing::info!(path = %entry.path().display(), "removing pinned objects of another weft version");
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

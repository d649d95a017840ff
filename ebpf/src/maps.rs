//! Every map of the object, in one place. Maps marked `pinned` are pinned by name under the
//! directory the agent passes to the loader (`<bpffs>/weft/<node>/v<ABI>/maps/`), so a
//! restarted agent finds the same maps, and the attached programs keep working while no
//! agent runs. Sizes are upper bounds; the hash maps the agent fills are not preallocated,
//! so they cost kernel memory in proportion to what is configured.
//!
//! State about one socket lives in socket storage (`SkStorage`, BTF maps pinned by the
//! agent): the kernel frees it with the socket, so it needs no cleanup, has no capacity to
//! share, and one pod churning sockets cannot evict another pod's entries.

/// BPF_F_NO_PREALLOC as the u32 map flags take it.
const NO_PREALLOC: u32 = BPF_F_NO_PREALLOC;

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::SkStorage,
    macros::{btf_map, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, SockHash},
};
use weft_common::{
    settings, Captured, ConnKey, DeliveryKey, EndpointKey, InboundKey, InboundPort, ServiceKey,
    ServiceValue, SockAddr4, SockPairKey, Stat, UdpNat, Workload,
};

/// Service address -> endpoint list id and size.
#[map]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(262_144, NO_PREALLOC);

/// (endpoint list id, index) -> backend address.
#[map]
pub static ENDPOINTS: HashMap<EndpointKey, SockAddr4> = HashMap::pinned(1_048_576, NO_PREALLOC);

/// Pod network-namespace cookie -> how the pod's traffic is treated.
#[map]
pub static WORKLOADS: HashMap<u64, Workload> = HashMap::pinned(16_384, NO_PREALLOC);

/// Per client socket redirected to the agent and not yet connected: its original
/// destination (socket storage; sockops moves it to `ORIG_DST`).
#[btf_map]
pub static CAPTURED: SkStorage<Captured> = SkStorage::new();

/// Captured connection's client end -> original destination; read (and deleted) by the
/// agent on accept, so it holds only connections waiting in a pod's accept queue.
#[map]
pub static ORIG_DST: LruHashMap<ConnKey, SockAddr4> = LruHashMap::pinned(65_536, 0);

/// Per socket that connected to a service address: that address (socket storage; what
/// getpeername returns).
#[btf_map]
pub static SVC_OF_SOCK: SkStorage<SockAddr4> = SkStorage::new();

/// Per UDP socket that sent to a service address: the backends it went to (socket
/// storage; recvmsg's reverse translation).
#[btf_map]
pub static UDP_NAT: SkStorage<UdpNat> = SkStorage::new();

/// (pod IP, port) of enrolled pods whose inbound traffic is steered to the agent.
#[map]
pub static INBOUND_PORTS: HashMap<InboundKey, InboundPort> = HashMap::pinned(65_536, NO_PREALLOC);

/// Pod IP -> the agent's inbound listener inside that pod's netns (sk_lookup target).
#[map]
pub static INBOUND_LSN: SockHash<u32> = SockHash::pinned(16_384, 0);

/// Connections the agent is opening to an app with the original client as source: sk_lookup
/// passes their SYNs to the app; the agent removes each once its connect ends.
#[map]
pub static DELIVERIES: LruHashMap<DeliveryKey, u8> = LruHashMap::pinned(65_536, 0);

/// Local TCP sockets between which sk_msg redirects payload.
#[map]
pub static LOCAL_SOCKS: SockHash<SockPairKey> = SockHash::pinned(65_536, 0);

/// Per-CPU event counters, indexed by [`Stat`].
#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(Stat::COUNT, 0);

/// What the last agent had already reported of each counter (summed over CPUs), so the next
/// one can tell what happened while no agent ran. Written by the agent only.
#[map]
pub static ACKED: Array<u64> = Array::pinned(Stat::COUNT, 0);

/// Switches set by the agent, indexed by [`settings`].
#[map]
pub static SETTINGS: Array<u32> = Array::pinned(settings::COUNT, 0);

#[inline(always)]
pub fn count(stat: Stat) {
    if let Some(v) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: a per-CPU slot is only touched by programs on this CPU.
        unsafe { *v += 1 };
    }
}

/// The map pointer socket-storage helpers take (what aya-ebpf passes for its own calls).
#[inline(always)]
pub fn map_ptr<T>(map: &T) -> *mut core::ffi::c_void {
    core::ptr::from_ref(map).cast_mut().cast()
}

#[inline(always)]
pub fn setting(index: u32) -> u32 {
    SETTINGS.get(index).copied().unwrap_or(0)
}

//! Every map of the object, in one place. Maps marked `pinned` are pinned by name under the
//! directory the agent passes to the loader (`<bpffs>/weft/<node>/v<ABI>/maps/`), so a
//! restarted agent finds the same maps, and the attached programs keep working while no
//! agent runs. Sizes are upper bounds; the hash maps the agent fills are not preallocated,
//! so they cost kernel memory in proportion to what is configured.

/// BPF_F_NO_PREALLOC as the u32 map flags take it.
const NO_PREALLOC: u32 = BPF_F_NO_PREALLOC;

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, SockHash},
};
use weft_common::{
    settings, Captured, ConnKey, DeliveryKey, EndpointKey, InboundKey, InboundPort, RevNatKey,
    ServiceKey, ServiceValue, SockAddr4, SockPairKey, Stat, Workload,
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

/// Client socket cookie -> original destination, for sockets redirected to the agent and
/// not yet connected.
#[map]
pub static CAPTURED: LruHashMap<u64, Captured> = LruHashMap::pinned(65_536, 0);

/// Captured connection's client end -> original destination; read by the agent on accept.
#[map]
pub static ORIG_DST: LruHashMap<ConnKey, SockAddr4> = LruHashMap::pinned(65_536, 0);

/// Socket cookie -> the service address the app connected to (what getpeername returns).
#[map]
pub static SVC_BY_COOKIE: LruHashMap<u64, SockAddr4> = LruHashMap::pinned(262_144, 0);

/// (UDP socket cookie, backend) -> service address, for recvmsg's reverse translation.
#[map]
pub static UDP_REVNAT: LruHashMap<RevNatKey, SockAddr4> = LruHashMap::pinned(65_536, 0);

/// (pod IP, port) of enrolled pods whose inbound traffic is steered to the agent.
#[map]
pub static INBOUND_PORTS: HashMap<InboundKey, InboundPort> = HashMap::pinned(65_536, NO_PREALLOC);

/// Pod IP -> the agent's inbound listener inside that pod's netns (sk_lookup target).
#[map]
pub static INBOUND_LSN: SockHash<u32> = SockHash::pinned(16_384, 0);

/// Connections the agent is opening to an app with the original client as source; sk_lookup
/// passes each one to the app once, then forgets it.
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

#[inline(always)]
pub fn setting(index: u32) -> u32 {
    SETTINGS.get(index).copied().unwrap_or(0)
}

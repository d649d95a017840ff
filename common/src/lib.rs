//! The ABI between weft's eBPF programs and its agent: map names, keys, values, ports and
//! flags. Every type is `#[repr(C)]` with explicit padding so both sides agree byte for
//! byte; the layout tests at the bottom catch drift.
//!
//! Byte order, everywhere in these maps: IPv4 addresses are `u32` holding the four octets in
//! network order (`u32::from_ne_bytes(addr.octets())`), ports are `u16` in host order.
#![no_std]

/// Bumped whenever a map's key or value layout changes. Pinned objects live under a
/// directory named after it, so an agent never reuses maps of an incompatible layout.
/// 2: per-socket state (capture record, service address, UDP NAT) moved to socket storage.
pub const ABI_VERSION: u32 = 2;

/// The agent's outbound listener, bound to 127.0.0.1 inside every enrolled pod's netns.
pub const OUTBOUND_PORT: u16 = 15001;
/// The agent's inbound listener inside every enrolled pod's netns (target of sk_lookup).
pub const INBOUND_PORT: u16 = 15006;
/// The agent's node-to-node tunnel listener inside every enrolled pod's netns.
pub const TUNNEL_PORT: u16 = 15008;
/// SO_MARK of the agent's delivery sockets inside a pod: replies to them are routed back to
/// the agent by a policy-routing rule (see docs/architecture.md, "Delivering to the app").
pub const DELIVERY_MARK: u32 = 0x5eed;
/// Routing table that holds `local 0.0.0.0/0 dev lo` in each enrolled pod's netns.
pub const DELIVERY_TABLE: u32 = 0x5eed;

/// IPPROTO_TCP and IPPROTO_UDP, as stored in [`ServiceKey::proto`].
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Names of the maps, as declared in ebpf/ and pinned under
/// `<bpffs>/weft/<node>/v<ABI_VERSION>/maps/`.
pub mod maps {
    pub const SERVICES: &str = "SERVICES";
    pub const ENDPOINTS: &str = "ENDPOINTS";
    pub const WORKLOADS: &str = "WORKLOADS";
    pub const CAPTURED: &str = "CAPTURED";
    pub const ORIG_DST: &str = "ORIG_DST";
    pub const SVC_OF_SOCK: &str = "SVC_OF_SOCK";
    pub const UDP_NAT: &str = "UDP_NAT";
    /// The maps held in socket-local storage (BTF maps): the kernel frees an entry with
    /// its socket, so one pod's sockets never take room from another's.
    pub const SOCKET_STORAGE: [&str; 3] = [CAPTURED, SVC_OF_SOCK, UDP_NAT];
    pub const INBOUND_PORTS: &str = "INBOUND_PORTS";
    pub const INBOUND_LSN: &str = "INBOUND_LSN";
    pub const LOCAL_SOCKS: &str = "LOCAL_SOCKS";
    pub const DELIVERIES: &str = "DELIVERIES";
    pub const STATS: &str = "STATS";
    pub const ACKED: &str = "ACKED";
    pub const SETTINGS: &str = "SETTINGS";
}

/// Names of the programs (the eBPF functions), which are also their link pin names.
pub mod programs {
    pub const CONNECT4: &str = "weft_connect4";
    pub const CONNECT6: &str = "weft_connect6";
    pub const GETPEERNAME4: &str = "weft_getpeername4";
    pub const GETPEERNAME6: &str = "weft_getpeername6";
    pub const SENDMSG4: &str = "weft_sendmsg4";
    pub const RECVMSG4: &str = "weft_recvmsg4";
    pub const SOCKOPS: &str = "weft_sockops";
    pub const SK_MSG: &str = "weft_sk_msg";
    pub const SK_LOOKUP: &str = "weft_sk_lookup";
}

/// A service address: cluster IP, port, protocol. Key of `SERVICES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub ip: u32,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// Value of `SERVICES`: which endpoint list to pick from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceValue {
    /// Index into `ENDPOINTS` (with [`EndpointKey::index`] `0..count`).
    pub id: u32,
    /// Number of ready endpoints; 0 means the connect is refused (no endpoint).
    pub count: u32,
}

/// Key of `ENDPOINTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    pub service: u32,
    pub index: u32,
}

/// An address and port (a backend, or an original destination).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockAddr4 {
    pub ip: u32,
    pub port: u16,
    pub _pad: u16,
}

impl SockAddr4 {
    pub const fn new(ip: u32, port: u16) -> Self {
        Self { ip, port, _pad: 0 }
    }
}

/// Workload flags in [`Workload::flags`].
pub mod workload_flags {
    /// Outbound TCP to services is captured into the agent.
    pub const MESHED: u32 = 1;
    /// While the agent is down, connects fall back to socket-level load balancing instead
    /// of being refused.
    pub const FAIL_OPEN: u32 = 2;
}

/// Value of `WORKLOADS`, keyed by the pod's network-namespace cookie (u64).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Workload {
    pub flags: u32,
    pub _pad: u32,
}

/// Value of `CAPTURED`, the socket storage of a client socket: written by connect4 when it
/// redirects the socket to the agent, read (and deleted) by sockops once it is connected.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Captured {
    pub orig: SockAddr4,
    pub netns_cookie: u64,
}

/// Key of `ORIG_DST`: the client side of a captured connection as the agent sees it on
/// accept (its peer address), qualified by the pod's netns since every pod has its own
/// 127.0.0.1.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub netns_cookie: u64,
    pub src_ip: u32,
    pub src_port: u16,
    pub _pad: u16,
}

/// How many (backend -> service) translations one UDP socket keeps in `UDP_NAT`; a socket
/// sending through more service backends than this reuses the oldest slot.
pub const NAT_SLOTS: usize = 4;

/// One translation of a UDP socket: replies from `backend` appear to come from `service`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatSlot {
    pub backend: SockAddr4,
    pub service: SockAddr4,
}

/// Value of `UDP_NAT`, the socket storage of a UDP socket that sent to a service address:
/// the backends it was sent to, so recvmsg can put the service address back as the
/// reply's source.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct UdpNat {
    pub slots: [NatSlot; NAT_SLOTS],
    /// Slot the next new backend goes to (modulo NAT_SLOTS).
    pub next: u32,
    pub _pad: u32,
}

/// Key of `INBOUND_PORTS`: a pod's IP and one of its declared ports.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InboundKey {
    pub ip: u32,
    pub port: u16,
    pub _pad: u16,
}

/// Value of `INBOUND_PORTS`; flags as in [`workload_flags`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct InboundPort {
    pub flags: u32,
}

/// Key of `DELIVERIES`: a connection the agent is opening to an app inside a pod, with the
/// original client as source. sk_lookup lets exactly these through to the app instead of
/// steering them back to the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DeliveryKey {
    pub src_ip: u32,
    pub dst_ip: u32,
    pub src_port: u16,
    pub dst_port: u16,
}

/// Key of `LOCAL_SOCKS` (the SOCKHASH sk_msg redirects through): one end of a local TCP
/// connection, from that end's point of view.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockPairKey {
    pub netns_cookie: u64,
    pub local_ip: u32,
    pub remote_ip: u32,
    pub local_port: u16,
    pub remote_port: u16,
    pub _pad: u32,
}

impl SockPairKey {
    /// The key of the other end of the same connection.
    pub const fn peer(&self) -> Self {
        Self {
            netns_cookie: self.netns_cookie,
            local_ip: self.remote_ip,
            remote_ip: self.local_ip,
            local_port: self.remote_port,
            remote_port: self.local_port,
            _pad: 0,
        }
    }
}

/// Indexes of the per-CPU counters in `STATS`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Meshed connects redirected to the agent's outbound listener.
    Captured = 0,
    /// Meshed, fail-open connects sent straight to a backend because no agent listened.
    FailOpenBypass = 1,
    /// Meshed, fail-closed connects refused because no agent listened.
    FailClosedRefused = 2,
    /// Connects (TCP or connected UDP) rewritten to a backend by socket-level LB.
    SockLb = 3,
    /// UDP datagrams rewritten to a backend by sendmsg.
    UdpSendmsg = 4,
    /// Connects to a service with no ready endpoint, refused.
    NoEndpoint = 5,
    /// Inbound connections steered into the agent's inbound listener.
    InboundCaptured = 6,
    /// Inbound connections to a fail-open pod passed to the app because no agent listened.
    InboundBypass = 7,
    /// Inbound connections to a fail-closed pod refused because no agent listened.
    InboundRefused = 8,
    /// sk_msg payload redirects between local sockets.
    MsgRedirect = 9,
}

impl Stat {
    pub const COUNT: u32 = 10;
    pub const ALL: [Stat; Self::COUNT as usize] = [
        Stat::Captured,
        Stat::FailOpenBypass,
        Stat::FailClosedRefused,
        Stat::SockLb,
        Stat::UdpSendmsg,
        Stat::NoEndpoint,
        Stat::InboundCaptured,
        Stat::InboundBypass,
        Stat::InboundRefused,
        Stat::MsgRedirect,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Stat::Captured => "captured",
            Stat::FailOpenBypass => "fail_open_bypass",
            Stat::FailClosedRefused => "fail_closed_refused",
            Stat::SockLb => "sock_lb",
            Stat::UdpSendmsg => "udp_sendmsg",
            Stat::NoEndpoint => "no_endpoint",
            Stat::InboundCaptured => "inbound_captured",
            Stat::InboundBypass => "inbound_bypass",
            Stat::InboundRefused => "inbound_refused",
            Stat::MsgRedirect => "msg_redirect",
        }
    }
}

/// Indexes of `SETTINGS` (an array of u32).
pub mod settings {
    /// Non-zero: sockops adds local sockets to `LOCAL_SOCKS` and sk_msg redirects payload.
    pub const ACCELERATE: u32 = 0;
    pub const COUNT: u32 = 1;
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: every type here is #[repr(C)], Copy, made only of integers, with explicit
    // padding fields, so any bit pattern is valid and there are no uninitialised bytes.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for EndpointKey {}
    unsafe impl aya::Pod for SockAddr4 {}
    unsafe impl aya::Pod for Workload {}
    unsafe impl aya::Pod for Captured {}
    unsafe impl aya::Pod for ConnKey {}
    unsafe impl aya::Pod for NatSlot {}
    unsafe impl aya::Pod for UdpNat {}
    unsafe impl aya::Pod for InboundKey {}
    unsafe impl aya::Pod for InboundPort {}
    unsafe impl aya::Pod for SockPairKey {}
    unsafe impl aya::Pod for DeliveryKey {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, size_of};

    /// Sizes and alignments are part of the ABI: changing one means bumping ABI_VERSION.
    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!((size_of::<ServiceKey>(), align_of::<ServiceKey>()), (8, 4));
        assert_eq!(
            (size_of::<ServiceValue>(), align_of::<ServiceValue>()),
            (8, 4)
        );
        assert_eq!(
            (size_of::<EndpointKey>(), align_of::<EndpointKey>()),
            (8, 4)
        );
        assert_eq!((size_of::<SockAddr4>(), align_of::<SockAddr4>()), (8, 4));
        assert_eq!((size_of::<Workload>(), align_of::<Workload>()), (8, 4));
        assert_eq!((size_of::<Captured>(), align_of::<Captured>()), (16, 8));
        assert_eq!((size_of::<ConnKey>(), align_of::<ConnKey>()), (16, 8));
        assert_eq!((size_of::<NatSlot>(), align_of::<NatSlot>()), (16, 4));
        assert_eq!((size_of::<UdpNat>(), align_of::<UdpNat>()), (72, 4));
        assert_eq!((size_of::<InboundKey>(), align_of::<InboundKey>()), (8, 4));
        assert_eq!(
            (size_of::<InboundPort>(), align_of::<InboundPort>()),
            (4, 4)
        );
        assert_eq!(
            (size_of::<SockPairKey>(), align_of::<SockPairKey>()),
            (24, 8)
        );
        assert_eq!(
            (size_of::<DeliveryKey>(), align_of::<DeliveryKey>()),
            (12, 4)
        );
    }

    #[test]
    fn peer_key_is_an_involution() {
        let k = SockPairKey {
            netns_cookie: 7,
            local_ip: 1,
            remote_ip: 2,
            local_port: 3,
            remote_port: 4,
            _pad: 0,
        };
        assert_eq!(k.peer().peer(), k);
        assert_eq!(k.peer().local_port, 4);
    }

    #[test]
    fn stat_table_is_complete_and_ordered() {
        for (i, s) in Stat::ALL.iter().enumerate() {
            assert_eq!(*s as u32, i as u32);
        }
    }
}

//! cgroup/connect4, connect6 and getpeername4/6: outbound capture of meshed pods' service
//! connects into the agent, and socket-level load balancing (the kube-proxy replacement)
//! for everything else.
//!
//! connect6 handles IPv4-mapped addresses (`::ffff:a.b.c.d`, what dual-stack sockets use to
//! reach IPv4 services); services are IPv4-only for now.

use aya_ebpf::{
    bindings::{bpf_sock_addr, bpf_sock_tuple, BPF_F_CURRENT_NETNS},
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_sk_lookup_tcp, bpf_sk_release},
    programs::SockAddrContext,
    EbpfContext as _,
};
use weft_common::{
    workload_flags, Captured, EndpointKey, ServiceKey, ServiceValue, SockAddr4, Stat,
    OUTBOUND_PORT, PROTO_TCP, PROTO_UDP,
};

use crate::{
    maps::{count, CAPTURED, ENDPOINTS, SERVICES, SVC_OF_SOCK, WORKLOADS},
    udp::remember_backend,
};

const ALLOW: i32 = 1;
const REFUSE: i32 = 0;
/// 127.0.0.1 with its octets in network order.
const LOOPBACK: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
/// The third 32-bit word of an IPv4-mapped IPv6 address (`::ffff:0:0/96`), network order.
const V4_MAPPED: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// What the connect hooks decided for one socket.
enum Verdict {
    /// Not a service address: leave the connect alone.
    Untouched,
    /// Rewrite the destination to this address.
    Rewrite(SockAddr4),
    /// Refuse the connect (EPERM).
    Refuse,
}

pub fn connect4(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the kernel hands us a valid bpf_sock_addr for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    let dst = SockAddr4::new(sa.user_ip4, port_from_ctx(sa.user_port));
    match decide(ctx, sa, dst) {
        Verdict::Untouched => ALLOW,
        Verdict::Refuse => REFUSE,
        Verdict::Rewrite(to) => {
            sa.user_ip4 = to.ip;
            sa.user_port = port_to_ctx(to.port);
            ALLOW
        }
    }
}

pub fn connect6(ctx: &SockAddrContext) -> i32 {
    // SAFETY: as in connect4.
    let sa = unsafe { &mut *ctx.sock_addr };
    let ip6 = sa.user_ip6;
    if ip6[0] != 0 || ip6[1] != 0 || ip6[2] != V4_MAPPED {
        return ALLOW;
    }
    let dst = SockAddr4::new(ip6[3], port_from_ctx(sa.user_port));
    match decide(ctx, sa, dst) {
        Verdict::Untouched => ALLOW,
        Verdict::Refuse => REFUSE,
        Verdict::Rewrite(to) => {
            sa.user_ip6 = [0, 0, V4_MAPPED, to.ip];
            sa.user_port = port_to_ctx(to.port);
            ALLOW
        }
    }
}

/// getpeername on a socket we rewrote returns the service address the app asked for.
pub fn getpeername4(ctx: &SockAddrContext) {
    // SAFETY: as in connect4.
    let sa = unsafe { &mut *ctx.sock_addr };
    if let Some(svc) = service_of_socket(ctx) {
        sa.user_ip4 = svc.ip;
        sa.user_port = port_to_ctx(svc.port);
    }
}

pub fn getpeername6(ctx: &SockAddrContext) {
    // SAFETY: as in connect4.
    let sa = unsafe { &mut *ctx.sock_addr };
    if let Some(svc) = service_of_socket(ctx) {
        sa.user_ip6 = [0, 0, V4_MAPPED, svc.ip];
        sa.user_port = port_to_ctx(svc.port);
    }
}

fn service_of_socket(ctx: &SockAddrContext) -> Option<SockAddr4> {
    // SAFETY: the storage belongs to this socket; its value is plain data.
    let p = unsafe { SVC_OF_SOCK.get_ptr_mut(ctx) };
    // SAFETY: a non-null storage pointer is valid for the program's run.
    (!p.is_null()).then(|| unsafe { *p })
}

/// Remember on the socket which service address it connected to (for getpeername).
fn remember_service(ctx: &SockAddrContext, svc: SockAddr4) {
    let mut v = svc;
    // SAFETY: the storage belongs to this socket; it is created with `v` if absent.
    let p = unsafe { SVC_OF_SOCK.get_or_insert_ptr_mut(ctx, Some(&mut v)) };
    if !p.is_null() {
        // SAFETY: as above; a socket reconnecting overwrites its old value.
        unsafe { *p = svc };
    }
}

fn decide(ctx: &SockAddrContext, sa: &bpf_sock_addr, dst: SockAddr4) -> Verdict {
    let proto = sa.protocol as u8;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Verdict::Untouched;
    }
    let key = ServiceKey {
        ip: dst.ip,
        port: dst.port,
        proto,
        _pad: 0,
    };
    // SAFETY: SERVICES values are plain data written whole by the agent.
    let Some(svc) = (unsafe { SERVICES.get(&key) }).copied() else {
        return Verdict::Untouched;
    };
    if proto == PROTO_TCP {
        // SAFETY: bpf_get_netns_cookie accepts a sock_addr context.
        let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
        // SAFETY: as above.
        let flags = unsafe { WORKLOADS.get(&netns) }.map_or(0, |w| w.flags);
        if flags & workload_flags::MESHED != 0 {
            if agent_listening(ctx) {
                return capture(ctx, netns, dst);
            }
            if flags & workload_flags::FAIL_OPEN == 0 {
                count(Stat::FailClosedRefused);
                return Verdict::Refuse;
            }
            count(Stat::FailOpenBypass);
        }
    }
    load_balance(ctx, proto, dst, &svc)
}

/// Send a meshed pod's connect to the agent's outbound listener in the pod's own netns and
/// remember where it wanted to go.
fn capture(ctx: &SockAddrContext, netns: u64, dst: SockAddr4) -> Verdict {
    let mut captured = Captured {
        orig: dst,
        netns_cookie: netns,
    };
    // SAFETY: the storage belongs to this socket; it is created with `captured` if absent.
    let p = unsafe { CAPTURED.get_or_insert_ptr_mut(ctx, Some(&mut captured)) };
    if p.is_null() {
        // Without the record the agent could not route the connection: refuse it rather
        // than deliver it to a listener that will reset it.
        return Verdict::Refuse;
    }
    // SAFETY: as above; a socket connecting again overwrites its old record.
    unsafe { *p = captured };
    remember_service(ctx, dst);
    count(Stat::Captured);
    Verdict::Rewrite(SockAddr4::new(LOOPBACK, OUTBOUND_PORT))
}

/// Socket-level load balancing: pick a ready endpoint at random and connect straight to it.
fn load_balance(ctx: &SockAddrContext, proto: u8, dst: SockAddr4, svc: &ServiceValue) -> Verdict {
    match pick_endpoint(svc) {
        None => {
            count(Stat::NoEndpoint);
            Verdict::Refuse
        }
        Some(backend) => {
            remember_service(ctx, dst);
            if proto == PROTO_UDP {
                remember_backend(ctx, backend, dst);
            }
            count(Stat::SockLb);
            Verdict::Rewrite(backend)
        }
    }
}

pub fn pick_endpoint(svc: &ServiceValue) -> Option<SockAddr4> {
    if svc.count == 0 {
        return None;
    }
    // SAFETY: helper without arguments.
    let index = unsafe { bpf_get_prandom_u32() } % svc.count;
    let key = EndpointKey {
        service: svc.id,
        index,
    };
    // SAFETY: ENDPOINTS values are plain data written whole by the agent.
    unsafe { ENDPOINTS.get(&key) }.copied()
}

/// Is the agent's outbound listener present in the calling socket's netns?
fn agent_listening(ctx: &SockAddrContext) -> bool {
    // SAFETY: a zeroed tuple is a valid value; we fill in the IPv4 destination only.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    tuple.__bindgen_anon_1.ipv4.daddr = LOOPBACK;
    tuple.__bindgen_anon_1.ipv4.dport = OUTBOUND_PORT.to_be();
    let size = core::mem::size_of_val(unsafe { &tuple.__bindgen_anon_1.ipv4 }) as u32;
    // SAFETY: the tuple lives on our stack for the call; a returned socket is released.
    let sk = unsafe {
        bpf_sk_lookup_tcp(
            ctx.as_ptr(),
            &mut tuple,
            size,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if sk.is_null() {
        return false;
    }
    unsafe { bpf_sk_release(sk.cast()) };
    true
}

/// bpf_sock_addr ports are in network order in the low 16 bits of a u32.
#[inline(always)]
pub fn port_from_ctx(p: u32) -> u16 {
    u16::from_be(p as u16)
}

#[inline(always)]
pub fn port_to_ctx(p: u16) -> u32 {
    p.to_be() as u32
}

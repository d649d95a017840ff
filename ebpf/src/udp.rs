//! cgroup/sendmsg4 and recvmsg4: socket-level load balancing for unconnected UDP (cluster
//! DNS). sendmsg rewrites a datagram for a service address to a backend; recvmsg makes the
//! reply appear to come from the service address. What a socket sent where is kept in its
//! own socket storage (`UDP_NAT`), freed with the socket.

use aya_ebpf::programs::SockAddrContext;
use weft_common::{NatSlot, ServiceKey, SockAddr4, Stat, UdpNat, NAT_SLOTS, PROTO_UDP};

use crate::{
    connect::{pick_endpoint, port_from_ctx, port_to_ctx},
    maps::{count, SERVICES, UDP_NAT},
};

const ALLOW: i32 = 1;
const REFUSE: i32 = 0;

pub fn sendmsg4(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the kernel hands us a valid bpf_sock_addr for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    let dst = SockAddr4::new(sa.user_ip4, port_from_ctx(sa.user_port));
    let key = ServiceKey {
        ip: dst.ip,
        port: dst.port,
        proto: PROTO_UDP,
        _pad: 0,
    };
    // SAFETY: SERVICES values are plain data written whole by the agent.
    let Some(svc) = (unsafe { SERVICES.get(&key) }).copied() else {
        return ALLOW;
    };
    let Some(backend) = pick_endpoint(&svc) else {
        count(Stat::NoEndpoint);
        return REFUSE;
    };
    remember_backend(ctx, backend, dst);
    sa.user_ip4 = backend.ip;
    sa.user_port = port_to_ctx(backend.port);
    count(Stat::UdpSendmsg);
    ALLOW
}

/// Note on the socket that datagrams to `backend` were meant for `service`: the slot
/// already holding `backend`, else the next one in turn.
pub fn remember_backend(ctx: &SockAddrContext, backend: SockAddr4, service: SockAddr4) {
    let mut fresh = UdpNat::default();
    // SAFETY: the storage belongs to this socket; it is created zeroed if absent.
    let p = unsafe { UDP_NAT.get_or_insert_ptr_mut(ctx, Some(&mut fresh)) };
    if p.is_null() {
        return;
    }
    // SAFETY: a non-null storage pointer is valid, and only this socket's programs use it.
    let nat = unsafe { &mut *p };
    let mut i = 0;
    while i < NAT_SLOTS {
        if nat.slots[i].backend == backend {
            nat.slots[i].service = service;
            return;
        }
        i += 1;
    }
    let at = nat.next as usize % NAT_SLOTS;
    nat.slots[at] = NatSlot { backend, service };
    nat.next = nat.next.wrapping_add(1);
}

pub fn recvmsg4(ctx: &SockAddrContext) {
    // SAFETY: as in sendmsg4.
    let sa = unsafe { &mut *ctx.sock_addr };
    let backend = SockAddr4::new(sa.user_ip4, port_from_ctx(sa.user_port));
    // SAFETY: the storage belongs to this socket.
    let p = unsafe { UDP_NAT.get_ptr_mut(ctx) };
    if p.is_null() {
        return;
    }
    // SAFETY: a non-null storage pointer is valid for the program's run.
    let nat = unsafe { &*p };
    let mut i = 0;
    while i < NAT_SLOTS {
        if nat.slots[i].backend == backend {
            let svc = nat.slots[i].service;
            sa.user_ip4 = svc.ip;
            sa.user_port = port_to_ctx(svc.port);
            return;
        }
        i += 1;
    }
}

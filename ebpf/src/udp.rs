//! cgroup/sendmsg4 and recvmsg4: socket-level load balancing for unconnected UDP (cluster
//! DNS). sendmsg rewrites a datagram for a service address to a backend; recvmsg makes the
//! reply appear to come from the service address.

use aya_ebpf::{helpers::bpf_get_socket_cookie, programs::SockAddrContext, EbpfContext as _};
use weft_common::{RevNatKey, ServiceKey, SockAddr4, Stat, PROTO_UDP};

use crate::{
    connect::{pick_endpoint, port_from_ctx, port_to_ctx},
    maps::{count, SERVICES, UDP_REVNAT},
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
    // SAFETY: bpf_get_socket_cookie accepts a sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = UDP_REVNAT.insert(&RevNatKey { cookie, backend }, &dst, 0);
    sa.user_ip4 = backend.ip;
    sa.user_port = port_to_ctx(backend.port);
    count(Stat::UdpSendmsg);
    ALLOW
}

pub fn recvmsg4(ctx: &SockAddrContext) {
    // SAFETY: as in sendmsg4.
    let sa = unsafe { &mut *ctx.sock_addr };
    let backend = SockAddr4::new(sa.user_ip4, port_from_ctx(sa.user_port));
    // SAFETY: as in sendmsg4.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: LRU values are plain data.
    if let Some(svc) = unsafe { UDP_REVNAT.get(&RevNatKey { cookie, backend }) } {
        sa.user_ip4 = svc.ip;
        sa.user_port = port_to_ctx(svc.port);
    }
}

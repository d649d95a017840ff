//! sockops and sk_msg.
//!
//! sockops sees every TCP socket of the pods' cgroup subtree become established. For a
//! socket that connect4 redirected to the agent, it publishes the original destination
//! under the connection's client address (`ORIG_DST`), which is what the agent knows on
//! accept. With acceleration on, it also adds loopback sockets to `LOCAL_SOCKS`; the agent
//! adds its own ends of those connections from userspace. sk_msg then hands payload written on
//! one end straight to the other end's receive queue when both ends are in the map,
//! skipping the loopback TCP stack.

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{
        sk_action::SK_PASS, BPF_ANY, BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
    },
    helpers::{bpf_get_netns_cookie, bpf_sk_storage_delete, bpf_sk_storage_get},
    programs::{SkMsgContext, SockOpsContext},
    EbpfContext as _,
};
use weft_common::{settings, Captured, ConnKey, SockPairKey, Stat};

use crate::maps::{count, map_ptr, setting, CAPTURED, LOCAL_SOCKS, ORIG_DST};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

pub fn on_sock_op(ctx: &SockOpsContext) {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        publish_orig_dst(ctx);
        accelerate(ctx);
    } else if op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        accelerate(ctx);
    }
}

/// The socket's own and its peer's IPv4 address; for an IPv4-mapped IPv6 socket, the mapped
/// addresses. Every field is read unconditionally at a constant offset: the verifier
/// rejects a context access whose offset depends on a branch, which is what the compiler
/// makes of "read this field or that one".
fn addresses(ctx: &SockOpsContext) -> Option<(u32, u32)> {
    let ops = ctx.ops;
    // SAFETY: ops is the kernel's bpf_sock_ops for this call; the reads are in bounds.
    let (family, l4, r4, l6, r6) = unsafe {
        (
            read_volatile(&raw const (*ops).family),
            read_volatile(&raw const (*ops).local_ip4),
            read_volatile(&raw const (*ops).remote_ip4),
            read_volatile(&raw const (*ops).local_ip6[3]),
            read_volatile(&raw const (*ops).remote_ip6[3]),
        )
    };
    match family {
        AF_INET => Some((l4, r4)),
        AF_INET6 => Some((l6, r6)),
        _ => None,
    }
}

fn publish_orig_dst(ctx: &SockOpsContext) {
    // SAFETY: ctx.ops is the kernel's bpf_sock_ops for this call.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return;
    }
    // SAFETY: sk is this callback's full socket; the storage is plain data.
    let p = unsafe { bpf_sk_storage_get(map_ptr(&CAPTURED), sk.cast(), core::ptr::null_mut(), 0) }
        .cast::<Captured>();
    if p.is_null() {
        return;
    }
    // SAFETY: a non-null storage pointer is valid for the program's run.
    let captured = unsafe { *p };
    let Some((src_ip, _)) = addresses(ctx) else {
        return;
    };
    let key = ConnKey {
        netns_cookie: captured.netns_cookie,
        src_ip,
        src_port: ctx.local_port() as u16,
        _pad: 0,
    };
    let _ = ORIG_DST.insert(&key, &captured.orig, 0);
    // SAFETY: as above.
    unsafe { bpf_sk_storage_delete(map_ptr(&CAPTURED), sk.cast()) };
}

fn accelerate(ctx: &SockOpsContext) {
    if setting(settings::ACCELERATE) == 0 {
        return;
    }
    let Some((local_ip, remote_ip)) = addresses(ctx) else {
        return;
    };
    // Only loopback connections: app to agent (captured) and app to app inside a pod. Both
    // ends of those are in the map (the agent adds its own), so every byte takes the
    // redirect. A socket whose peer never joins the map must not get a psock: its data
    // would arrive on the normal queue of a psock socket, which blocking readers mishandle.
    if local_ip.to_ne_bytes()[0] != 127 || remote_ip.to_ne_bytes()[0] != 127 {
        return;
    }
    // SAFETY: bpf_get_netns_cookie accepts a sock_ops context.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let mut key = SockPairKey {
        netns_cookie,
        local_ip,
        remote_ip,
        local_port: ctx.local_port() as u16,
        // remote_port holds the network-order port in its upper 16 bits.
        remote_port: u32::from_be(ctx.remote_port()) as u16,
        _pad: 0,
    };
    // SAFETY: ctx.ops is the kernel's bpf_sock_ops for this call.
    let _ = LOCAL_SOCKS.update(&mut key, unsafe { &mut *ctx.ops }, BPF_ANY as u64);
}

pub fn on_msg(ctx: &SkMsgContext) -> u32 {
    // SAFETY: the kernel hands us a valid sk_msg_md for the program's lifetime.
    let md = unsafe { &*ctx.msg };
    if md.family != AF_INET {
        return SK_PASS;
    }
    // SAFETY: bpf_get_netns_cookie accepts an sk_msg context.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let me = SockPairKey {
        netns_cookie,
        local_ip: md.local_ip4,
        remote_ip: md.remote_ip4,
        local_port: md.local_port as u16,
        remote_port: u32::from_be(md.remote_port) as u16,
        _pad: 0,
    };
    // On a missing peer the helper returns SK_DROP without marking a redirect; passing the
    // message on then sends it through the normal TCP path, which is what we want.
    if LOCAL_SOCKS.redirect_msg(ctx, me.peer(), BPF_F_INGRESS as u64) == SK_PASS as i64 {
        count(Stat::MsgRedirect);
    }
    SK_PASS
}

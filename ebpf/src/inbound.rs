//! sk_lookup, attached to each enrolled pod's network namespace: a TCP connection that
//! arrives for the pod's IP, on any port (`INBOUND_PORTS` has the declared ports and port
//! 0, the wildcard), is handed to the agent's inbound listener in that namespace, before
//! the app sees it. The agent's own deliveries to the app, announced in `DELIVERIES`, are
//! let through.

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    programs::SkLookupContext,
};
use weft_common::{workload_flags, DeliveryKey, InboundKey, Stat, PROTO_TCP};

use crate::maps::{count, DELIVERIES, INBOUND_LSN, INBOUND_PORTS};

const AF_INET: u32 = 2;

pub fn steer(ctx: &SkLookupContext) -> u32 {
    // SAFETY: the kernel hands us a valid bpf_sk_lookup for the program's lifetime.
    let l = unsafe { &*ctx.lookup };
    if l.family != AF_INET || l.protocol != PROTO_TCP as u32 {
        return SK_PASS;
    }
    let key = InboundKey {
        ip: l.local_ip4,
        port: l.local_port as u16,
        _pad: 0,
    };
    let any_port = InboundKey { port: 0, ..key };
    // SAFETY: INBOUND_PORTS values are plain data written whole by the agent.
    let Some(port) = (unsafe { INBOUND_PORTS.get(&key) })
        .or_else(|| unsafe { INBOUND_PORTS.get(&any_port) })
        .copied()
    else {
        return SK_PASS;
    };
    let delivery = DeliveryKey {
        src_ip: l.remote_ip4,
        dst_ip: l.local_ip4,
        src_port: u16::from_be(l.remote_port),
        dst_port: l.local_port as u16,
    };
    // SAFETY: only the presence of the key matters. The agent removes the entry once its
    // connect ends: a retransmitted SYN (the first one met a full accept queue, or its
    // answer was lost) must reach the app too, never the agent's own inbound listener.
    if unsafe { DELIVERIES.get(&delivery) }.is_some() {
        return SK_PASS;
    }
    match INBOUND_LSN.redirect_sk_lookup(ctx, l.local_ip4, 0) {
        Ok(()) => {
            count(Stat::InboundCaptured);
            SK_PASS
        }
        Err(_) if port.flags & workload_flags::FAIL_OPEN != 0 => {
            count(Stat::InboundBypass);
            SK_PASS
        }
        Err(_) => {
            count(Stat::InboundRefused);
            SK_DROP
        }
    }
}

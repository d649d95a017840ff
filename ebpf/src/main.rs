//! weft's eBPF object: every program's entry point, each a thin wrapper that maps the
//! result of a named helper to a verdict. The logic lives in one module per kernel hook.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod connect;
#[cfg(target_arch = "bpf")]
mod inbound;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod sockops;
#[cfg(target_arch = "bpf")]
mod udp;

#[cfg(target_arch = "bpf")]
mod hooks {
    use crate::{connect, inbound, sockops, udp};
    use aya_ebpf::{
        macros::{cgroup_sock_addr, sk_lookup, sk_msg, sock_ops},
        programs::{SkLookupContext, SkMsgContext, SockAddrContext, SockOpsContext},
    };

    /// cgroup/connect4 verdicts: 1 lets the connect proceed (possibly rewritten), 0 refuses it
    /// with EPERM.
    const ALLOW: i32 = 1;

    #[cgroup_sock_addr(connect4)]
    pub fn weft_connect4(ctx: SockAddrContext) -> i32 {
        connect::connect4(&ctx)
    }

    #[cgroup_sock_addr(connect6)]
    pub fn weft_connect6(ctx: SockAddrContext) -> i32 {
        connect::connect6(&ctx)
    }

    #[cgroup_sock_addr(getpeername4)]
    pub fn weft_getpeername4(ctx: SockAddrContext) -> i32 {
        connect::getpeername4(&ctx);
        ALLOW
    }

    #[cgroup_sock_addr(getpeername6)]
    pub fn weft_getpeername6(ctx: SockAddrContext) -> i32 {
        connect::getpeername6(&ctx);
        ALLOW
    }

    #[cgroup_sock_addr(sendmsg4)]
    pub fn weft_sendmsg4(ctx: SockAddrContext) -> i32 {
        udp::sendmsg4(&ctx)
    }

    #[cgroup_sock_addr(recvmsg4)]
    pub fn weft_recvmsg4(ctx: SockAddrContext) -> i32 {
        udp::recvmsg4(&ctx);
        ALLOW
    }

    #[sock_ops]
    pub fn weft_sockops(ctx: SockOpsContext) -> u32 {
        sockops::on_sock_op(&ctx);
        // sock_ops return values are ignored for the callbacks we handle.
        1
    }

    #[sk_msg]
    pub fn weft_sk_msg(ctx: SkMsgContext) -> u32 {
        sockops::on_msg(&ctx)
    }

    #[sk_lookup]
    pub fn weft_sk_lookup(ctx: SkLookupContext) -> u32 {
        inbound::steer(&ctx)
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        // The verifier rejects any program that could reach this.
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 4] = *b"GPL\0";
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

//! XDP programs, the fast path: entry points only. A packet is translated
//! and redirected here, dropped, passed to the kernel, or passed untouched
//! to the TC program of the same NIC when finishing it needs the skb (a
//! possibly partial checksum, an unresolved neighbour, an MTU problem, MSS
//! clamping, an egress NIC that cannot take redirected XDP frames, and the
//! rare packets handled by tail-called programs).

use aya_ebpf::{
    EbpfContext,
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    macros::xdp,
    programs::XdpContext,
};
use nat_common::stats::{self, HOOK_XDP_EXT, HOOK_XDP_INT};

use crate::{
    forward,
    maps::config,
    nat::{self, XdpDecision},
    no_port,
    parse::{self, Frame},
    stats::count,
};

/// On `--int`: source NAT of outbound packets.
#[xdp]
pub fn nat_xdp_int(ctx: XdpContext) -> u32 {
    let (action, reason) = try_nat_xdp_int(&ctx);
    count(HOOK_XDP_INT, reason);
    action
}

/// On `--ext`: reverse translation of replies.
#[xdp]
pub fn nat_xdp_ext(ctx: XdpContext) -> u32 {
    let (action, reason) = try_nat_xdp_ext(&ctx);
    count(HOOK_XDP_EXT, reason);
    action
}

/// The XDP action and the reason to count.
#[inline(always)]
fn try_nat_xdp_int(ctx: &XdpContext) -> (u32, u32) {
    let cfg = config();
    let f = Frame::xdp(ctx);
    if !parse::for_us(f, &cfg.int_mac) {
        return (XDP_PASS, stats::PASS_OTHER_HOST);
    }
    let d = nat::outbound(ctx.as_ptr(), f, f.data_end - f.data, cfg, HOOK_XDP_INT);
    match d {
        XdpDecision::Translate(rw, route) => {
            forward::xdp(f, &rw, route, HOOK_XDP_INT, cfg.ext_ifindex)
        }
        // Out of ports: TC answers with ICMP (RFC 5508 REQ-8) unless the
        // rate limit is spent.
        XdpDecision::Drop(stats::DROP_NO_PORT) => no_port::xdp(cfg, HOOK_XDP_INT),
        XdpDecision::ToTc(r) | XdpDecision::Pass(r) => (XDP_PASS, r),
        XdpDecision::Drop(r) => (XDP_DROP, r),
    }
}

#[inline(always)]
fn try_nat_xdp_ext(ctx: &XdpContext) -> (u32, u32) {
    let cfg = config();
    let f = Frame::xdp(ctx);
    if !parse::for_us(f, &cfg.ext_mac) {
        return (XDP_PASS, stats::PASS_OTHER_HOST);
    }
    let d = nat::inbound(ctx.as_ptr(), f, f.data_end - f.data, cfg, HOOK_XDP_EXT);
    match d {
        XdpDecision::Translate(rw, route) => {
            forward::xdp(f, &rw, route, HOOK_XDP_EXT, cfg.int_ifindex)
        }
        XdpDecision::ToTc(r) | XdpDecision::Pass(r) => (XDP_PASS, r),
        XdpDecision::Drop(r) => (XDP_DROP, r),
    }
}

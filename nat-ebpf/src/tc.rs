//! TC ingress programs, the path for what XDP hands over: entry points
//! only. With the skb at hand, the checksum helpers know whether the L4
//! checksum is partial or complete, `bpf_redirect_neigh` resolves a missing
//! neighbour, and the MTU check understands GSO packets. The rare and heavy
//! cases go on to a tail-called program (tail.rs) with a stack of its own.

use aya_ebpf::{
    EbpfContext,
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use nat_common::{
    TAIL_FRAG_EXT, TAIL_FRAG_INT, TAIL_ICMP_ERROR_OUT,
    stats::{self, HOOK_TC_EXT, HOOK_TC_INT},
};

use crate::{
    forward, hairpin, icmp_err,
    maps::config,
    nat::{self, TcIn, TcOut},
    no_port,
    parse::{self, Frame},
    reset,
    stats::count,
    tail,
};

/// On `--int`: source NAT of what XDP handed over.
#[classifier]
pub fn nat_tc_int(ctx: TcContext) -> i32 {
    let (action, reason) = try_nat_tc_int(&ctx);
    count(HOOK_TC_INT, reason);
    action
}

/// On `--ext`: reverse translation of what XDP handed over.
#[classifier]
pub fn nat_tc_ext(ctx: TcContext) -> i32 {
    let (action, reason) = try_nat_tc_ext(&ctx);
    count(HOOK_TC_EXT, reason);
    action
}

/// The TC verdict and the reason to count (after a tail call, only reached
/// if its slot is empty).
#[inline(always)]
fn try_nat_tc_int(ctx: &TcContext) -> (i32, u32) {
    let cfg = config();
    let f = Frame::tc(ctx);
    if !parse::for_us(f, &cfg.int_mac) {
        return (TC_ACT_OK, stats::PASS_OTHER_HOST);
    }
    let d = nat::outbound(ctx.as_ptr(), f, ctx.len() as usize, cfg, HOOK_TC_INT);
    match d {
        TcOut::Translate(rw, route) => forward::tc(
            ctx,
            &rw,
            route,
            cfg.ext_ifindex,
            HOOK_TC_INT,
            stats::TC_OUT_FWD,
            cfg.mss_clamp,
        ),
        TcOut::Hairpin(rw) => hairpin::hand_over(ctx, &rw),
        TcOut::IcmpError => (TC_ACT_SHOT, tail::call(ctx, TAIL_ICMP_ERROR_OUT)),
        TcOut::Fragment => (TC_ACT_SHOT, tail::call(ctx, TAIL_FRAG_INT)),
        // Out of ports: the sender is told, if --int has an address to
        // tell it from (RFC 5508 REQ-8).
        TcOut::Drop(stats::DROP_NO_PORT) if cfg.int_addr != 0 => no_port::hand_over(ctx),
        // Denied by the egress policy with an answer (nat_common::policy).
        TcOut::Drop(stats::DROP_POLICY_PROHIBITED) if cfg.int_addr != 0 => {
            no_port::hand_over_policy(ctx)
        }
        TcOut::Drop(stats::DROP_POLICY_RESET) => reset::hand_over(ctx),
        TcOut::Pass(r) => (TC_ACT_OK, r),
        TcOut::Drop(r) => (TC_ACT_SHOT, r),
    }
}

#[inline(always)]
fn try_nat_tc_ext(ctx: &TcContext) -> (i32, u32) {
    let cfg = config();
    let f = Frame::tc(ctx);
    if !parse::for_us(f, &cfg.ext_mac) {
        return (TC_ACT_OK, stats::PASS_OTHER_HOST);
    }
    let d = nat::inbound(ctx.as_ptr(), f, ctx.len() as usize, cfg, HOOK_TC_EXT);
    match d {
        TcIn::Translate(rw, route) => forward::tc(
            ctx,
            &rw,
            route,
            cfg.int_ifindex,
            HOOK_TC_EXT,
            stats::TC_IN_FWD,
            cfg.mss_clamp,
        ),
        TcIn::IcmpError => icmp_err::inbound(ctx, f, cfg),
        TcIn::Fragment => (TC_ACT_SHOT, tail::call(ctx, TAIL_FRAG_EXT)),
        TcIn::Pass(r) => (TC_ACT_OK, r),
        TcIn::Drop(r) => (TC_ACT_SHOT, r),
    }
}

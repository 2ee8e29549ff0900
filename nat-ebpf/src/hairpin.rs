//! Hairpinning (RFC 4787 REQ-9, RFC 5382 REQ-8): an inside host sending to
//! another inside host's external endpoint (SNAT address, its port) reaches
//! it, and the receiver sees the sender's *external* endpoint, exactly as an
//! outside peer would.
//!
//! The packet is translated twice. `nat_tc_int` does the sender's half like
//! any outbound packet (session, binding, source rewrite, TTL); then it
//! tail-calls `nat_tc_hairpin` ([`hand_over`]), which does the receiver's
//! half here like any inbound packet (binding, filtering, destination
//! rewrite) and sends it back out of `--int`. Rare next to Internet
//! traffic, it takes the TC path only (XDP hands it over).

use aya_ebpf::{
    EbpfContext, bindings::TC_ACT_SHOT, helpers::bpf_ktime_get_ns, macros::classifier,
    programs::TcContext,
};
use nat_common::{
    CtKey, IPPROTO_TCP, TAIL_HAIRPIN,
    stats::{self, HOOK_TC_INT},
    tcp::{self, DIR_IN},
};

use crate::{
    conntrack, fib, forward,
    maps::config,
    parse::{self, ETH_HLEN, Frame, IP_DADDR},
    rewrite::{self, Rewrite},
    stats::count,
    tail,
};

/// Tail-called by `nat_tc_int` with a hairpinned packet whose source is
/// already translated: the receiver's half. Counts at `nat_tc_int`'s hook.
#[classifier]
pub fn nat_tc_hairpin(ctx: TcContext) -> i32 {
    let (action, reason) = match try_nat_tc_hairpin(&ctx) {
        Ok(r) => r,
        Err(reason) => (TC_ACT_SHOT, reason),
    };
    count(HOOK_TC_INT, reason);
    action
}

/// `nat_tc_int`'s part: the sender's half (`rw`: source, port and TTL),
/// then on to `nat_tc_hairpin`. Both halves in one program would not fit
/// in 512 bytes of stack. Returns only on failure, with the verdict and
/// the reason to count.
#[inline(always)]
pub fn hand_over(ctx: &TcContext, rw: &Rewrite) -> (i32, u32) {
    match rewrite::skb(ctx, rw) {
        Ok(()) => (TC_ACT_SHOT, tail::call(ctx, TAIL_HAIRPIN)),
        Err(_) => (TC_ACT_SHOT, stats::DROP_INTERNAL),
    }
}

/// The receiver's half of a hairpinned packet: source already the sender's
/// external endpoint, destination still the receiver's. Returns the
/// verdict and the reason to count, or the drop reason.
#[inline(always)]
fn try_nat_tc_hairpin(ctx: &TcContext) -> Result<(i32, u32), u32> {
    let cfg = config();
    let f = Frame::tc(ctx);
    let ip = parse::ipv4(f, ctx.len() as usize).map_err(|_| stats::DROP_MALFORMED)?;
    let l4 = parse::l4(f, &ip)?.ok_or(stats::DROP_UNSUPPORTED)?;
    let reply = CtKey::new(ip.proto, ip.saddr, l4.sport, ip.daddr, l4.dport);
    let now = unsafe { bpf_ktime_get_ns() };
    let (receiver, inside, inside_port) = match conntrack::inbound(&reply, cfg, now, l4.tcp_flags) {
        Ok((s, addr, port, event)) => {
            if let Some(e) = event {
                count(HOOK_TC_INT, e);
            }
            (s, addr, port)
        }
        // The binding went away between the two halves.
        Err(None) => return Err(stats::DROP_UNSOLICITED),
        Err(Some(reason)) => return Err(reason),
    };
    conntrack::touch(receiver, now, ip.proto, DIR_IN, cfg);
    if ip.proto == IPPROTO_TCP && tcp::is_control(l4.tcp_flags) {
        conntrack::tcp_update(receiver, DIR_IN, l4.tcp_flags);
    }
    // No source address: the packet's is now the SNAT address, whose
    // policy rule would send the lookup to --ext's table.
    let route = fib::lookup(
        ctx.as_ptr(),
        cfg.int_ifindex,
        ip.proto,
        0,
        l4.sport,
        inside,
        inside_port,
        0,
    );
    let rw = Rewrite {
        proto: ip.proto,
        addr_off: ETH_HLEN + IP_DADDR,
        old_addr: ip.daddr,
        new_addr: inside,
        dir: DIR_IN,
        l4_off: ip.l4_off,
        old_port: l4.dport,
        new_port: inside_port,
        l4_check: l4.check,
        ttl: ip.ttl,
        df: ip.df,
    };
    forward::send(
        ctx,
        forward::egress(route, cfg.int_ifindex),
        stats::TC_HAIRPIN_FWD,
        (HOOK_TC_INT, ip.proto),
        || rewrite::addr_port(ctx, &rw),
        |_, _| {},
    )
}

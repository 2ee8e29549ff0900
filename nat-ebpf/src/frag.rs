//! IP fragments (RFC 4787 REQ-14): a UDP or ICMP datagram fragmented on the
//! way is translated fragment by fragment, without reassembly.
//!
//! Only the first fragment (offset 0) carries the L4 header. It is
//! translated like a whole packet by the common path (nat.rs, with
//! `Hook::TcFragment`): its L4 checksum covers the whole datagram, and the
//! incremental update (RFC 1624) depends only on the fields that change.
//! A following fragment needs only its address rewritten:
//!
//! - **Outbound** (`--int`): the new source is always the SNAT address,
//!   so following fragments are translated in any order, before or after
//!   their first fragment, with no state at all.
//! - **Inbound** (`--ext`): the inside address is known only from the
//!   first fragment's ports, so translating it records the datagram in
//!   `FRAG_TRACK` (key: source, destination, IP identification, protocol),
//!   and following fragments look it up. One that arrives before its first
//!   fragment, or whose entry the LRU table evicted, cannot be translated:
//!   addressed to the gateway, it goes to the kernel, which reassembles the
//!   gateway's own traffic and discards the rest after `ipfrag_time`.
//!
//! Both programs are tail-called by the TC programs (XDP hands fragments
//! to TC): each gets a 512-byte stack of its own.

use aya_ebpf::{
    EbpfContext,
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    cty::c_void,
    helpers::{bpf_ktime_get_ns, bpf_redirect},
    macros::classifier,
    programs::TcContext,
};
use nat_common::{FragKey, FragValue, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, NatConfig, stats};

use crate::{
    fib::{self, Route},
    maps::{FRAG_TRACK, config},
    nat::{self, Decision, Egress, Hook},
    parse::{self, ETH_HLEN, FRAG_OFFSET, IP_CHECK, IP_DADDR, IP_ID, IP_SADDR, Ipv4},
    stats::{HOOK_TC_EXT, HOOK_TC_INT, count},
    tc,
};

/// How long a tracking entry is trusted: Linux's default `ipfrag_time`.
/// Receivers discard a datagram not complete by then, so an older entry
/// can only misdirect a later datagram that reuses the identification.
const FRAG_TIMEOUT_NS: u64 = 30 * 1_000_000_000;

/// Fragments from `--int`: source NAT.
#[classifier]
pub fn nat_tc_frag_int(ctx: TcContext) -> i32 {
    let cfg = config();
    let f = tc::pull(&ctx);
    let ip = match parse::ipv4(f, ctx.len() as usize) {
        Ok(ip) => ip,
        Err(_) => return verdict(HOOK_TC_INT, TC_ACT_SHOT, stats::DROP_MALFORMED),
    };
    // To the SNAT address: the gateway's own (a hairpinned datagram is
    // not translated in fragments).
    if ip.daddr == cfg.snat_addr {
        return verdict(HOOK_TC_INT, TC_ACT_OK, stats::PASS_LOCAL);
    }
    if ip.frag & FRAG_OFFSET == 0 {
        let d = nat::outbound(
            ctx.as_ptr(),
            f,
            ctx.len() as usize,
            &cfg,
            Hook::TcFragment,
            HOOK_TC_INT,
        );
        return tc::finish(
            &ctx,
            d,
            cfg.ext_ifindex,
            HOOK_TC_INT,
            stats::TC_FRAG_FIRST_FWD,
        );
    }
    let (action, reason) = following_out(&ctx, &ip, &cfg);
    verdict(HOOK_TC_INT, action, reason)
}

/// Fragments from `--ext`: reverse translation.
#[classifier]
pub fn nat_tc_frag_ext(ctx: TcContext) -> i32 {
    let cfg = config();
    let f = tc::pull(&ctx);
    let ip = match parse::ipv4(f, ctx.len() as usize) {
        Ok(ip) => ip,
        Err(_) => return verdict(HOOK_TC_EXT, TC_ACT_SHOT, stats::DROP_MALFORMED),
    };
    let Some(id) = parse::read::<u16>(f, ETH_HLEN + IP_ID) else {
        return verdict(HOOK_TC_EXT, TC_ACT_SHOT, stats::DROP_MALFORMED);
    };
    let key = FragKey {
        src_addr: ip.saddr,
        dst_addr: ip.daddr,
        id,
        proto: ip.proto,
        _pad: 0,
    };
    if ip.frag & FRAG_OFFSET == 0 {
        let d = nat::inbound(
            ctx.as_ptr(),
            f,
            ctx.len() as usize,
            &cfg,
            Hook::TcFragment,
            HOOK_TC_EXT,
        );
        match &d {
            Decision::Translate(rw, _) => {
                let v = FragValue {
                    inside_addr: rw.new_addr,
                    _pad: 0,
                    first_seen_ns: unsafe { bpf_ktime_get_ns() },
                };
                // Replaces the entry of an earlier datagram with the same
                // identification.
                if FRAG_TRACK.insert(key, v, 0).is_ok() {
                    count(HOOK_TC_EXT, stats::EV_FRAG_TRACKED);
                }
            }
            // A fragmented ICMP error is not translated.
            Decision::IcmpErrorIn => {
                return verdict(HOOK_TC_EXT, TC_ACT_SHOT, stats::DROP_FRAGMENT);
            }
            _ => {}
        }
        return tc::finish(
            &ctx,
            d,
            cfg.int_ifindex,
            HOOK_TC_EXT,
            stats::TC_FRAG_FIRST_FWD,
        );
    }
    let (action, reason) = following_in(&ctx, &ip, &key, &cfg);
    verdict(HOOK_TC_EXT, action, reason)
}

#[inline(always)]
fn verdict(hook: u32, action: i32, reason: u32) -> i32 {
    count(hook, reason);
    action
}

#[inline(always)]
fn translatable(proto: u8) -> bool {
    matches!(proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_ICMP)
}

/// A following outbound fragment: to the SNAT address, if its datagram
/// is one the gateway translates (the same checks as a new flow's).
#[inline(always)]
fn following_out(ctx: &TcContext, ip: &Ipv4, cfg: &NatConfig) -> (i32, u32) {
    let c = ctx.as_ptr();
    let local_or = |reason: u32| {
        if fib::is_local(c, cfg.int_ifindex, ip.saddr, ip.daddr) {
            (TC_ACT_OK, stats::PASS_LOCAL)
        } else {
            (TC_ACT_SHOT, reason)
        }
    };
    if !translatable(ip.proto) {
        return local_or(stats::DROP_FRAGMENT);
    }
    match fib::lookup(c, cfg.int_ifindex, ip.proto, ip.saddr, 0, ip.daddr, 0, 0) {
        Route::Local => return (TC_ACT_OK, stats::PASS_LOCAL),
        Route::Unreachable => return (TC_ACT_SHOT, stats::DROP_NO_ROUTE),
        Route::Resolved { ifindex, .. }
        | Route::NoNeigh { ifindex, .. }
        | Route::FragNeeded { ifindex } => {
            if ifindex != cfg.ext_ifindex {
                return (TC_ACT_OK, stats::PASS_NOT_TO_EXT);
            }
        }
        Route::Other | Route::Hairpin => return (TC_ACT_OK, stats::PASS_NOT_TO_EXT),
    }
    if ip.ttl <= 1 {
        return (TC_ACT_OK, stats::PASS_TTL_EXPIRED);
    }
    let route = fib::lookup(
        c,
        cfg.int_ifindex,
        ip.proto,
        cfg.snat_addr,
        0,
        ip.daddr,
        0,
        0,
    );
    let rw = AddrRewrite {
        off: ETH_HLEN + IP_SADDR,
        old: ip.saddr,
        new: cfg.snat_addr,
        ttl: ip.ttl,
    };
    forward(ctx, &rw, route, cfg.ext_ifindex)
}

/// A following inbound fragment: to the inside address its first fragment
/// was translated to.
#[inline(always)]
fn following_in(ctx: &TcContext, ip: &Ipv4, key: &FragKey, cfg: &NatConfig) -> (i32, u32) {
    let c: *mut c_void = ctx.as_ptr();
    let now = unsafe { bpf_ktime_get_ns() };
    let inside = match unsafe { FRAG_TRACK.get(key) } {
        Some(v) if now.saturating_sub(v.first_seen_ns) <= FRAG_TIMEOUT_NS => v.inside_addr,
        _ => {
            return if fib::is_local(c, cfg.ext_ifindex, ip.saddr, ip.daddr) {
                // The gateway's own datagram, or one whose first fragment
                // has not come or was forgotten: the kernel reassembles the
                // former and discards the latter after ipfrag_time.
                (TC_ACT_OK, stats::PASS_FRAG_UNTRACKED)
            } else {
                (TC_ACT_SHOT, stats::DROP_FRAG_UNTRACKED)
            };
        }
    };
    if ip.ttl <= 1 {
        return (TC_ACT_SHOT, stats::DROP_TTL_EXPIRED);
    }
    let route = fib::lookup(c, cfg.ext_ifindex, ip.proto, ip.saddr, 0, inside, 0, 0);
    let rw = AddrRewrite {
        off: ETH_HLEN + IP_DADDR,
        old: ip.daddr,
        new: inside,
        ttl: ip.ttl,
    };
    forward(ctx, &rw, route, cfg.int_ifindex)
}

/// One IP address, the TTL and the IP checksum: all a following fragment
/// needs.
struct AddrRewrite {
    off: usize,
    old: u32,
    new: u32,
    ttl: u8,
}

#[inline(always)]
fn rewrite(ctx: &TcContext, rw: &AddrRewrite) -> Result<(), i64> {
    ctx.store(rw.off, &rw.new, 0)?;
    ctx.l3_csum_replace(ETH_HLEN + IP_CHECK, rw.old as u64, rw.new as u64, 4)?;
    tc::decrement_ttl(ctx, rw.ttl)
}

#[inline(always)]
fn forward(ctx: &TcContext, rw: &AddrRewrite, route: Route, egress_if: u32) -> (i32, u32) {
    let fwd = stats::TC_FRAG_FWD;
    match nat::egress(route, egress_if) {
        Egress::Redirect {
            ifindex,
            smac,
            dmac,
        } => match rewrite(ctx, rw).and_then(|()| tc::macs(ctx, smac, dmac)) {
            Ok(()) => (unsafe { bpf_redirect(ifindex, 0) } as i32, fwd),
            Err(_) => (TC_ACT_SHOT, stats::DROP_INTERNAL),
        },
        Egress::Neigh { ifindex, nexthop } => match rewrite(ctx, rw) {
            Ok(()) => (tc::redirect_neigh(ifindex, nexthop), fwd),
            Err(_) => (TC_ACT_SHOT, stats::DROP_INTERNAL),
        },
        // A fragment too big for the egress link would need fragmenting
        // again.
        Egress::TooBig => (TC_ACT_SHOT, stats::DROP_TOO_BIG),
        Egress::Hairpin => (TC_ACT_SHOT, stats::DROP_INTERNAL),
        Egress::Pass(r) => (TC_ACT_OK, r),
        Egress::Drop(r) => (TC_ACT_SHOT, r),
    }
}

//! IP fragments (RFC 4787 REQ-14): a UDP or ICMP datagram fragmented on the
//! way is translated fragment by fragment, without reassembly.
//!
//! Only the first fragment (offset 0) carries the L4 header. It is
//! translated like a whole packet by the common path (nat.rs, with the
//! [`FirstFragment`] decision, then `forward::tc`): its L4 checksum covers
//! the whole datagram, and the incremental update (RFC 1624) depends only
//! on the fields that change.
//! A following fragment needs only its address rewritten:
//!
//! - **Outbound** (`--int`): the new source is always the SNAT address,
//!   so following fragments are translated in any order, before or after
//!   their first fragment, with no state at all.
//! - **Inbound** (`--ext`): the inside address is known only from the
//!   first fragment's ports, so translating it records the datagram in
//!   `FRAG_TRACK` (key: source, destination, IP identification, protocol;
//!   for a datagram of the gateway's own, its own address: the following
//!   fragments go to the kernel too), and following fragments look it up.
//!   One that comes before its first fragment is *held*: a copy goes into
//!   `FRAG_HELD` and the packet is dropped. When the first fragment comes,
//!   it and the held fragments are re-injected on `--ext` with
//!   `bpf_clone_redirect(BPF_F_INGRESS)` (the packet is rewritten into
//!   each held frame in turn); they come back through this program in that
//!   order, the first is translated and tracked, the others then translated
//!   as tracked fragments. A program cannot keep a packet, but it can keep
//!   its bytes and make a packet again.
//!
//! Memory is bounded: both maps are LRU (`--max-fragments` datagrams, a
//! quarter of that in held fragments); a held fragment forgotten for lack
//! of room is counted when its first fragment comes (`drop_fragment_budget`,
//! RFC 4787 REQ-14a).
//!
//! Both programs are tail-called by the TC programs (XDP hands fragments
//! to TC): each gets a 512-byte stack of its own. Following fragments
//! leave through `forward::send`, like every packet TC rewrites.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_INGRESS, BPF_F_RECOMPUTE_CSUM, TC_ACT_OK, TC_ACT_SHOT},
    cty::c_void,
    helpers::{bpf_ktime_get_ns, bpf_skb_change_tail, bpf_skb_load_bytes, bpf_skb_store_bytes},
    macros::classifier,
    programs::TcContext,
};
use nat_common::{
    FRAG_HELD_LEN, FRAG_HELD_MAX, FragKey, FragSlot, FragValue, IPPROTO_ICMP, IPPROTO_TCP,
    IPPROTO_UDP, NatConfig, TAIL_ICMP_ERROR_OUT,
    stats::{self, HOOK_TC_EXT, HOOK_TC_INT},
};

use crate::{
    fib::{self, Route},
    forward,
    maps::{FRAG_HELD, FRAG_SCRATCH, FRAG_TRACK, config},
    nat::{self, FirstFragment},
    parse::{self, ETH_HLEN, FRAG_OFFSET, Frame, IP_DADDR, IP_ID, IP_SADDR, Ipv4},
    pool, rewrite,
    stats::count,
    tail,
};

/// How long a tracking entry is trusted: Linux's default `ipfrag_time`.
/// Receivers discard a datagram not complete by then, so an older entry
/// can only misdirect a later datagram that reuses the identification.
const FRAG_TIMEOUT_NS: u64 = 30 * 1_000_000_000;

/// Fragments from `--int`: source NAT. Tail-called by `nat_tc_int`;
/// counts at its hook.
#[classifier]
pub fn nat_tc_frag_int(ctx: TcContext) -> i32 {
    let (action, reason) = try_nat_tc_frag_int(&ctx);
    count(HOOK_TC_INT, reason);
    action
}

/// Fragments from `--ext`: reverse translation. Tail-called by
/// `nat_tc_ext`; counts at its hook.
#[classifier]
pub fn nat_tc_frag_ext(ctx: TcContext) -> i32 {
    let (action, reason) = try_nat_tc_frag_ext(&ctx);
    count(HOOK_TC_EXT, reason);
    action
}

/// The verdict and the reason to count.
#[inline(always)]
fn try_nat_tc_frag_int(ctx: &TcContext) -> (i32, u32) {
    let cfg = config();
    let f = Frame::tc(ctx);
    let ip = match parse::ipv4(f, ctx.len() as usize) {
        Ok(ip) => ip,
        Err(_) => return (TC_ACT_SHOT, stats::DROP_MALFORMED),
    };
    // To a pool address: the gateway's own (a hairpinned datagram is
    // not translated in fragments).
    if pool::may_own(ip.daddr) {
        return (TC_ACT_OK, stats::PASS_LOCAL);
    }
    if ip.frag & FRAG_OFFSET != 0 {
        return following_out(ctx, &ip, cfg);
    }
    let d = nat::outbound(ctx.as_ptr(), f, ctx.len() as usize, cfg, HOOK_TC_INT);
    match d {
        FirstFragment::Translate(rw, route) => forward::tc(
            ctx,
            &rw,
            route,
            cfg.ext_ifindex,
            HOOK_TC_INT,
            stats::TC_FRAG_FIRST_FWD,
            // A fragmented SYN is not worth a clamp.
            0,
        ),
        FirstFragment::IcmpError => (TC_ACT_SHOT, tail::call(ctx, TAIL_ICMP_ERROR_OUT)),
        FirstFragment::Pass(r) => (TC_ACT_OK, r),
        FirstFragment::Drop(r) => (TC_ACT_SHOT, r),
    }
}

#[inline(always)]
fn try_nat_tc_frag_ext(ctx: &TcContext) -> (i32, u32) {
    let cfg = config();
    let f = Frame::tc(ctx);
    let ip = match parse::ipv4(f, ctx.len() as usize) {
        Ok(ip) => ip,
        Err(_) => return (TC_ACT_SHOT, stats::DROP_MALFORMED),
    };
    let Some(id) = parse::read::<u16>(f, ETH_HLEN + IP_ID) else {
        return (TC_ACT_SHOT, stats::DROP_MALFORMED);
    };
    let key = FragKey {
        src_addr: ip.saddr,
        dst_addr: ip.daddr,
        id,
        proto: ip.proto,
        _pad: 0,
    };
    let now = unsafe { bpf_ktime_get_ns() };
    // Fragments that came ahead of this datagram's first one.
    let held = match unsafe { FRAG_TRACK.get(key) } {
        Some(v) if v.inside_addr == 0 && fresh(v, now) => v.held,
        _ => 0,
    };
    if ip.frag & FRAG_OFFSET != 0 {
        return following_in(ctx, &ip, &key, now, cfg);
    }
    if held > 0 {
        // The first fragment of held ones: it and they go round again,
        // re-injected on --ext in that order (one backlog queue, so they
        // come back in it): it is translated and tracked like any first
        // fragment, then they are translated as tracked ones.
        let v = FragValue {
            inside_addr: 0,
            held: 0,
            first_seen_ns: now,
        };
        let _ = FRAG_TRACK.insert(key, v, 0);
        return (TC_ACT_SHOT, reinject(ctx, &key, held, cfg.ext_ifindex));
    }
    let d = nat::inbound(ctx.as_ptr(), f, ctx.len() as usize, cfg, HOOK_TC_EXT);
    match d {
        FirstFragment::Translate(rw, route) => {
            track(&key, rw.new_addr, now);
            forward::tc(
                ctx,
                &rw,
                route,
                cfg.int_ifindex,
                HOOK_TC_EXT,
                stats::TC_FRAG_FIRST_FWD,
                0,
            )
        }
        // The gateway's own datagram: its following fragments go to the
        // kernel too.
        FirstFragment::Pass(r) => {
            track(&key, ip.daddr, now);
            (TC_ACT_OK, r)
        }
        // A fragmented ICMP error is not translated.
        FirstFragment::IcmpError => (TC_ACT_SHOT, stats::DROP_FRAGMENT),
        FirstFragment::Drop(r) => (TC_ACT_SHOT, r),
    }
}

#[inline(always)]
fn fresh(v: &FragValue, now: u64) -> bool {
    now.saturating_sub(v.first_seen_ns) <= FRAG_TIMEOUT_NS
}

/// Records where a datagram's following fragments go.
#[inline(always)]
fn track(key: &FragKey, inside_addr: u32, now: u64) {
    let v = FragValue {
        inside_addr,
        held: 0,
        first_seen_ns: now,
    };
    // Replaces the entry of an earlier datagram with the same
    // identification.
    if FRAG_TRACK.insert(key, v, 0).is_ok() {
        count(HOOK_TC_EXT, stats::EV_FRAG_TRACKED);
    }
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
        Route::Other => return (TC_ACT_OK, stats::PASS_NOT_TO_EXT),
    }
    if ip.ttl <= 1 {
        return (TC_ACT_OK, stats::PASS_TTL_EXPIRED);
    }
    // The inside host's paired address, as its first fragment got.
    let snat = match pool::pick(ip.saddr) {
        Ok((_, a)) => a,
        Err(reason) => return (TC_ACT_SHOT, reason),
    };
    let route = fib::lookup(c, cfg.int_ifindex, ip.proto, snat, 0, ip.daddr, 0, 0);
    let rw = AddrRewrite {
        off: ETH_HLEN + IP_SADDR,
        old: ip.saddr,
        new: snat,
        ttl: ip.ttl,
    };
    forward_following(ctx, &rw, route, cfg.ext_ifindex, (HOOK_TC_INT, ip.proto))
}

/// A following inbound fragment: to the inside address its first fragment
/// was translated to, or held until that comes.
#[inline(always)]
fn following_in(
    ctx: &TcContext,
    ip: &Ipv4,
    key: &FragKey,
    now: u64,
    cfg: &NatConfig,
) -> (i32, u32) {
    let c: *mut c_void = ctx.as_ptr();
    let (inside, held) = match unsafe { FRAG_TRACK.get(key) } {
        Some(v) if fresh(v, now) => (v.inside_addr, v.held),
        _ => (0, 0),
    };
    if inside == ip.daddr {
        // Of the gateway's own datagram.
        return (TC_ACT_OK, stats::PASS_LOCAL);
    }
    if inside == 0 {
        if !pool::may_own(ip.daddr) {
            return if fib::is_local(c, cfg.ext_ifindex, ip.saddr, ip.daddr) {
                (TC_ACT_OK, stats::PASS_LOCAL)
            } else {
                (TC_ACT_SHOT, stats::DROP_FRAG_UNTRACKED)
            };
        }
        return hold(ctx, key, held, now);
    }
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
    forward_following(ctx, &rw, route, cfg.int_ifindex, (HOOK_TC_EXT, ip.proto))
}

/// Keeps a copy of a fragment that came before its first fragment (the
/// `held`th of its datagram) and drops the packet. Without room, it goes
/// to the kernel, which discards it unless it completes a datagram of the
/// gateway's own.
#[inline(always)]
fn hold(ctx: &TcContext, key: &FragKey, held: u32, now: u64) -> (i32, u32) {
    let untracked = (TC_ACT_OK, stats::PASS_FRAG_UNTRACKED);
    let len = ctx.len();
    if held >= FRAG_HELD_MAX || len == 0 || len as usize > FRAG_HELD_LEN {
        return untracked;
    }
    let Some(scratch) = FRAG_SCRATCH.get_ptr_mut(0) else {
        return untracked;
    };
    // SAFETY: a map value of FRAG_HELD_LEN bytes; size is at most that.
    let rc = unsafe {
        bpf_skb_load_bytes(
            ctx.as_ptr() as *const _,
            0,
            (*scratch).data.as_mut_ptr() as *mut c_void,
            proven_len(len),
        )
    };
    if rc < 0 {
        return untracked;
    }
    unsafe { (*scratch).len = len };
    let slot = FragSlot {
        key: *key,
        index: held,
    };
    // SAFETY: scratch is a valid map value. By reference: a copy would
    // put 2 KiB on the 512-byte stack.
    #[allow(clippy::needless_borrows_for_generic_args)]
    if FRAG_HELD.insert(slot, unsafe { &*scratch }, 0).is_err() {
        return untracked;
    }
    let v = FragValue {
        inside_addr: 0,
        held: held + 1,
        first_seen_ns: now,
    };
    if FRAG_TRACK.insert(key, v, 0).is_err() {
        return untracked;
    }
    (TC_ACT_SHOT, stats::TC_FRAG_HELD)
}

/// `len` (already checked to be in 1..=FRAG_HELD_LEN) in a form the
/// verifier can bound: the compiler, knowing the range, would fold a mask
/// away, so it forgets the value first.
#[inline(always)]
fn proven_len(len: u32) -> u32 {
    let opaque = unsafe { core::ptr::read_volatile(&(len as u64)) };
    (((opaque.wrapping_sub(1)) & (FRAG_HELD_LEN as u64 - 1)) + 1) as u32
}

/// Re-injects the packet on `--ext`, then turns it into each fragment held
/// for its datagram in turn (in the order they came) and re-injects that.
#[inline(always)]
fn reinject(ctx: &TcContext, key: &FragKey, held: u32, ext_ifindex: u32) -> u32 {
    let ingress = BPF_F_INGRESS as u64;
    let reason = match ctx.clone_redirect(ext_ifindex, ingress) {
        Ok(()) => stats::TC_FRAG_REINJECTED,
        Err(_) => stats::DROP_INTERNAL,
    };
    for index in 0..FRAG_HELD_MAX {
        if index >= held {
            break;
        }
        let slot = FragSlot { key: *key, index };
        count(HOOK_TC_EXT, reinject_held(ctx, &slot, ext_ifindex));
        let _ = FRAG_HELD.remove(slot);
    }
    reason
}

/// Re-injects one held fragment; returns the event to count for it (its
/// verdict was `tc_fragment_held`; the first fragment's is `reinject`'s).
#[inline(always)]
fn reinject_held(ctx: &TcContext, slot: &FragSlot, ext_ifindex: u32) -> u32 {
    let Some(h) = FRAG_HELD.get_ptr(slot) else {
        return stats::DROP_FRAG_BUDGET;
    };
    let len = unsafe { (*h).len };
    if len < (ETH_HLEN + 20) as u32 || len as usize > FRAG_HELD_LEN {
        return stats::EV_HELD_FRAG_LOST;
    }
    let skb = ctx.as_ptr() as *mut _;
    // SAFETY: the map value holds FRAG_HELD_LEN bytes; size is at most that.
    let rc = unsafe {
        let rc = bpf_skb_change_tail(skb, len, 0);
        if rc < 0 {
            rc
        } else {
            bpf_skb_store_bytes(
                skb,
                0,
                (*h).data.as_ptr() as *const c_void,
                proven_len(len),
                BPF_F_RECOMPUTE_CSUM as u64,
            )
        }
    };
    if rc < 0 {
        return stats::EV_HELD_FRAG_LOST;
    }
    match ctx.clone_redirect(ext_ifindex, BPF_F_INGRESS as u64) {
        Ok(()) => stats::EV_HELD_FRAG_REINJECTED,
        Err(_) => stats::EV_HELD_FRAG_LOST,
    }
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
    rewrite::ip_addr(ctx, rw.off, rw.old, rw.new)?;
    rewrite::decrement_ttl(ctx, rw.ttl)
}

/// Sends a following fragment on (a fragment too big for the egress link
/// would need fragmenting again: dropped).
#[inline(always)]
fn forward_following(
    ctx: &TcContext,
    rw: &AddrRewrite,
    route: Route,
    egress_if: u32,
    traffic: (u32, u8),
) -> (i32, u32) {
    let egress = forward::egress(route, egress_if);
    match forward::send(
        ctx,
        egress,
        stats::TC_FRAG_FWD,
        traffic,
        || rewrite(ctx, rw),
        |_, _| {},
    ) {
        Ok(r) => r,
        Err(reason) => (TC_ACT_SHOT, reason),
    }
}

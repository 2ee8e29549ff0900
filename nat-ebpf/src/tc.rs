//! TC ingress programs: the path for what XDP hands over. With the skb at
//! hand, the checksum helpers know whether the L4 checksum is partial or
//! complete, `bpf_redirect_neigh` resolves a missing neighbour, and the MTU
//! check understands GSO packets.

use aya_ebpf::{
    EbpfContext,
    bindings::{TC_ACT_OK, TC_ACT_SHOT, bpf_redir_neigh},
    helpers::{bpf_check_mtu, bpf_redirect, bpf_redirect_neigh},
    macros::classifier,
    programs::TcContext,
};
use nat_common::stats;
use nat_common::stats::{HOOK_TC_EXT, HOOK_TC_INT};

use crate::{
    hairpin, icmp_err,
    maps::config,
    mss,
    nat::{self, Decision, Egress, Hook},
    no_port,
    parse::{self, Frame},
    rewrite::{self, Rewrite},
    stats::count,
    tail::{self, MssHandOver},
};

const AF_INET: u32 = 2;

/// On `--int`: source NAT of what XDP handed over.
#[classifier]
pub fn nat_tc_int(ctx: TcContext) -> i32 {
    let cfg = config();
    let f = Frame::tc(&ctx);
    if !parse::for_us(f, &cfg.int_mac) {
        count(HOOK_TC_INT, stats::PASS_OTHER_HOST);
        return TC_ACT_OK;
    }
    let d = nat::outbound(
        ctx.as_ptr(),
        f,
        ctx.len() as usize,
        cfg,
        Hook::Tc,
        HOOK_TC_INT,
    );
    if let Decision::Drop(stats::DROP_NO_PORT) = d
        && cfg.int_addr != 0
    {
        count(HOOK_TC_INT, stats::DROP_NO_PORT);
        // The ICMP error is built by a program of its own: this one is
        // near the 512-byte stack limit, and the generator's header buffer
        // and checksum loops get a stack (and a verifier walk) of their own.
        count(HOOK_TC_INT, tail::call(&ctx, nat_common::TAIL_NO_PORT));
        return TC_ACT_SHOT;
    }
    finish(
        &ctx,
        d,
        cfg.ext_ifindex,
        HOOK_TC_INT,
        stats::TC_OUT_FWD,
        cfg.mss_clamp,
    )
}

/// Tail-called by `nat_tc_int` with a packet of a new flow that found no
/// free external port: it goes back to its sender as an ICMP Destination
/// Unreachable, code 13 (RFC 5508 REQ-8), rate-limited.
#[classifier]
pub fn nat_tc_no_port(ctx: TcContext) -> i32 {
    let cfg = config();
    let f = Frame::tc(&ctx);
    let (action, event) = no_port::answer(&ctx, f, cfg);
    if let Some(e) = event {
        count(HOOK_TC_INT, e);
    }
    action
}

/// Tail-called by `nat_tc_int` with an ICMP error from inside.
#[classifier]
pub fn nat_tc_icmp_out(ctx: TcContext) -> i32 {
    let cfg = config();
    let f = Frame::tc(&ctx);
    let (action, reason) = match parse::ipv4(f, ctx.len() as usize) {
        Ok(ip) => icmp_err::outbound(&ctx, &ip, cfg),
        Err(_) => (TC_ACT_SHOT, stats::DROP_MALFORMED),
    };
    count(HOOK_TC_INT, reason);
    action
}

/// Tail-called by `nat_tc_int` with a hairpinned packet whose source is
/// already translated: the receiver's half.
#[classifier]
pub fn nat_tc_hairpin(ctx: TcContext) -> i32 {
    let cfg = config();
    let f = Frame::tc(&ctx);
    let (action, reason) = hairpin::translate(&ctx, f, cfg);
    count(HOOK_TC_INT, reason);
    action
}

/// Tail-called by `nat_tc_int` and `nat_tc_ext` with a translated SYN or
/// SYN-ACK when `--mss-clamp` is on: clamps its MSS option and forwards it.
#[classifier]
pub fn nat_tc_mss(ctx: TcContext) -> i32 {
    let cfg = config();
    let (action, reason, event, hook) = mss::finish(&ctx, cfg.mss_clamp);
    // The hook came through the control buffer: only the two TC ones.
    let hook = if hook == HOOK_TC_EXT {
        HOOK_TC_EXT
    } else {
        HOOK_TC_INT
    };
    if let Some(e) = event {
        count(hook, e);
    }
    count(hook, reason);
    action
}

/// On `--ext`: reverse translation of what XDP handed over.
#[classifier]
pub fn nat_tc_ext(ctx: TcContext) -> i32 {
    let cfg = config();
    let f = Frame::tc(&ctx);
    if !parse::for_us(f, &cfg.ext_mac) {
        count(HOOK_TC_EXT, stats::PASS_OTHER_HOST);
        return TC_ACT_OK;
    }
    let d = nat::inbound(
        ctx.as_ptr(),
        f,
        ctx.len() as usize,
        cfg,
        Hook::Tc,
        HOOK_TC_EXT,
    );
    if let Decision::IcmpErrorIn = d {
        // Parsed again rather than carried in the decision: a bigger
        // Decision makes the compiler copy undefined enum fields, which
        // the verifier rejects.
        let (action, reason) = match parse::ipv4(f, ctx.len() as usize) {
            Ok(ip) => icmp_err::inbound(&ctx, &ip, cfg),
            Err(_) => (TC_ACT_SHOT, stats::DROP_MALFORMED),
        };
        count(HOOK_TC_EXT, reason);
        return action;
    }
    finish(
        &ctx,
        d,
        cfg.int_ifindex,
        HOOK_TC_EXT,
        stats::TC_IN_FWD,
        cfg.mss_clamp,
    )
}

#[inline(always)]
pub fn finish(
    ctx: &TcContext,
    d: Decision,
    egress_if: u32,
    hook: u32,
    fwd_reason: u32,
    mss_clamp: u16,
) -> i32 {
    let (action, reason) = match d {
        Decision::Pass(r) => (TC_ACT_OK, r),
        Decision::Drop(r) => (TC_ACT_SHOT, r),
        // Never produced for TC.
        Decision::ToTc(_) => (TC_ACT_OK, stats::DROP_INTERNAL),
        // Handled by nat_tc_ext before finishing.
        Decision::IcmpErrorIn => (TC_ACT_SHOT, stats::DROP_INTERNAL),
        Decision::IcmpErrorOut => {
            // Its own program, for its own stack.
            (
                TC_ACT_SHOT,
                tail::call(ctx, nat_common::TAIL_ICMP_ERROR_OUT),
            )
        }
        Decision::Fragment => {
            // Own program, own stack (frag.rs).
            let slot = if hook == HOOK_TC_INT {
                nat_common::TAIL_FRAG_INT
            } else {
                nat_common::TAIL_FRAG_EXT
            };
            (TC_ACT_SHOT, tail::call(ctx, slot))
        }
        Decision::Translate(rw, route) => match neigh_mtu(ctx, nat::egress(route, egress_if)) {
            Egress::Redirect {
                ifindex,
                smac,
                dmac,
            } => match rewrite::skb(ctx, &rw).and_then(|()| macs(ctx, smac, dmac)) {
                Ok(()) => {
                    if mss::wanted(ctx, &rw, mss_clamp) {
                        mss_hand_over(ctx, ifindex, 0, &rw, hook, fwd_reason);
                    }
                    (unsafe { bpf_redirect(ifindex, 0) } as i32, fwd_reason)
                }
                Err(_) => (TC_ACT_SHOT, stats::DROP_INTERNAL),
            },
            Egress::Neigh { ifindex, nexthop } => match rewrite::skb(ctx, &rw) {
                Ok(()) => {
                    if mss::wanted(ctx, &rw, mss_clamp) {
                        mss_hand_over(ctx, ifindex, nexthop, &rw, hook, fwd_reason);
                    }
                    (redirect_neigh(ifindex, nexthop), fwd_reason)
                }
                Err(_) => (TC_ACT_SHOT, stats::DROP_INTERNAL),
            },
            // Untranslated, the kernel answers with ICMP Fragmentation
            // Needed from its own inside address: path MTU discovery works.
            Egress::TooBig if rw.df => (TC_ACT_OK, stats::PASS_FRAG_NEEDED),
            // Without DF it must be fragmented (RFC 4787 REQ-13a): translated
            // here, then routed and fragmented by the kernel, which also
            // decrements the TTL (so this rewrite does not).
            Egress::TooBig => match rewrite::addr_port(ctx, &rw) {
                Ok(()) => (TC_ACT_OK, stats::TC_TO_KERNEL_FRAGMENT),
                Err(_) => (TC_ACT_SHOT, stats::DROP_INTERNAL),
            },
            Egress::Hairpin => match rewrite::skb(ctx, &rw) {
                Ok(()) => {
                    // The receiver's half runs as its own program, with a
                    // stack of its own: both halves in one would not fit
                    // in 512 bytes.
                    (TC_ACT_SHOT, tail::call(ctx, nat_common::TAIL_HAIRPIN))
                }
                Err(_) => (TC_ACT_SHOT, stats::DROP_INTERNAL),
            },
            Egress::Pass(r) => (TC_ACT_OK, r),
            Egress::Drop(r) => (TC_ACT_SHOT, r),
        },
    };
    count(hook, reason);
    action
}

/// With the neighbour unresolved the kernel's route lookup returns before
/// its MTU check, so check here (GSO-aware): a packet that does not fit
/// is too big, whatever the neighbour.
#[inline(always)]
fn neigh_mtu(ctx: &TcContext, e: Egress) -> Egress {
    match e {
        Egress::Neigh { ifindex, .. } => {
            let mut mtu_len: u32 = 0;
            let rc = unsafe { bpf_check_mtu(ctx.as_ptr(), ifindex, &mut mtu_len, 0, 0) };
            if rc > 0 { Egress::TooBig } else { e }
        }
        e => e,
    }
}

/// Forwards a packet a TC-only path (hairpin, ICMP errors) translated
/// itself along `egress`, applying `rewrite` just before it leaves.
/// Returns the verdict and the reason to count, or the drop reason.
#[inline(always)]
pub fn send(
    ctx: &TcContext,
    egress: Egress,
    fwd_reason: u32,
    rewrite: impl FnOnce() -> Result<(), i64>,
) -> Result<(i32, u32), u32> {
    match egress {
        Egress::Redirect {
            ifindex,
            smac,
            dmac,
        } => {
            rewrite().map_err(|_| stats::DROP_INTERNAL)?;
            macs(ctx, smac, dmac).map_err(|_| stats::DROP_INTERNAL)?;
            Ok((unsafe { bpf_redirect(ifindex, 0) } as i32, fwd_reason))
        }
        Egress::Neigh { ifindex, nexthop } => {
            rewrite().map_err(|_| stats::DROP_INTERNAL)?;
            Ok((redirect_neigh(ifindex, nexthop), fwd_reason))
        }
        // These go back out of a link of the size they came in on (or
        // are ICMP errors, small by nature): not fragmented here.
        Egress::TooBig => Err(stats::DROP_TOO_BIG),
        Egress::Hairpin => Err(stats::DROP_INTERNAL),
        Egress::Pass(r) => Ok((TC_ACT_OK, r)),
        Egress::Drop(r) => Err(r),
    }
}

/// Redirects to `ifindex`, letting the kernel resolve `nexthop`'s MAC.
#[inline(always)]
pub fn redirect_neigh(ifindex: u32, nexthop: u32) -> i32 {
    let mut nh: bpf_redir_neigh = unsafe { core::mem::zeroed() };
    nh.nh_family = AF_INET;
    nh.__bindgen_anon_1.ipv4_nh = nexthop;
    let size = core::mem::size_of::<bpf_redir_neigh>() as i32;
    (unsafe { bpf_redirect_neigh(ifindex, &mut nh, size, 0) }) as i32
}

#[inline(always)]
pub fn macs(ctx: &TcContext, smac: [u8; 6], dmac: [u8; 6]) -> Result<(), i64> {
    ctx.store(0, &dmac, 0)?;
    ctx.store(6, &smac, 0)
}

/// Hands a rewritten SYN to `nat_tc_mss`, which clamps and forwards it.
/// Returns only if its slot is empty (a loader bug): the caller forwards
/// it unclamped.
#[inline(always)]
fn mss_hand_over(
    ctx: &TcContext,
    ifindex: u32,
    nexthop: u32,
    rw: &Rewrite,
    hook: u32,
    reason: u32,
) {
    let _ = MssHandOver {
        ifindex,
        nexthop,
        l4_off: rw.l4_off as u32,
        hook,
        reason,
    }
    .call(ctx);
}

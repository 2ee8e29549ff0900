//! The forward stage: from the route of a translated packet to the packet
//! on its way out. The FIB answer becomes an [`Egress`]; the packet is
//! rewritten (rewrite.rs), gets the next hop's MACs and is redirected, or,
//! with the next hop's MAC unknown, redirected with `bpf_redirect_neigh`,
//! which resolves it like the kernel's own output path (TC only).
//!
//! XDP forwards only what it can finish: a resolved neighbour, a packet
//! that fits the egress MTU, and an egress NIC that takes redirected XDP
//! frames (the loader's `XDP_EGRESS`). The rest goes to TC untouched.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        TC_ACT_OK, TC_ACT_SHOT, bpf_redir_neigh,
        xdp_action::{XDP_DROP, XDP_PASS},
    },
    helpers::{bpf_check_mtu, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use nat_common::{XDP_EGRESS_REDIRECT, XDP_EGRESS_TO_TC, mss, stats};

use crate::{
    fib::Route,
    maps::{XDP_EGRESS, XDP_PENDING},
    parse::{Frame, TCP_FLAGS, write},
    rewrite::{self, Rewrite},
    tail::MssHandOver,
};

const AF_INET: u32 = 2;

/// How a translated packet leaves, given its route and the NIC it must
/// leave by.
pub enum Egress {
    /// MACs resolved: rewrite and redirect.
    Redirect {
        ifindex: u32,
        smac: [u8; 6],
        dmac: [u8; 6],
    },
    /// Route fine, neighbour unresolved (TC resolves it; XDP hands to TC).
    Neigh {
        ifindex: u32,
        nexthop: u32,
    },
    /// Too big for the egress MTU (DF or not is the caller's business).
    TooBig,
    /// A final verdict without translation.
    Pass(u32),
    Drop(u32),
}

#[inline(always)]
pub fn egress(route: Route, expected_ifindex: u32) -> Egress {
    match route {
        Route::Resolved {
            ifindex,
            smac,
            dmac,
        } if ifindex == expected_ifindex => Egress::Redirect {
            ifindex,
            smac,
            dmac,
        },
        Route::NoNeigh { ifindex, nexthop } if ifindex == expected_ifindex => {
            Egress::Neigh { ifindex, nexthop }
        }
        // The kernel stops before filling in the egress ifindex when the MTU
        // check fails, so it cannot be compared here; TC looks again.
        Route::FragNeeded { .. } => Egress::TooBig,
        Route::Local => Egress::Pass(stats::PASS_LOCAL),
        Route::Unreachable => Egress::Drop(stats::DROP_NO_ROUTE),
        Route::Other => Egress::Drop(stats::DROP_NO_ROUTE),
        _ => Egress::Drop(stats::DROP_WRONG_EGRESS),
    }
}

/// XDP hook `hook`: forwards a translated packet out of `egress_if`, or
/// hands it to TC untouched. Returns the XDP action and the reason to
/// count.
#[inline(always)]
pub fn xdp(f: Frame, rw: &Rewrite, route: Route, hook: u32, egress_if: u32) -> (u32, u32) {
    match egress(route, egress_if) {
        Egress::Redirect {
            ifindex,
            smac,
            dmac,
        } => {
            let mode = xdp_egress(hook);
            // A frame the NIC cannot take would be dropped by the kernel:
            // TC sends it as an skb instead.
            if mode == XDP_EGRESS_TO_TC {
                return (XDP_PASS, stats::XDP_TO_TC_NO_XMIT);
            }
            match rewrite::xdp(f, rw).and_then(|()| xdp_macs(f, smac, dmac)) {
                Some(()) => {
                    if mode == XDP_EGRESS_REDIRECT {
                        pending(hook);
                    }
                    let action = unsafe { bpf_redirect(ifindex, 0) } as u32;
                    crate::stats::traffic(hook, rw.proto, (f.data_end - f.data) as u64);
                    (action, stats::xdp_forwarded(hook))
                }
                None => (XDP_DROP, stats::DROP_INTERNAL),
            }
        }
        Egress::Neigh { .. } => (XDP_PASS, stats::XDP_TO_TC_NO_NEIGH),
        Egress::TooBig => (XDP_PASS, stats::XDP_TO_TC_FIB),
        Egress::Pass(r) => (XDP_PASS, r),
        Egress::Drop(r) => (XDP_DROP, r),
    }
}

/// How XDP hook `hook` forwards (`XDP_EGRESS_*`): redirect until the
/// loader says otherwise.
#[inline(always)]
fn xdp_egress(hook: u32) -> u32 {
    XDP_EGRESS.get(hook).map_or(XDP_EGRESS_REDIRECT, |e| e.mode)
}

/// One more frame of `hook` in the kernel's bulk queue, until the tracing
/// programs see it refused or flushed (refused.rs).
#[inline(always)]
fn pending(hook: u32) {
    if let Some(p) = XDP_PENDING.get_ptr_mut(hook) {
        // Per-CPU slot: only this CPU's programs touch it.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn xdp_macs(f: Frame, smac: [u8; 6], dmac: [u8; 6]) -> Option<()> {
    write(f, 0, dmac)?;
    write(f, 6, smac)
}

/// TC: forwards a packet the decision translated (`nat_tc_int`,
/// `nat_tc_ext`, the fragment programs' first fragments) out of
/// `egress_if`. A SYN goes through `nat_tc_mss` on the way when
/// `mss_clamp` is set. Returns the TC verdict and the reason to count.
#[inline(always)]
pub fn tc(
    ctx: &TcContext,
    rw: &Rewrite,
    route: Route,
    egress_if: u32,
    hook: u32,
    fwd_reason: u32,
    mss_clamp: u16,
) -> (i32, u32) {
    let clamp = |ifindex: u32, nexthop: u32| {
        let syn = || ctx.load::<u8>(rw.l4_off + TCP_FLAGS).ok();
        if mss::wanted(mss_clamp, rw.proto, syn) {
            // Returns only if the slot is empty (a loader bug): the
            // packet is then forwarded unclamped.
            let _ = MssHandOver {
                ifindex,
                nexthop,
                l4_off: rw.l4_off as u32,
                hook,
                reason: fwd_reason,
            }
            .call(ctx);
        }
    };
    match neigh_mtu(ctx, egress(route, egress_if)) {
        // Untranslated, the kernel answers with ICMP Fragmentation Needed
        // from its own inside address: path MTU discovery works.
        Egress::TooBig if rw.df => (TC_ACT_OK, stats::PASS_FRAG_NEEDED),
        // Without DF it must be fragmented (RFC 4787 REQ-13a): translated
        // here, then routed and fragmented by the kernel, which also
        // decrements the TTL (so this rewrite does not).
        Egress::TooBig => match rewrite::addr_port(ctx, rw) {
            Ok(()) => {
                crate::stats::traffic(hook, rw.proto, ctx.len() as u64);
                (TC_ACT_OK, stats::TC_TO_KERNEL_FRAGMENT)
            }
            Err(_) => (TC_ACT_SHOT, stats::DROP_INTERNAL),
        },
        e => match send(
            ctx,
            e,
            fwd_reason,
            (hook, rw.proto),
            || rewrite::skb(ctx, rw),
            clamp,
        ) {
            Ok(r) => r,
            Err(reason) => (TC_ACT_SHOT, reason),
        },
    }
}

/// TC: the one way a rewritten packet leaves. Applies `rewrite` just
/// before, sets the MACs (or leaves them to `bpf_redirect_neigh`), calls
/// `last` with the egress NIC and the next hop to resolve (0: MACs set),
/// the last chance to hand the packet to another program, and redirects,
/// counting the packet in the traffic counters as `traffic` (hook,
/// protocol) says. Returns the verdict and the reason to count, or the
/// drop reason.
#[inline(always)]
pub fn send(
    ctx: &TcContext,
    egress: Egress,
    fwd_reason: u32,
    traffic: (u32, u8),
    rewrite: impl FnOnce() -> Result<(), i64>,
    last: impl FnOnce(u32, u32),
) -> Result<(i32, u32), u32> {
    match egress {
        Egress::Redirect {
            ifindex,
            smac,
            dmac,
        } => {
            rewrite().map_err(|_| stats::DROP_INTERNAL)?;
            macs(ctx, smac, dmac).map_err(|_| stats::DROP_INTERNAL)?;
            last(ifindex, 0);
            let action = unsafe { bpf_redirect(ifindex, 0) } as i32;
            crate::stats::traffic(traffic.0, traffic.1, ctx.len() as u64);
            Ok((action, fwd_reason))
        }
        Egress::Neigh { ifindex, nexthop } => {
            rewrite().map_err(|_| stats::DROP_INTERNAL)?;
            last(ifindex, nexthop);
            let action = redirect_neigh(ifindex, nexthop);
            crate::stats::traffic(traffic.0, traffic.1, ctx.len() as u64);
            Ok((action, fwd_reason))
        }
        // Only translated packets are fragmented by the kernel (tc above);
        // these (hairpinned packets, ICMP errors, following fragments) go
        // back out of a link of the size they came in on, or are small.
        Egress::TooBig => Err(stats::DROP_TOO_BIG),
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
fn macs(ctx: &TcContext, smac: [u8; 6], dmac: [u8; 6]) -> Result<(), i64> {
    ctx.store(0, &dmac, 0)?;
    ctx.store(6, &smac, 0)
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

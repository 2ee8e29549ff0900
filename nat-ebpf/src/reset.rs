//! The egress policy's "tcp-reset" answer: the packet of a denied TCP flow
//! goes back to its sender as a RST from the destination it asked for
//! (nat_common::rst builds the headers), so its connect() fails at once
//! with "connection refused". TC only, in its own tail-called program
//! `nat_tc_policy_rst`: cut to the two bare headers, addressed back to
//! the MAC it came from, sent back out of `--int`. Rate-limited with the
//! out-of-ports errors' limiter (one bucket per CPU for every answer the
//! gateway sends inside on its own).

use aya_ebpf::{
    bindings::{BPF_F_RECOMPUTE_CSUM, TC_ACT_SHOT},
    helpers::{bpf_ktime_get_ns, bpf_redirect, bpf_skb_change_tail},
    macros::classifier,
    programs::TcContext,
};
use nat_common::{
    IPPROTO_TCP, NatConfig, TAIL_POLICY_RST, csum, icmp_rate, rst,
    stats::{self, HOOK_TC_INT},
};

use crate::{
    maps::{ICMP_RATE, config},
    parse::{self, ETH_HLEN, Frame, TCP_CHECK, TCP_FLAGS},
    stats::count,
    tail,
};

/// Tail-called by `nat_tc_int` ([`hand_over`]). Counts events only, at
/// `nat_tc_int`'s hook: the drop was counted there.
#[classifier]
pub fn nat_tc_policy_rst(ctx: TcContext) -> i32 {
    tail::answered(try_reset(&ctx, config()))
}

/// `nat_tc_int`'s part: counts the drop and hands the packet over.
/// Returns only if the slot is empty, with the verdict and the reason.
#[inline(always)]
pub fn hand_over(ctx: &TcContext) -> (i32, u32) {
    count(HOOK_TC_INT, stats::DROP_POLICY_RESET);
    (TC_ACT_SHOT, tail::call(ctx, TAIL_POLICY_RST))
}

#[inline(always)]
fn load<T>(ctx: &TcContext, off: usize) -> Result<T, u32> {
    ctx.load(off).map_err(|_| stats::DROP_INTERNAL)
}

/// Turns the packet into the RST and redirects it; `(verdict, event to
/// count)`, or the reason to count for dropping it.
#[inline(always)]
fn try_reset(ctx: &TcContext, cfg: &NatConfig) -> Result<(i32, Option<u32>), u32> {
    let f = Frame::tc(ctx);
    let ip = parse::ipv4(f, ctx.len() as usize).map_err(|_| stats::DROP_MALFORMED)?;
    let first = ip.saddr.to_ne_bytes()[0];
    // Never to "this network", multicast or broadcast sources; and a
    // header with IP options is not worth rebuilding: dropped only.
    if ip.proto != IPPROTO_TCP || ip.l4_off != ETH_HLEN + 20 || first == 0 || first >= 224 {
        return Ok((TC_ACT_SHOT, None));
    }
    let l4 = ip.l4_off;
    let sport: u16 = load(ctx, l4)?;
    let dport: u16 = load(ctx, l4 + 2)?;
    let seq: u32 = load(ctx, l4 + 4)?;
    let ack: u32 = load(ctx, l4 + 8)?;
    let doff: u8 = load(ctx, l4 + 12)?;
    let flags: u8 = load(ctx, l4 + TCP_FLAGS)?;
    let old_check: u16 = load(ctx, l4 + TCP_CHECK)?;
    let l4_len = ip.tot_len.saturating_sub(20);
    let seg = rst::Segment {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport,
        dport,
        seq: u32::from_be(seq),
        ack: u32::from_be(ack),
        flags,
        data_len: (l4_len as u32).saturating_sub(((doff >> 4) as u32) * 4),
    };
    // A packet from a local socket or a virtio NIC may be CHECKSUM_PARTIAL:
    // its checksum is completed after us, over what is there then.
    let partial = csum::l4_maybe_partial(IPPROTO_TCP, old_check, ip.saddr, ip.daddr, l4_len);
    let Some(h) = rst::headers(&seg, partial) else {
        // A RST is never answered.
        return Ok((TC_ACT_SHOT, None));
    };
    let now = unsafe { bpf_ktime_get_ns() };
    let tat = ICMP_RATE.get_ptr_mut(0).ok_or(stats::DROP_INTERNAL)?;
    match icmp_rate::admit(unsafe { *tat }, now) {
        Some(next) => unsafe { *tat = next },
        None => return Ok((TC_ACT_SHOT, Some(stats::EV_POLICY_ANSWER_RATE_LIMITED))),
    }
    let dmac: [u8; 6] = load(ctx, 0)?;
    let smac: [u8; 6] = load(ctx, 6)?;
    let frame_len = (ETH_HLEN + rst::LEN) as u32;
    if ctx.len() != frame_len && unsafe { bpf_skb_change_tail(ctx.skb.skb, frame_len, 0) } != 0 {
        return Err(stats::DROP_INTERNAL);
    }
    ctx.store(ETH_HLEN, &h, BPF_F_RECOMPUTE_CSUM as u64)
        .map_err(|_| stats::DROP_INTERNAL)?;
    // Back to the previous hop, from --int's own MAC (see no_port.rs).
    let own = if cfg.int_mac == [0; 6] {
        dmac
    } else {
        cfg.int_mac
    };
    ctx.store(0, &smac, 0).map_err(|_| stats::DROP_INTERNAL)?;
    ctx.store(6, &own, 0).map_err(|_| stats::DROP_INTERNAL)?;
    let action = unsafe { bpf_redirect(cfg.int_ifindex, 0) } as i32;
    Ok((action, Some(stats::EV_POLICY_RST_SENT)))
}

//! Out of ports (RFC 5508 REQ-8): when a new flow finds no free external
//! port, its sender gets an ICMP Destination Unreachable, code 13
//! (communication administratively prohibited), from the gateway's
//! `--int` address, instead of retrying into silence until it times out.
//!
//! The packet itself becomes the error (TC only, in its own tail-called
//! program `nat_tc_no_port`, whose stack is its own): cut to the part to
//! quote, 28 bytes of room made in front of its IP header for the new IP
//! and ICMP headers, addressed back to the MAC it came from, and sent back
//! out of `--int`. Errors
//! are rate-limited per CPU ([`nat_common::icmp_rate`]) so a flood of new
//! flows while the ports are exhausted is not amplified.
//!
//! The egress policy's "icmp-prohibited" answer is the same error, so a
//! denied flow comes here too ([`hand_over_policy`]), sharing the rate
//! limit; only the events counted differ.

use aya_ebpf::{
    bindings::{
        BPF_F_RECOMPUTE_CSUM, TC_ACT_SHOT,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
        xdp_action::{XDP_DROP, XDP_PASS},
    },
    helpers::{bpf_ktime_get_ns, bpf_redirect, bpf_skb_change_tail},
    macros::classifier,
    programs::TcContext,
};
use nat_common::{
    IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, NatConfig, TAIL_NO_PORT, csum, icmp_rate,
    stats::{self, HOOK_TC_INT},
};

use crate::{
    csum::skb_sum,
    maps::{ICMP_RATE, config},
    parse::{self, ETH_HLEN, Frame, ICMP_DEST_UNREACH},
    stats::count,
    tail,
};

/// Communication administratively prohibited (RFC 1812), what RFC 5508
/// REQ-8 asks for.
const CODE_ADMIN_PROHIBITED: u8 = 13;
/// RFC 1812 4.3.2.3: an ICMP error quotes as much of the datagram as fits
/// in 576 bytes (RFC 792's minimum is the IP header and 8 bytes).
const MAX_QUOTE: usize = 576 - 20 - 8;
/// The new IP header and ICMP header put in front of the quote.
const NEW_HDRS: usize = 20 + 8;
const IP_TTL: u8 = 64;
/// Precedence "internetwork control", as Linux sends its own ICMP errors.
const IP_TOS: u8 = 0xc0;

/// Tail-called by `nat_tc_int` ([`hand_over`]) with a packet of a new flow
/// that found no free external port: it goes back to its sender as an ICMP
/// Destination Unreachable, code 13, rate-limited. Counts events only, at
/// `nat_tc_int`'s hook: the drop was counted there.
#[classifier]
pub fn nat_tc_no_port(ctx: TcContext) -> i32 {
    let events = if tail::why(&ctx) == WHY_POLICY {
        (
            stats::EV_POLICY_ICMP_SENT,
            stats::EV_POLICY_ANSWER_RATE_LIMITED,
        )
    } else {
        (
            stats::EV_ICMP_NO_PORT_SENT,
            stats::EV_ICMP_NO_PORT_RATE_LIMITED,
        )
    };
    tail::answered(try_nat_tc_no_port(&ctx, config(), events))
}

/// XDP's part: with the rate limit not spent, hand the packet to TC, which
/// builds the error (peeking does not take a token: TC takes it, on the
/// same CPU). Otherwise drop it here, cheaply. Returns the XDP action and
/// the reason to count.
#[inline(always)]
pub fn xdp(cfg: &NatConfig, hook: u32) -> (u32, u32) {
    if cfg.int_addr == 0 {
        return (XDP_DROP, stats::DROP_NO_PORT);
    }
    let now = unsafe { bpf_ktime_get_ns() };
    match ICMP_RATE.get_ptr(0) {
        Some(tat) if icmp_rate::admit(unsafe { *tat }, now).is_some() => {
            (XDP_PASS, stats::XDP_TO_TC_NO_PORT)
        }
        _ => {
            count(hook, stats::EV_ICMP_NO_PORT_RATE_LIMITED);
            (XDP_DROP, stats::DROP_NO_PORT)
        }
    }
}

/// `nat_tc_int`'s part: counts the drop and hands the packet to
/// `nat_tc_no_port`. The error is built by a program of its own:
/// `nat_tc_int` is near the 512-byte stack limit, and the generator's
/// header buffer and checksum loops get a stack (and a verifier walk) of
/// their own. Returns only if the slot is empty, with the verdict and the
/// reason to count.
#[inline(always)]
pub fn hand_over(ctx: &TcContext) -> (i32, u32) {
    count(HOOK_TC_INT, stats::DROP_NO_PORT);
    (
        TC_ACT_SHOT,
        tail::call_with_why(ctx, TAIL_NO_PORT, WHY_NO_PORT),
    )
}

/// [`hand_over`] for a flow the egress policy denies with
/// "icmp-prohibited".
#[inline(always)]
pub fn hand_over_policy(ctx: &TcContext) -> (i32, u32) {
    count(HOOK_TC_INT, stats::DROP_POLICY_PROHIBITED);
    (
        TC_ACT_SHOT,
        tail::call_with_why(ctx, TAIL_NO_PORT, WHY_POLICY),
    )
}

/// Why `nat_tc_no_port` answers (the control buffer's word).
const WHY_NO_PORT: u32 = 0;
const WHY_POLICY: u32 = 1;

#[inline(always)]
fn load<T>(ctx: &TcContext, off: usize) -> Result<T, u32> {
    ctx.load(off).map_err(|_| stats::DROP_INTERNAL)
}

/// Turns the packet into the ICMP error and redirects it; `(verdict,
/// event to count)`, or the reason to count for dropping it.
#[inline(always)]
/// `(sent, limited)`: the events to count for an error sent, and for one
/// the rate limit refused.
fn try_nat_tc_no_port(
    ctx: &TcContext,
    cfg: &NatConfig,
    (sent, limited): (u32, u32),
) -> Result<(i32, Option<u32>), u32> {
    let f = Frame::tc(ctx);
    let ip = parse::ipv4(f, ctx.len() as usize).map_err(|_| stats::DROP_MALFORMED)?;
    let first = ip.saddr.to_ne_bytes()[0];
    // Never an error to "this network", multicast or broadcast sources
    // (RFC 1812 4.3.2.7), nor without an address to send it from.
    if cfg.int_addr == 0 || first == 0 || first >= 224 {
        return Ok((TC_ACT_SHOT, None));
    }
    let check_at = match ip.proto {
        IPPROTO_TCP => parse::TCP_CHECK,
        IPPROTO_UDP => parse::UDP_CHECK,
        // Only echo requests get here; an ICMP error is never answered.
        IPPROTO_ICMP => parse::ICMP_CHECK,
        _ => return Ok((TC_ACT_SHOT, None)),
    };
    let now = unsafe { bpf_ktime_get_ns() };
    let tat = ICMP_RATE.get_ptr_mut(0).ok_or(stats::DROP_INTERNAL)?;
    match icmp_rate::admit(unsafe { *tat }, now) {
        Some(next) => unsafe { *tat = next },
        None => return Ok((TC_ACT_SHOT, Some(limited))),
    }
    let ihl = ip.l4_off - ETH_HLEN;
    // The parser checked the L4 header (8 bytes at least) is inside
    // tot_len, so the quote always holds RFC 792's minimum.
    let quote = if (ip.tot_len as usize) < MAX_QUOTE {
        ip.tot_len as usize
    } else {
        MAX_QUOTE
    };
    if quote < ihl + 8 {
        return Err(stats::DROP_MALFORMED);
    }
    let l4_len = quote - ihl;
    let old_check: u16 = load(ctx, ip.l4_off + check_at)?;
    let dmac: [u8; 6] = load(ctx, 0)?;
    let smac: [u8; 6] = load(ctx, 6)?;

    // Cut to the quote (L2 padding included).
    let frame_len = ETH_HLEN + quote;
    if ctx.len() as usize != frame_len
        && unsafe { bpf_skb_change_tail(ctx.skb.skb, frame_len as u32, 0) } != 0
    {
        return Err(stats::DROP_INTERNAL);
    }

    // A packet from a local socket or a virtio NIC may still be
    // CHECKSUM_PARTIAL: the skb asks the egress device to complete the L4
    // checksum, and after the headers move in front that is the quoted
    // one, inside the ICMP checksum. Its field then gets the value such a
    // completion leaves as it is, so the ICMP checksum holds either way.
    let seg = skb_sum::<MAX_QUOTE>(ctx, ip.l4_off, l4_len).ok_or(stats::DROP_INTERNAL)?;
    let partial = csum::l4_maybe_partial(
        ip.proto,
        old_check,
        ip.saddr,
        ip.daddr,
        ip.tot_len - ihl as u16,
    );
    let seg = if partial {
        let rest = csum::fold(seg + (!old_check) as u32);
        let fixed = csum::offload_fixed_point(rest);
        ctx.store(ip.l4_off + check_at, &fixed, BPF_F_RECOMPUTE_CSUM as u64)
            .map_err(|_| stats::DROP_INTERNAL)?;
        rest as u32 + fixed as u32
    } else {
        seg
    };
    let quote_sum =
        csum::fold(skb_sum::<MAX_QUOTE>(ctx, ETH_HLEN, ihl).ok_or(stats::DROP_INTERNAL)? + seg);

    // Room for the new headers between Ethernet and the quoted IP header.
    ctx.adjust_room(NEW_HDRS as i32, BPF_ADJ_ROOM_MAC, 0)
        .map_err(|_| stats::DROP_INTERNAL)?;
    let tot = ((NEW_HDRS + quote) as u16).to_be_bytes();
    let a = cfg.int_addr.to_ne_bytes();
    let d = ip.saddr.to_ne_bytes();
    let mut h: [u8; NEW_HDRS] = [
        0x45,
        IP_TOS,
        tot[0],
        tot[1],
        0,
        0,
        0,
        0,
        IP_TTL,
        IPPROTO_ICMP,
        0,
        0,
        a[0],
        a[1],
        a[2],
        a[3],
        d[0],
        d[1],
        d[2],
        d[3],
        ICMP_DEST_UNREACH,
        CODE_ADMIN_PROHIBITED,
        0,
        0,
        0,
        0,
        0,
        0,
    ];
    let ip_check = csum::checksum(&h[..20]).to_ne_bytes();
    h[10] = ip_check[0];
    h[11] = ip_check[1];
    let icmp_word = u16::from_ne_bytes([ICMP_DEST_UNREACH, CODE_ADMIN_PROHIBITED]) as u32;
    let icmp_check = (!csum::fold(icmp_word + quote_sum as u32)).to_ne_bytes();
    h[22] = icmp_check[0];
    h[23] = icmp_check[1];
    ctx.store(ETH_HLEN, &h, BPF_F_RECOMPUTE_CSUM as u64)
        .map_err(|_| stats::DROP_INTERNAL)?;
    // Back to the previous hop it came from, from --int's own MAC: the
    // packet may have come to a group address (a unicast IP datagram sent
    // to a broadcast MAC), which is no source.
    let own = if cfg.int_mac == [0; 6] {
        dmac
    } else {
        cfg.int_mac
    };
    ctx.store(0, &smac, 0).map_err(|_| stats::DROP_INTERNAL)?;
    ctx.store(6, &own, 0).map_err(|_| stats::DROP_INTERNAL)?;
    let action = unsafe { bpf_redirect(cfg.int_ifindex, 0) } as i32;
    Ok((action, Some(sent)))
}

//! TCP MSS clamping (`--mss-clamp`), TC only: XDP hands SYNs to TC when
//! clamping is on (they are few), and TC's skb helpers load and store at
//! the variable offsets options have, and keep partial and complete
//! checksums right alike.
//!
//! A translated SYN or SYN-ACK is finished by its own tail-called program,
//! `nat_tc_mss`: it clamps, then redirects as the translating program would
//! have (which hands it over with `tail::MssHandOver`). The option walk is a loop over up to 40 bytes; inside `nat_tc_int`
//! the verifier walks it again for every distinct state reaching it and
//! gives up at a million instructions (measured: it did). A program of its
//! own starts from one state, so the walk is verified once.

use aya_ebpf::{
    bindings::TC_ACT_SHOT, helpers::bpf_redirect, macros::classifier, programs::TcContext,
};
use nat_common::{
    IPPROTO_TCP, mss,
    stats::{self, HOOK_TC_EXT, HOOK_TC_INT},
};

use crate::{
    forward,
    maps::config,
    parse::{TCP_CHECK, TCP_HLEN},
    stats::count,
    tail::MssHandOver,
};

/// Tail-called by `nat_tc_int` and `nat_tc_ext` (forward::tc) with a
/// translated SYN or SYN-ACK when `--mss-clamp` is on: clamps its MSS
/// option and forwards it. Counts at the hook of the program that called.
#[classifier]
pub fn nat_tc_mss(ctx: TcContext) -> i32 {
    let h = MssHandOver::read(&ctx);
    let (action, reason, clamped) = try_nat_tc_mss(&ctx, &h);
    // The hook came through the control buffer: only the two TC ones.
    // Narrowed after the option walk, not before: the verifier would walk
    // it once for each.
    let hook = if h.hook == HOOK_TC_EXT {
        HOOK_TC_EXT
    } else {
        HOOK_TC_INT
    };
    if clamped {
        count(hook, stats::EV_MSS_CLAMPED);
    }
    count(hook, reason);
    action
}

/// Clamps, then redirects as the calling program would have. Returns the
/// verdict, the reason to count and whether the MSS was lowered.
#[inline(always)]
fn try_nat_tc_mss(ctx: &TcContext, h: &MssHandOver) -> (i32, u32, bool) {
    let clamped = match clamp(ctx, h.l4_off as usize, config().mss_clamp) {
        Ok(c) => c,
        Err(()) => return (TC_ACT_SHOT, stats::DROP_INTERNAL, false),
    };
    let action = if h.nexthop == 0 {
        (unsafe { bpf_redirect(h.ifindex, 0) }) as i32
    } else {
        forward::redirect_neigh(h.ifindex, h.nexthop)
    };
    crate::stats::traffic(h.hook, IPPROTO_TCP, ctx.len() as u64);
    (action, h.reason, clamped)
}

/// Lowers the MSS option of the SYN whose TCP header starts at `l4` to
/// `clamp_to`, if it is larger; `Ok(true)` if it did.
#[inline(always)]
fn clamp(ctx: &TcContext, l4: usize, clamp_to: u16) -> Result<bool, ()> {
    let doff: u8 = ctx.load(l4 + 12).map_err(|_| ())?;
    let hlen = ((doff >> 4) as usize) * 4;
    if hlen <= TCP_HLEN {
        return Ok(false);
    }
    let opts = l4 + TCP_HLEN;
    let Some(at) = mss::find(hlen - TCP_HLEN, |i| ctx.load::<u8>(opts + i).ok()) else {
        return Ok(false);
    };
    let old: u16 = ctx.load(opts + at).map_err(|_| ())?;
    let Some(new) = mss::clamped(u16::from_be(old), clamp_to) else {
        return Ok(false);
    };
    let new = new.to_be();
    // The option's offset from the TCP header is odd when NOPs put it
    // there. On a partial checksum (no pseudo-header flag) the helper
    // leaves the field alone, as it must: the data is summed later.
    let (from, to) = mss::csum_words(old, new, (TCP_HLEN + at) % 2 == 1);
    ctx.store(opts + at, &new, 0).map_err(|_| ())?;
    ctx.l4_csum_replace(l4 + TCP_CHECK, from as u64, to as u64, 2)
        .map_err(|_| ())?;
    Ok(true)
}

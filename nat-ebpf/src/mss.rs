//! TCP MSS clamping (`--mss-clamp`), TC only: XDP hands SYNs to TC when
//! clamping is on (they are few), and TC's skb helpers load and store at
//! the variable offsets options have, and keep partial and complete
//! checksums right alike.
//!
//! A translated SYN or SYN-ACK is finished by its own tail-called program,
//! `nat_tc_mss`: it clamps, then redirects as the translating program would
//! have. The option walk is a loop over up to 40 bytes; inside `nat_tc_int`
//! the verifier walks it again for every distinct state reaching it and
//! gives up at a million instructions (measured: it did). A program of its
//! own starts from one state, so the walk is verified once.

use aya_ebpf::{helpers::bpf_redirect, programs::TcContext};
use nat_common::{IPPROTO_TCP, mss, tcp::TCP_SYN};

use crate::{
    parse::{TCP_CHECK, TCP_FLAGS, TCP_HLEN},
    rewrite::Rewrite,
    tail::MssHandOver,
    tc,
};

/// Whether a translated packet must go through `nat_tc_mss`: a TCP SYN
/// (or SYN-ACK) with clamping on.
#[inline(always)]
pub fn wanted(ctx: &TcContext, rw: &Rewrite, clamp: u16) -> bool {
    clamp != 0
        && rw.proto == IPPROTO_TCP
        && matches!(ctx.load::<u8>(rw.l4_off + TCP_FLAGS), Ok(f) if f & TCP_SYN != 0)
}

/// `nat_tc_mss`'s work: clamp, forward. Returns the verdict, the reason to
/// count and the hook to count it at.
#[inline(always)]
pub fn finish(ctx: &TcContext, clamp_to: u16) -> (i32, u32, Option<u32>, u32) {
    let MssHandOver {
        ifindex,
        nexthop,
        l4_off,
        hook,
        reason,
    } = MssHandOver::read(ctx);
    let l4_off = l4_off as usize;
    let event = match clamp(ctx, l4_off, clamp_to) {
        Ok(true) => Some(nat_common::stats::EV_MSS_CLAMPED),
        Ok(false) => None,
        Err(()) => {
            return (
                aya_ebpf::bindings::TC_ACT_SHOT,
                nat_common::stats::DROP_INTERNAL,
                None,
                hook,
            );
        }
    };
    let action = if nexthop == 0 {
        (unsafe { bpf_redirect(ifindex, 0) }) as i32
    } else {
        tc::redirect_neigh(ifindex, nexthop)
    };
    (action, reason, event, hook)
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

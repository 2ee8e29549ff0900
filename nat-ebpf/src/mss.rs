//! TCP MSS clamping (`--mss-clamp`), TC only: XDP hands SYNs to TC when
//! clamping is on (they are few), and TC's skb helpers load and store at
//! the variable offsets options have, and keep partial and complete
//! checksums right alike.

use aya_ebpf::{bindings::__sk_buff, programs::TcContext};
use nat_common::{mss, tcp::TCP_SYN};

use crate::parse::{TCP_CHECK, TCP_FLAGS, TCP_HLEN};

/// Lowers the MSS option of a SYN or SYN-ACK whose TCP header starts at
/// `l4_off` to `clamp`, if it is larger. Returns 1 if it did, 0 if there
/// was nothing to do, -1 if a helper failed.
///
/// Not inlined (its own BPF function with scalar arguments and result):
/// the option walk would otherwise add to the stack of `nat_tc_int` and
/// `nat_tc_ext`, which are near the limit.
#[inline(never)]
pub fn clamp(skb: *mut __sk_buff, l4_off: u32, clamp: u32) -> i32 {
    let ctx = TcContext::new(skb);
    let l4 = l4_off as usize;
    let Ok(flags) = ctx.load::<u8>(l4 + TCP_FLAGS) else {
        return 0;
    };
    if flags & TCP_SYN == 0 {
        return 0;
    }
    let Ok(doff) = ctx.load::<u8>(l4 + 12) else {
        return 0;
    };
    let hlen = ((doff >> 4) as usize) * 4;
    if hlen <= TCP_HLEN {
        return 0;
    }
    let opts = l4 + TCP_HLEN;
    let Some(at) = mss::find(hlen - TCP_HLEN, |i| ctx.load::<u8>(opts + i).ok()) else {
        return 0;
    };
    let Ok(old) = ctx.load::<u16>(opts + at) else {
        return 0;
    };
    let Some(new) = mss::clamped(u16::from_be(old), clamp as u16) else {
        return 0;
    };
    let new = new.to_be();
    // The option's offset from the TCP header: odd when NOPs put it there.
    let (from, to) = mss::csum_words(old, new, (TCP_HLEN + at) % 2 == 1);
    if ctx.store(opts + at, &new, 0).is_err()
        || ctx
            .l4_csum_replace(l4 + TCP_CHECK, from as u64, to as u64, 2)
            .is_err()
    {
        return -1;
    }
    1
}

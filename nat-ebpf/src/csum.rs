//! Checksum helpers over the skb (the arithmetic itself is pure and lives
//! in `nat_common::csum`, with its tests).

use aya_ebpf::programs::TcContext;

/// One's complement sum (raw words, unfolded) of `len` bytes from `off`,
/// for the programs that build or check whole messages; `None` if the
/// packet is shorter. `MAX_LEN` bounds the loop for the verifier (callers
/// keep `len` within it).
#[inline(always)]
pub fn skb_sum<const MAX_LEN: usize>(ctx: &TcContext, off: usize, len: usize) -> Option<u32> {
    let mut acc: u32 = 0;
    let mut i = 0;
    while i < MAX_LEN / 2 {
        let at = i * 2;
        if at + 2 > len {
            break;
        }
        let w: u16 = ctx.load(off + at).ok()?;
        acc += w as u32;
        i += 1;
    }
    if len & 1 == 1 {
        // The odd last byte is the first byte of a zero-padded word: in a
        // raw (memory-order) word on this little-endian target, the low one.
        let b: u8 = ctx.load(off + len - 1).ok()?;
        acc += b as u32;
    }
    Some(acc)
}

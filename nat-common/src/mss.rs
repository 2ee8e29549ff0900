//! TCP MSS clamping (`--mss-clamp`): the MSS option of SYN and SYN-ACK
//! segments is lowered to the configured value, so hosts behind a path
//! with a smaller MTU (a tunnel, a VPN) never send segments too big for it.

use crate::tcp::TCP_SYN;

/// TCP options are at most 40 bytes (data offset 15 words).
pub const MAX_OPTIONS: usize = 40;
pub const KIND_EOL: u8 = 0;
pub const KIND_NOP: u8 = 1;
pub const KIND_MSS: u8 = 2;
pub const MSS_LEN: u8 = 4;

/// Offset, from the start of the options, of the MSS option's 2-byte
/// value, if the options hold a well-formed one. `byte(i)` reads option
/// byte `i` (`None`: unreadable, which ends the walk). At most
/// [`MAX_OPTIONS`] steps, each advancing at least one byte, so the loop is
/// bounded for the verifier.
#[inline(always)]
pub fn find<F: FnMut(usize) -> Option<u8>>(opts_len: usize, mut byte: F) -> Option<usize> {
    let len = if opts_len > MAX_OPTIONS {
        MAX_OPTIONS
    } else {
        opts_len
    };
    let mut i = 0;
    let mut step = 0;
    while step < MAX_OPTIONS {
        step += 1;
        if i >= len {
            return None;
        }
        let kind = byte(i)?;
        match kind {
            KIND_EOL => return None,
            KIND_NOP => i += 1,
            _ => {
                if i + 1 >= len {
                    return None;
                }
                let olen = byte(i + 1)?;
                if olen < 2 || i + olen as usize > len {
                    return None;
                }
                if kind == KIND_MSS {
                    return if olen == MSS_LEN { Some(i + 2) } else { None };
                }
                i += olen as usize;
            }
        }
    }
    None
}

/// Whether a translated packet goes through clamping: a TCP SYN (or
/// SYN-ACK) with clamping on (`clamp` non-zero). `flags` gives the TCP
/// flags; it is asked only for TCP with clamping on (TC loads them from
/// the packet, so the others cost no load).
#[inline(always)]
pub fn wanted(clamp: u16, proto: u8, flags: impl FnOnce() -> Option<u8>) -> bool {
    clamp != 0 && proto == crate::IPPROTO_TCP && matches!(flags(), Some(f) if f & TCP_SYN != 0)
}

/// The MSS (host order) to write instead of `mss`, if it must be lowered.
#[inline(always)]
pub const fn clamped(mss: u16, clamp: u16) -> Option<u16> {
    if clamp != 0 && mss > clamp {
        Some(clamp)
    } else {
        None
    }
}

/// The raw words to give an incremental checksum update (RFC 1624) when
/// the raw 16-bit field `old` becomes `new` at an even or odd offset from
/// the start of the TCP header: at an odd offset the field straddles two
/// checksum words, so its bytes count swapped.
#[inline(always)]
pub const fn csum_words(old: u16, new: u16, odd: bool) -> (u16, u16) {
    if odd {
        (old.swap_bytes(), new.swap_bytes())
    } else {
        (old, new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csum;

    fn find_in(opts: &[u8]) -> Option<usize> {
        find(opts.len(), |i| opts.get(i).copied())
    }

    #[test]
    fn finds_mss_first_and_after_nops_and_other_options() {
        assert_eq!(find_in(&[2, 4, 5, 0xb4]), Some(2));
        assert_eq!(find_in(&[1, 1, 2, 4, 5, 0xb4]), Some(4));
        // SACK permitted, timestamps, then MSS.
        let mut o = vec![
            4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 2, 4, 5, 0xb4, 1, 1, 1,
        ];
        assert_eq!(find_in(&o), Some(15));
        o.truncate(16);
        assert_eq!(find_in(&o), None, "MSS value cut off");
    }

    #[test]
    fn stops_at_eol_and_bad_lengths() {
        assert_eq!(find_in(&[0, 2, 4, 5, 0xb4]), None);
        assert_eq!(find_in(&[8, 0, 2, 4, 5, 0xb4]), None, "length 0");
        assert_eq!(find_in(&[8, 1, 2, 4, 5, 0xb4]), None, "length 1");
        assert_eq!(find_in(&[2, 3, 5, 0xb4]), None, "MSS of length 3");
        assert_eq!(find_in(&[]), None);
        assert_eq!(find_in(&[1; 40]), None);
    }

    #[test]
    fn only_tcp_syns_with_clamping_on_are_wanted_and_others_load_no_flags() {
        use crate::tcp::{TCP_FIN, TCP_SYN};
        assert!(wanted(1200, crate::IPPROTO_TCP, || Some(TCP_SYN)));
        assert!(wanted(1200, crate::IPPROTO_TCP, || Some(TCP_SYN | 0x10)));
        assert!(!wanted(1200, crate::IPPROTO_TCP, || Some(TCP_FIN)));
        assert!(
            !wanted(1200, crate::IPPROTO_TCP, || None),
            "unreadable flags"
        );
        let unasked = || -> Option<u8> { panic!("flags loaded") };
        assert!(!wanted(0, crate::IPPROTO_TCP, unasked));
        assert!(!wanted(1200, crate::IPPROTO_UDP, unasked));
    }

    #[test]
    fn only_larger_values_are_clamped() {
        assert_eq!(clamped(1460, 1200), Some(1200));
        assert_eq!(clamped(1200, 1200), None);
        assert_eq!(clamped(536, 1200), None);
        assert_eq!(clamped(1460, 0), None);
    }

    #[test]
    fn incremental_update_is_right_at_odd_and_even_offsets() {
        for at in [20usize, 21, 22, 23] {
            let mut seg = vec![0u8; 44];
            for (i, b) in seg.iter_mut().enumerate() {
                *b = (i * 37 + 11) as u8;
            }
            seg[16] = 0;
            seg[17] = 0;
            seg[at..at + 2].copy_from_slice(&1460u16.to_be_bytes());
            let c = csum::checksum(&seg);
            seg[16..18].copy_from_slice(&c.to_ne_bytes());
            assert_eq!(csum::checksum(&seg), 0);
            let old = u16::from_ne_bytes([seg[at], seg[at + 1]]);
            let new = 1200u16.to_be();
            let (o, n) = csum_words(old, new, at % 2 == 1);
            let updated = csum::replace2(c, o, n);
            seg[at..at + 2].copy_from_slice(&new.to_ne_bytes());
            seg[16..18].copy_from_slice(&updated.to_ne_bytes());
            assert_eq!(csum::checksum(&seg), 0, "MSS at offset {at}");
        }
    }
}

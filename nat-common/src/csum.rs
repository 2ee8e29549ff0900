//! Internet checksum arithmetic (RFC 1071, incremental update per RFC 1624).
//!
//! All words are raw: 16-bit values exactly as they sit in the packet, read
//! as native integers. One's complement sums do not depend on byte order, so
//! as long as every word (including the checksum field) is taken the same
//! way the results are right on any host.

/// Folds a 32-bit one's complement accumulator to 16 bits.
#[inline(always)]
pub const fn fold(sum: u32) -> u16 {
    // Two folds always suffice for a u32 accumulator.
    let s = (sum & 0xffff) + (sum >> 16);
    let s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// Splits a raw 32-bit field (e.g. an address) into its two raw 16-bit words
/// as they lie in memory.
#[inline(always)]
pub const fn words(v: u32) -> (u16, u16) {
    let b = v.to_ne_bytes();
    (
        u16::from_ne_bytes([b[0], b[1]]),
        u16::from_ne_bytes([b[2], b[3]]),
    )
}

/// RFC 1624 eqn. 3: the checksum after one 16-bit word changed from `old` to
/// `new`: `HC' = ~(~HC + ~m + m')`.
#[inline(always)]
pub const fn replace2(check: u16, old: u16, new: u16) -> u16 {
    !fold((!check) as u32 + (!old) as u32 + new as u32)
}

/// As [`replace2`] for a 32-bit field (an IPv4 address).
#[inline(always)]
pub const fn replace4(check: u16, old: u32, new: u32) -> u16 {
    let (o1, o2) = words(old);
    let (n1, n2) = words(new);
    !fold((!check) as u32 + (!o1) as u32 + (!o2) as u32 + n1 as u32 + n2 as u32)
}

/// The update of a *partial* L4 checksum (CHECKSUM_PARTIAL: the field holds
/// the folded pseudo-header sum, not its complement) when an address of the
/// pseudo-header changes. Ports are not in the pseudo-header and must not be
/// applied to a partial checksum at all.
#[inline(always)]
pub const fn pseudo_replace4(partial: u16, old: u32, new: u32) -> u16 {
    !replace4(!partial, old, new)
}

/// The folded IPv4 pseudo-header sum (RFC 793/768) for an L4 segment of
/// `l4_len` bytes: exactly what Linux leaves in the checksum field of a
/// CHECKSUM_PARTIAL packet.
#[inline(always)]
pub const fn pseudo_header_sum(saddr: u32, daddr: u32, proto: u8, l4_len: u16) -> u16 {
    let (s1, s2) = words(saddr);
    let (d1, d2) = words(daddr);
    let p = u16::from_ne_bytes([0, proto]);
    let l = u16::from_ne_bytes(l4_len.to_be_bytes());
    fold(s1 as u32 + s2 as u32 + d1 as u32 + d2 as u32 + p as u32 + l as u32)
}

/// Whether an L4 checksum field may be a partial checksum rather than a
/// complete one. A partial checksum always equals the pseudo-header sum, so
/// `false` is certain; `true` is wrong only for the one complete checksum in
/// 65536 that happens to have that value, and such a packet merely takes the
/// slower TC path, which handles both kinds correctly.
#[inline(always)]
pub const fn maybe_partial(check: u16, saddr: u32, daddr: u32, proto: u8, l4_len: u16) -> bool {
    let p = pseudo_header_sum(saddr, daddr, proto, l4_len);
    // 0x0000 and 0xffff are the same one's complement value.
    check == p || (check == 0 && p == 0xffff) || (check == 0xffff && p == 0)
}

/// The full Internet checksum of `data` (for tests and the host side; the
/// fast path only ever updates checksums incrementally).
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum_bytes(data, 0))
}

/// One's complement sum of `data` added to `acc`, as raw words.
pub fn sum_bytes(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc = fold(acc + u16::from_ne_bytes([c[0], c[1]]) as u32) as u32;
    }
    if let [last] = chunks.remainder() {
        acc = fold(acc + u16::from_ne_bytes([*last, 0]) as u32) as u32;
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(a: [u8; 4]) -> u32 {
        u32::from_ne_bytes(a)
    }

    /// A real IPv4 header (checksum 0xb861 from RFC 1071's usual example).
    const IP_HDR: [u8; 20] = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8, 0x00,
        0x01, 0xc0, 0xa8, 0x00, 0xc7,
    ];

    #[test]
    fn full_checksum_of_valid_header_is_zero() {
        assert_eq!(checksum(&IP_HDR), 0);
    }

    #[test]
    fn incremental_address_update_matches_recomputation() {
        let mut h = IP_HDR;
        let old = addr([h[12], h[13], h[14], h[15]]);
        let new = addr([203, 0, 113, 77]);
        let check = u16::from_ne_bytes([h[10], h[11]]);
        let updated = replace4(check, old, new);
        h[12..16].copy_from_slice(&new.to_ne_bytes());
        h[10..12].copy_from_slice(&updated.to_ne_bytes());
        assert_eq!(checksum(&h), 0);
    }

    #[test]
    fn incremental_ttl_decrement_matches_recomputation() {
        let mut h = IP_HDR;
        let old = u16::from_ne_bytes([h[8], h[9]]);
        h[8] -= 1;
        let new = u16::from_ne_bytes([h[8], h[9]]);
        let check = u16::from_ne_bytes([h[10], h[11]]);
        h[10..12].copy_from_slice(&replace2(check, old, new).to_ne_bytes());
        assert_eq!(checksum(&h), 0);
    }

    /// Builds a UDP datagram with a complete checksum, as a host with
    /// offloads off sends it.
    fn udp(saddr: u32, daddr: u32, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let len = (8 + payload.len()) as u16;
        let mut d = Vec::new();
        d.extend_from_slice(&sport.to_be_bytes());
        d.extend_from_slice(&dport.to_be_bytes());
        d.extend_from_slice(&len.to_be_bytes());
        d.extend_from_slice(&[0, 0]);
        d.extend_from_slice(payload);
        let pseudo = pseudo_header_sum(saddr, daddr, 17, len) as u32;
        let c = !fold(sum_bytes(&d, pseudo));
        d[6..8].copy_from_slice(&c.to_ne_bytes());
        d
    }

    fn l4_valid(saddr: u32, daddr: u32, proto: u8, seg: &[u8]) -> bool {
        let pseudo = pseudo_header_sum(saddr, daddr, proto, seg.len() as u16) as u32;
        fold(sum_bytes(seg, pseudo)) == 0xffff
    }

    #[test]
    fn snat_of_full_l4_checksum_stays_valid() {
        let (s, d) = (addr([10, 1, 0, 11]), addr([198, 51, 100, 10]));
        let mut seg = udp(s, d, 40000, 53, b"hello, odd length");
        assert!(l4_valid(s, d, 17, &seg));
        let new_s = addr([192, 0, 2, 2]);
        let new_port = 1234u16.to_be();
        let old_port = u16::from_ne_bytes([seg[0], seg[1]]);
        let mut c = u16::from_ne_bytes([seg[6], seg[7]]);
        c = replace4(c, s, new_s);
        c = replace2(c, old_port, new_port);
        seg[0..2].copy_from_slice(&new_port.to_ne_bytes());
        seg[6..8].copy_from_slice(&c.to_ne_bytes());
        assert!(l4_valid(new_s, d, 17, &seg));
    }

    #[test]
    fn partial_checksum_is_recognised_and_full_one_is_not() {
        let (s, d) = (addr([10, 1, 0, 11]), addr([198, 51, 100, 10]));
        let seg = udp(s, d, 40000, 53, b"payload");
        let full = u16::from_ne_bytes([seg[6], seg[7]]);
        let partial = pseudo_header_sum(s, d, 17, seg.len() as u16);
        assert!(maybe_partial(partial, s, d, 17, seg.len() as u16));
        assert!(!maybe_partial(full, s, d, 17, seg.len() as u16));
    }

    #[test]
    fn partial_checksum_update_equals_partial_of_translated_header() {
        let (s, d) = (addr([10, 1, 0, 11]), addr([198, 51, 100, 10]));
        let new_s = addr([192, 0, 2, 2]);
        let p = pseudo_header_sum(s, d, 6, 1460);
        assert_eq!(
            pseudo_replace4(p, s, new_s),
            pseudo_header_sum(new_s, d, 6, 1460)
        );
    }

    #[test]
    fn words_split_in_memory_order() {
        let v = u32::from_ne_bytes([1, 2, 3, 4]);
        assert_eq!(
            words(v),
            (u16::from_ne_bytes([1, 2]), u16::from_ne_bytes([3, 4]))
        );
    }
}

/// A value for an L4 checksum field that stays what it is if a
/// CHECKSUM_PARTIAL offload later "completes" the checksum over the region
/// it covers. `rest` is the one's complement sum of that region without
/// the field. The offload writes `!fold(rest + field)`; a value `x` with
/// `rest + 2x ≡ 0` is a fixed point of that, and doubling in one's
/// complement is a rotation by one bit, so `x = rotr1(!rest)`. Used when
/// the gateway quotes a packet whose skb still says "checksum partial" in
/// an ICMP error it builds: whether or not the egress device completes the
/// quoted checksum, the bytes (and so the ICMP checksum over them) stay.
#[inline(always)]
pub const fn offload_fixed_point(rest: u16) -> u16 {
    let x = (!rest).rotate_right(1);
    // 0 and 0xffff are the same one's complement value; offloads write a
    // computed 0 as 0xffff (UDP), so start from that one.
    if x == 0 { 0xffff } else { x }
}

#[cfg(test)]
mod fixed_point_tests {
    use super::*;

    #[test]
    fn offload_completion_leaves_the_fixed_point_unchanged() {
        for seed in 0u32..2000 {
            let region: Vec<u8> = (0..30).map(|i| (seed * 7 + i * 13) as u8).collect();
            let mut seg = region.clone();
            seg[6] = 0;
            seg[7] = 0;
            let rest = fold(sum_bytes(&seg, 0));
            let x = offload_fixed_point(rest);
            seg[6..8].copy_from_slice(&x.to_ne_bytes());
            // What a checksum offload writes, seeded with the field.
            let completed = !fold(sum_bytes(&seg, 0));
            let completed = if completed == 0 { 0xffff } else { completed };
            assert_eq!(completed, x, "seed {seed}");
        }
    }
}

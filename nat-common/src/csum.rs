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

/// A UDP checksum as sent: 0 means "no checksum" in UDP, so a computed 0
/// goes out as 0xffff, the same one's complement value (RFC 768).
#[inline(always)]
pub const fn udp_sent(check: u16) -> u16 {
    if check == 0 { 0xffff } else { check }
}

/// The IPv4 header checksum after one address changed from `old_addr` to
/// `new_addr` and the TTL/protocol word from `ttl_old` to `ttl_new` (the
/// TTL decrement of a forwarded packet).
#[inline(always)]
pub const fn ip_after(check: u16, old_addr: u32, new_addr: u32, ttl_old: u16, ttl_new: u16) -> u16 {
    replace2(replace4(check, old_addr, new_addr), ttl_old, ttl_new)
}

/// The complete L4 checksum of protocol `proto` after one address of its
/// pseudo-header changed from `old_addr` to `new_addr` and one port (or
/// ICMP identifier) from `old_port` to `new_port`. TCP and UDP cover the
/// pseudo-header; UDP's "no checksum" 0 stays 0; ICMP has no
/// pseudo-header, so only the identifier counts. For a checksum that may
/// be partial, see [`l4_maybe_partial`].
#[inline(always)]
pub const fn l4_after(
    proto: u8,
    check: u16,
    old_addr: u32,
    new_addr: u32,
    old_port: u16,
    new_port: u16,
) -> u16 {
    match proto {
        crate::IPPROTO_TCP => replace2(replace4(check, old_addr, new_addr), old_port, new_port),
        crate::IPPROTO_UDP if check == 0 => 0,
        crate::IPPROTO_UDP => udp_sent(replace2(
            replace4(check, old_addr, new_addr),
            old_port,
            new_port,
        )),
        _ => replace2(check, old_port, new_port),
    }
}

/// Whether the L4 checksum `check` of a `proto` segment of `l4_len` bytes
/// may be partial ([`maybe_partial`]): TCP and UDP only (ICMP has no
/// pseudo-header, so no partial form), and never UDP's "no checksum" 0.
#[inline(always)]
pub const fn l4_maybe_partial(proto: u8, check: u16, saddr: u32, daddr: u32, l4_len: u16) -> bool {
    match proto {
        crate::IPPROTO_TCP => maybe_partial(check, saddr, daddr, proto, l4_len),
        crate::IPPROTO_UDP => check != 0 && maybe_partial(check, saddr, daddr, proto, l4_len),
        _ => false,
    }
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

    /// A TCP segment with a complete checksum.
    fn tcp(saddr: u32, daddr: u32, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&sport.to_be_bytes());
        d.extend_from_slice(&dport.to_be_bytes());
        d.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
        d.extend_from_slice(payload);
        let pseudo = pseudo_header_sum(saddr, daddr, 6, d.len() as u16) as u32;
        let c = !fold(sum_bytes(&d, pseudo));
        d[16..18].copy_from_slice(&c.to_ne_bytes());
        d
    }

    /// An ICMP echo request with a complete checksum.
    fn echo(id: u16, payload: &[u8]) -> Vec<u8> {
        let mut d = vec![8, 0, 0, 0];
        d.extend_from_slice(&id.to_be_bytes());
        d.extend_from_slice(&[0, 1]);
        d.extend_from_slice(payload);
        let c = checksum(&d);
        d[2..4].copy_from_slice(&c.to_ne_bytes());
        d
    }

    /// Applies `l4_after` to the segment the way the dataplane does (port
    /// or identifier at `port_at`, checksum at `check_at`).
    fn translate(seg: &mut [u8], proto: u8, port_at: usize, check_at: usize, old: u32, new: u32) {
        let new_port = 61000u16.to_be();
        let old_port = u16::from_ne_bytes([seg[port_at], seg[port_at + 1]]);
        let check = u16::from_ne_bytes([seg[check_at], seg[check_at + 1]]);
        let c = l4_after(proto, check, old, new, old_port, new_port);
        seg[port_at..port_at + 2].copy_from_slice(&new_port.to_ne_bytes());
        seg[check_at..check_at + 2].copy_from_slice(&c.to_ne_bytes());
    }

    #[test]
    fn l4_after_keeps_tcp_udp_and_icmp_checksums_valid_through_snat() {
        let (s, d) = (addr([10, 1, 0, 11]), addr([198, 51, 100, 10]));
        let new_s = addr([192, 0, 2, 2]);
        let mut t = tcp(s, d, 40000, 443, b"GET / HTTP/1.1");
        translate(&mut t, 6, 0, 16, s, new_s);
        assert!(l4_valid(new_s, d, 6, &t));
        let mut u = udp(s, d, 40000, 53, b"odd length query");
        translate(&mut u, 17, 0, 6, s, new_s);
        assert!(l4_valid(new_s, d, 17, &u));
        // ICMP: no pseudo-header, the addresses do not count.
        let mut e = echo(0x1234, b"ping");
        translate(&mut e, 1, 4, 2, s, new_s);
        assert_eq!(checksum(&e), 0);
    }

    #[test]
    fn l4_after_keeps_udp_without_checksum_and_never_computes_zero() {
        let (s, new_s) = (addr([10, 1, 0, 11]), addr([192, 0, 2, 2]));
        assert_eq!(l4_after(17, 0, s, new_s, 1, 2), 0);
        // A port change that brings the raw result to 0: sent as 0xffff.
        let check = 0x1234u16;
        let old_port = 0u16;
        let new_port = (0..=u16::MAX)
            .find(|p| replace2(check, old_port, *p) == 0)
            .expect("some port zeroes the sum");
        assert_eq!(l4_after(17, check, s, s, old_port, new_port), 0xffff);
        assert_eq!(l4_after(6, check, s, s, old_port, new_port), 0);
    }

    #[test]
    fn ip_after_matches_recomputation_of_snat_and_ttl_decrement() {
        let mut h = IP_HDR;
        let old = addr([h[12], h[13], h[14], h[15]]);
        let new = addr([203, 0, 113, 77]);
        let check = u16::from_ne_bytes([h[10], h[11]]);
        let ttl_old = u16::from_ne_bytes([h[8], h[9]]);
        h[8] -= 1;
        let ttl_new = u16::from_ne_bytes([h[8], h[9]]);
        h[12..16].copy_from_slice(&new.to_ne_bytes());
        h[10..12].copy_from_slice(&ip_after(check, old, new, ttl_old, ttl_new).to_ne_bytes());
        assert_eq!(checksum(&h), 0);
    }

    #[test]
    fn only_tcp_and_udp_with_a_checksum_may_be_partial() {
        let (s, d) = (addr([10, 1, 0, 11]), addr([198, 51, 100, 10]));
        let tcp_partial = pseudo_header_sum(s, d, 6, 40);
        assert!(l4_maybe_partial(6, tcp_partial, s, d, 40));
        let udp_partial = pseudo_header_sum(s, d, 17, 40);
        assert!(l4_maybe_partial(17, udp_partial, s, d, 40));
        // UDP "no checksum", whatever the pseudo-header sums to.
        let zero_sum_addr = (0..=u32::MAX)
            .step_by(65_521)
            .find(|a| matches!(pseudo_header_sum(*a, d, 17, 40), 0 | 0xffff))
            .expect("an address whose pseudo-header sums to zero");
        assert!(maybe_partial(0, zero_sum_addr, d, 17, 40));
        assert!(!l4_maybe_partial(17, 0, zero_sum_addr, d, 40));
        // ICMP never, even with a matching value.
        assert!(!l4_maybe_partial(
            1,
            pseudo_header_sum(s, d, 1, 40),
            s,
            d,
            40
        ));
        // A complete checksum is not partial.
        let seg = udp(s, d, 40000, 53, b"payload");
        let full = u16::from_ne_bytes([seg[6], seg[7]]);
        assert!(!l4_maybe_partial(17, full, s, d, seg.len() as u16));
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

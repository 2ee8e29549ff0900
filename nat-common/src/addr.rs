//! Destinations the gateway never translates.

/// Whether `daddr` (raw, network order) is a destination the kernel never
/// forwards: multicast (224.0.0.0/4; no multicast routing here), the
/// limited broadcast 255.255.255.255, or "this network" (0.0.0.0/8, a
/// martian). The FIB knows none of them (a lookup finds the default route),
/// so without this check an inside host's mDNS, SSDP or DHCP would be
/// translated and sent out of `--ext`. Such a packet is the kernel's: it
/// delivers it to local listeners, or drops it.
#[inline(always)]
pub const fn never_forwarded(daddr: u32) -> bool {
    let first = daddr.to_ne_bytes()[0];
    first == 0 || (first >= 224 && first < 240) || daddr == u32::MAX
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(a: [u8; 4]) -> u32 {
        u32::from_ne_bytes(a)
    }

    #[test]
    fn multicast_limited_broadcast_and_this_network_are_never_forwarded() {
        for a in [
            [224, 0, 0, 251],
            [239, 255, 255, 250],
            [255, 255, 255, 255],
            [0, 0, 0, 0],
            [0, 1, 2, 3],
        ] {
            assert!(never_forwarded(raw(a)), "{a:?}");
        }
    }

    #[test]
    fn unicast_and_directed_broadcast_are_routed() {
        // A directed broadcast of another subnet is routed like unicast;
        // one of the gateway's own subnets is in its local table (the FIB
        // says local).
        for a in [
            [198, 51, 100, 10],
            [10, 1, 0, 255],
            [223, 255, 255, 255],
            [240, 0, 0, 1],
            [1, 0, 0, 0],
        ] {
            assert!(!never_forwarded(raw(a)), "{a:?}");
        }
    }
}

//! The TCP reset the egress policy answers a denied TCP flow with (RFC 793
//! "Reset Generation"): from the destination to the sender, in the
//! sender's sequence space, so its connect() fails at once.

use crate::{IPPROTO_TCP, csum};

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;
/// IPv4 header (no options) and TCP header (no options).
pub const LEN: usize = 40;
const TTL: u8 = 64;

/// What of the offending segment the reset depends on. Addresses and ports
/// as on the wire (raw network order), sequence numbers in host order.
#[derive(Clone, Copy, Debug)]
pub struct Segment {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    /// Payload bytes.
    pub data_len: u32,
}

/// The IPv4 and TCP headers of the reset answering `s`, or `None` for a
/// reset (never answered). `partial`: the TCP checksum field gets the
/// pseudo-header sum, for a packet whose checksum the NIC (or the
/// receiving stack) completes, as the offending one's was.
pub fn headers(s: &Segment, partial: bool) -> Option<[u8; LEN]> {
    if s.flags & TCP_RST != 0 {
        return None;
    }
    // With an ACK, the reset takes its sequence number from it; without,
    // it acknowledges everything the segment occupied.
    let (seq, ack, flags) = if s.flags & TCP_ACK != 0 {
        (s.ack, 0, TCP_RST)
    } else {
        let mut len = s.data_len;
        if s.flags & TCP_SYN != 0 {
            len += 1;
        }
        if s.flags & TCP_FIN != 0 {
            len += 1;
        }
        (0, s.seq.wrapping_add(len), TCP_RST | TCP_ACK)
    };
    let src = s.daddr.to_ne_bytes();
    let dst = s.saddr.to_ne_bytes();
    let sp = s.dport.to_ne_bytes();
    let dp = s.sport.to_ne_bytes();
    let sq = seq.to_be_bytes();
    let ak = ack.to_be_bytes();
    let tot = (LEN as u16).to_be_bytes();
    let mut h: [u8; LEN] = [
        0x45,
        0,
        tot[0],
        tot[1],
        0,
        0,
        0x40,
        0,
        TTL,
        IPPROTO_TCP,
        0,
        0,
        src[0],
        src[1],
        src[2],
        src[3],
        dst[0],
        dst[1],
        dst[2],
        dst[3],
        sp[0],
        sp[1],
        dp[0],
        dp[1],
        sq[0],
        sq[1],
        sq[2],
        sq[3],
        ak[0],
        ak[1],
        ak[2],
        ak[3],
        0x50,
        flags,
        0,
        0,
        0,
        0,
        0,
        0,
    ];
    let ip = csum::checksum(&h[..20]).to_ne_bytes();
    h[10] = ip[0];
    h[11] = ip[1];
    let pseudo = csum::pseudo_header_sum(s.daddr, s.saddr, IPPROTO_TCP, 20);
    let tcp = if partial {
        pseudo
    } else {
        !csum::fold(csum::sum_bytes(&h[20..], pseudo as u32))
    }
    .to_ne_bytes();
    h[36] = tcp[0];
    h[37] = tcp[1];
    Some(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn syn() -> Segment {
        Segment {
            saddr: u32::from_ne_bytes([10, 0, 0, 2]),
            daddr: u32::from_ne_bytes([192, 0, 2, 80]),
            sport: 40000u16.to_be(),
            dport: 25u16.to_be(),
            seq: 1000,
            ack: 0,
            flags: TCP_SYN,
            data_len: 0,
        }
    }

    #[test]
    fn a_syn_gets_rst_ack_from_its_destination_acknowledging_the_syn() {
        let h = headers(&syn(), false).unwrap();
        assert_eq!(&h[12..16], &[192, 0, 2, 80]);
        assert_eq!(&h[16..20], &[10, 0, 0, 2]);
        assert_eq!(u16::from_be_bytes([h[20], h[21]]), 25);
        assert_eq!(u16::from_be_bytes([h[22], h[23]]), 40000);
        assert_eq!(u32::from_be_bytes([h[24], h[25], h[26], h[27]]), 0);
        assert_eq!(u32::from_be_bytes([h[28], h[29], h[30], h[31]]), 1001);
        assert_eq!(h[33], TCP_RST | TCP_ACK);
        // Both checksums verify: a correct header sums to all ones.
        assert_eq!(csum::fold(csum::sum_bytes(&h[..20], 0)), 0xffff);
        let pseudo = csum::pseudo_header_sum(syn().daddr, syn().saddr, IPPROTO_TCP, 20);
        assert_eq!(csum::fold(csum::sum_bytes(&h[20..], pseudo as u32)), 0xffff);
    }

    #[test]
    fn a_segment_with_ack_gets_a_bare_rst_at_its_ack_and_a_rst_none() {
        let mut s = syn();
        s.flags = TCP_ACK;
        s.ack = 77;
        s.data_len = 10;
        let h = headers(&s, false).unwrap();
        assert_eq!(u32::from_be_bytes([h[24], h[25], h[26], h[27]]), 77);
        assert_eq!(h[33], TCP_RST);
        s.flags = TCP_RST | TCP_ACK;
        assert!(headers(&s, false).is_none());
    }

    #[test]
    fn a_partial_checksum_holds_the_pseudo_header_sum() {
        let h = headers(&syn(), true).unwrap();
        let want = csum::pseudo_header_sum(syn().daddr, syn().saddr, IPPROTO_TCP, 20);
        assert_eq!(u16::from_ne_bytes([h[36], h[37]]), want);
    }
}

//! Crafting frames for BPF_PROG_TEST_RUN fixtures. The checksum code here is
//! written independently of nat-common's, so a fixture compares the
//! dataplane's incremental updates against a from-scratch computation.

use std::net::{Ipv4Addr, SocketAddrV4};

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

/// How the L4 checksum field is filled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Csum {
    /// Complete, as a host with checksum offload off sends it.
    Full,
    /// Only the pseudo-header sum, as Linux leaves it for offload
    /// (CHECKSUM_PARTIAL).
    Partial,
    /// UDP "no checksum".
    Zero,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    /// ICMP echo request (type 8) or reply (type 0).
    Echo {
        kind: u8,
        id: u16,
        seq: u16,
    },
    /// Any other IP protocol, payload only.
    Raw {
        proto: u8,
    },
}

#[derive(Clone, Debug)]
pub struct Packet {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    /// Bytes of IP options (a multiple of 4, at most 40).
    pub options: Vec<u8>,
    pub l4: L4,
    pub payload: Vec<u8>,
    pub csum: Csum,
}

fn sum16(data: &[u8], mut acc: u32) -> u32 {
    for pair in data.chunks(2) {
        let hi = pair[0] as u32;
        let lo = pair.get(1).copied().unwrap_or(0) as u32;
        acc += (hi << 8) | lo;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The Internet checksum of `data` (RFC 1071), as a big-endian value.
pub fn internet_checksum(data: &[u8]) -> u16 {
    !fold(sum16(data, 0))
}

/// The TCP/UDP checksum of `segment` (header and payload) from `src` to
/// `dst`, pseudo-header included: what belongs in the field while it is
/// zero, and 0 when the segment's own checksum is right.
pub fn l4_checksum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, segment: &[u8]) -> u16 {
    !fold(sum16(segment, pseudo(src, dst, proto, segment.len())))
}

/// [`l4_checksum`] of the TCP or UDP segment of IPv4 packet `ip` (no
/// Ethernet header; the segment ends at the total length): 0 when right.
pub fn ip_l4_checksum(ip: &[u8]) -> u16 {
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let addr = |at: usize| Ipv4Addr::new(ip[at], ip[at + 1], ip[at + 2], ip[at + 3]);
    l4_checksum(addr(12), addr(16), ip[9], &ip[ihl..tot])
}

/// A UDP segment (header and payload) from `src` to `dst`, with its
/// checksum.
pub fn udp_segment(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let mut s = Vec::with_capacity(8 + payload.len());
    s.extend_from_slice(&src.port().to_be_bytes());
    s.extend_from_slice(&dst.port().to_be_bytes());
    s.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    s.extend_from_slice(&[0, 0]);
    s.extend_from_slice(payload);
    let c = match l4_checksum(*src.ip(), *dst.ip(), IPPROTO_UDP, &s) {
        // A computed 0 is sent as 0xffff: 0 means "no checksum".
        0 => 0xffff,
        c => c,
    };
    s[6..8].copy_from_slice(&c.to_be_bytes());
    s
}

/// An ICMP echo request (`kind` 8) or reply (0) with its checksum.
pub fn echo_message(kind: u8, id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut m = vec![kind, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(payload);
    let c = internet_checksum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

fn pseudo(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    let mut p = Vec::with_capacity(12);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&[0, proto]);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    sum16(&p, 0)
}

impl Packet {
    pub fn proto(&self) -> u8 {
        match self.l4 {
            L4::Tcp { .. } => IPPROTO_TCP,
            L4::Udp { .. } => IPPROTO_UDP,
            L4::Echo { .. } => IPPROTO_ICMP,
            L4::Raw { proto } => proto,
        }
    }

    /// The L4 segment with its checksum filled as `self.csum` says.
    fn segment(&self) -> Vec<u8> {
        let mut s = Vec::new();
        let check_at = match self.l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
            } => {
                s.extend_from_slice(&sport.to_be_bytes());
                s.extend_from_slice(&dport.to_be_bytes());
                s.extend_from_slice(&0x0102_0304u32.to_be_bytes()); // seq
                s.extend_from_slice(&0u32.to_be_bytes()); // ack
                s.extend_from_slice(&[0x50, flags]); // 20-byte header
                s.extend_from_slice(&64240u16.to_be_bytes()); // window
                s.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
                Some(16)
            }
            L4::Udp { sport, dport } => {
                s.extend_from_slice(&sport.to_be_bytes());
                s.extend_from_slice(&dport.to_be_bytes());
                s.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                s.extend_from_slice(&[0, 0]);
                Some(6)
            }
            L4::Echo { kind, id, seq } => return echo_message(kind, id, seq, &self.payload),
            L4::Raw { .. } => None,
        };
        s.extend_from_slice(&self.payload);
        if let Some(at) = check_at {
            let c = match self.csum {
                Csum::Zero => 0,
                Csum::Partial => fold(pseudo(self.src, self.dst, self.proto(), s.len())),
                Csum::Full => {
                    let c = l4_checksum(self.src, self.dst, self.proto(), &s);
                    // UDP sends a computed 0 as 0xffff: 0 means "none".
                    if c == 0 && self.proto() == IPPROTO_UDP {
                        0xffff
                    } else {
                        c
                    }
                }
            };
            s[at..at + 2].copy_from_slice(&c.to_be_bytes());
        }
        s
    }

    /// The whole Ethernet frame.
    pub fn build(&self) -> Vec<u8> {
        assert!(self.options.len().is_multiple_of(4) && self.options.len() <= 40);
        let seg = self.segment();
        let ihl = 20 + self.options.len();
        let mut ip = Vec::with_capacity(ihl + seg.len());
        ip.push(0x40 | (ihl / 4) as u8);
        ip.push(0);
        ip.extend_from_slice(&((ihl + seg.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&0x1c46u16.to_be_bytes()); // identification
        ip.extend_from_slice(&0x4000u16.to_be_bytes()); // DF
        ip.push(self.ttl);
        ip.push(self.proto());
        ip.extend_from_slice(&[0, 0]);
        ip.extend_from_slice(&self.src.octets());
        ip.extend_from_slice(&self.dst.octets());
        ip.extend_from_slice(&self.options);
        let c = internet_checksum(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        ip.extend_from_slice(&seg);
        let mut frame = Vec::with_capacity(14 + ip.len());
        frame.extend_from_slice(&self.dst_mac);
        frame.extend_from_slice(&self.src_mac);
        frame.extend_from_slice(&0x0800u16.to_be_bytes());
        frame.extend_from_slice(&ip);
        frame
    }
}

/// A complete checksum `check` updated incrementally for data whose one's
/// complement sum went from `old_sum` to `new_sum` (RFC 1624, eqn. 3:
/// HC' = ~(~HC + ~m + m')). A checksum field that is really a partial
/// one, updated as if complete, ends up here too.
pub fn checksum_updated(check: u16, old_sum: u16, new_sum: u16) -> u16 {
    !fold(u32::from(!check) + u32::from(!old_sum) + u32::from(new_sum))
}

/// The L4 checksum field of an Ethernet frame with a TCP or UDP packet.
pub fn l4_checksum_field(frame: &[u8]) -> u16 {
    let ip = &frame[14..];
    let l4 = &ip[usize::from(ip[0] & 0x0f) * 4..];
    let at = if ip[9] == IPPROTO_TCP { 16 } else { 6 };
    u16::from_be_bytes([l4[at], l4[at + 1]])
}

/// Whether the IP header checksum and the L4 checksum of an Ethernet frame
/// are both valid (a partial L4 checksum is not).
pub fn checksums_valid(frame: &[u8]) -> bool {
    let ip = &frame[14..];
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    if internet_checksum(&ip[..ihl]) != 0 {
        return false;
    }
    let seg = &ip[ihl..tot];
    match ip[9] {
        IPPROTO_UDP if seg[6] == 0 && seg[7] == 0 => true,
        IPPROTO_TCP | IPPROTO_UDP => ip_l4_checksum(ip) == 0,
        IPPROTO_ICMP => internet_checksum(seg) == 0,
        _ => true,
    }
}

/// Recomputes the IP header checksum of an Ethernet frame (if its header
/// is all there): after changing a field, as a deliberate sender would.
pub fn set_ip_checksum(frame: &mut [u8]) {
    if frame.len() < 34 {
        return;
    }
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    if ihl < 20 || 14 + ihl > frame.len() {
        return;
    }
    frame[24..26].copy_from_slice(&[0, 0]);
    let c = internet_checksum(&frame[14..14 + ihl]);
    frame[24..26].copy_from_slice(&c.to_be_bytes());
}

/// The fragments of a datagram (an Ethernet frame with an IPv4 packet):
/// its L4 bytes cut in pieces of `chunk` 8-byte units, each behind a copy
/// of the IP header with its length, offset, MF bit, identification `id`
/// and checksum, in order (the first one holds the L4 header).
pub fn fragments(frame: &[u8], chunk: usize, id: u16) -> Vec<Vec<u8>> {
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let head = &frame[..14 + ihl];
    let body = &frame[14 + ihl..];
    let step = chunk * 8;
    let pieces = body.len().div_ceil(step).max(1);
    (0..pieces)
        .map(|i| {
            let part = &body[(i * step).min(body.len())..((i + 1) * step).min(body.len())];
            let mut f = head.to_vec();
            f.extend_from_slice(part);
            let tot = (ihl + part.len()) as u16;
            f[16..18].copy_from_slice(&tot.to_be_bytes());
            f[18..20].copy_from_slice(&id.to_be_bytes());
            let mf = if i + 1 < pieces { 0x2000 } else { 0 };
            let word = mf | (i * step / 8) as u16;
            f[20..22].copy_from_slice(&word.to_be_bytes());
            set_ip_checksum(&mut f);
            f
        })
        .collect()
}

/// Parses "aa:bb:cc:dd:ee:ff".
pub fn parse_mac(s: &str) -> anyhow::Result<[u8; 6]> {
    let parts: Vec<&str> = s.trim().split(':').collect();
    anyhow::ensure!(parts.len() == 6, "not a MAC address: {s:?}");
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).map_err(|_| anyhow::anyhow!("not a MAC address: {s:?}"))?;
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(l4: L4, csum: Csum) -> Packet {
        Packet {
            dst_mac: [2, 0, 0, 0, 0, 1],
            src_mac: [2, 0, 0, 0, 0, 2],
            src: Ipv4Addr::new(10, 1, 0, 11),
            dst: Ipv4Addr::new(198, 51, 100, 10),
            ttl: 64,
            options: vec![],
            l4,
            payload: b"abc".to_vec(),
            csum,
        }
    }

    #[test]
    fn built_frames_have_valid_checksums() {
        for l4 in [
            L4::Tcp {
                sport: 1,
                dport: 2,
                flags: TCP_SYN,
            },
            L4::Udp { sport: 1, dport: 2 },
            L4::Echo {
                kind: 8,
                id: 7,
                seq: 1,
            },
        ] {
            assert!(checksums_valid(&sample(l4, Csum::Full).build()));
        }
    }

    #[test]
    fn an_incremental_update_equals_the_checksum_computed_from_scratch() {
        let tcp = L4::Tcp {
            sport: 1,
            dport: 2,
            flags: TCP_SYN,
        };
        let before = sample(tcp.clone(), Csum::Full);
        let after = Packet {
            src: Ipv4Addr::new(192, 0, 2, 2),
            ..before.clone()
        };
        let sum = |p: &Packet| fold(sum16(&p.src.octets(), 0));
        assert_eq!(
            checksum_updated(
                l4_checksum_field(&before.build()),
                sum(&before),
                sum(&after)
            ),
            l4_checksum_field(&after.build())
        );
    }

    #[test]
    fn partial_checksum_is_not_valid() {
        let f = sample(
            L4::Tcp {
                sport: 1,
                dport: 2,
                flags: TCP_SYN,
            },
            Csum::Partial,
        )
        .build();
        assert!(!checksums_valid(&f));
    }
}

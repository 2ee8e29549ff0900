//! A SYN flood of distinct 5-tuples from one lab host: crafted TCP SYNs
//! sent through a raw IPv4 socket (`IPPROTO_RAW`, header included), as
//! fast as the sending thread goes. Every SYN is a new flow for the
//! gateway: distinct source ports times several destination ports.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::{
    Host, Lab,
    packet::{IPPROTO_TCP, l4_checksum},
};

/// Source ports the flood uses: above the well-known ones.
const SPORT_MIN: u32 = 1024;
const SPORTS: u32 = 65536 - SPORT_MIN;
/// Odd and prime to 3 and 7, so coprime with [`SPORTS`] (2^10 * 3^2 * 7):
/// `n * STRIDE mod SPORTS` visits every port once, in a scattered order.
const STRIDE: u32 = 40499;

/// What a flood sent.
#[derive(Clone, Copy, Debug)]
pub struct FloodReport {
    pub sent: u64,
    pub elapsed: Duration,
}

impl FloodReport {
    pub fn rate(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The `n`-th tuple of a flood over `dports`: the destination port cycles
/// fastest, so consecutive SYNs share a source port (one binding, several
/// sessions, as a scanner's would).
pub fn tuple(n: u32, dports: &[u16]) -> (u16, u16) {
    let p = dports.len() as u32;
    let dport = dports[(n % p) as usize];
    let sport = SPORT_MIN + ((n / p) as u64 * STRIDE as u64 % SPORTS as u64) as u32;
    (sport as u16, dport)
}

/// The most distinct tuples a flood over `ports` destination ports has.
pub fn max_tuples(ports: usize) -> u64 {
    SPORTS as u64 * ports as u64
}

/// A 40-byte IPv4 + TCP SYN with a complete TCP checksum (the kernel fills
/// the IP checksum and total length of an `IPPROTO_RAW` packet).
fn syn(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, seq: u32) -> [u8; 40] {
    let mut p = [0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[6] = 0x40; // DF
    p[8] = 64; // TTL
    p[9] = 6; // TCP
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let t = &mut p[20..];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[12] = 0x50; // 20-byte header
    t[13] = 0x02; // SYN
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let c = l4_checksum(src, dst, IPPROTO_TCP, t);
    t[16..18].copy_from_slice(&c.to_be_bytes());
    p
}

/// Sends `count` SYNs from `from` (source address `src`) to `dst`, each a
/// distinct 5-tuple ([`tuple`]), at most `rate` per second. Blocks until
/// sent.
///
/// Unpaced, a raw socket outruns the veth backlog (1000 packets per CPU)
/// and a good part of the flood never reaches the gateway; a rate the
/// path sustains makes every SYN count.
pub fn syn_flood(
    lab: &Lab,
    from: Host,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    dports: &[u16],
    count: u32,
    rate: u32,
) -> Result<FloodReport> {
    if dports.is_empty() || count as u64 > max_tuples(dports.len()) {
        bail!(
            "{count} distinct tuples need more than {} destination ports",
            dports.len()
        );
    }
    let sock = lab
        .in_ns(from, || {
            Socket::new(
                Domain::IPV4,
                Type::RAW,
                Some(Protocol::from(libc::IPPROTO_RAW)),
            )
        })?
        .with_context(|| format!("raw socket in {from}"))?;
    let to = SockAddr::from(SocketAddrV4::new(dst, 0));
    let start = Instant::now();
    let mut sent = 0u64;
    let per_packet = Duration::from_secs(1) / rate.max(1);
    for n in 0..count {
        // Paced in bursts of 64: the schedule, not a sleep per packet.
        if n % 64 == 0 {
            let due = per_packet * n;
            // Sleep rather than spin: the machine running the test is the
            // one forwarding the flood.
            if let Some(ahead) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(ahead);
            }
        }
        let (sport, dport) = tuple(n, dports);
        let pkt = syn(src, dst, sport, dport, n.wrapping_mul(2_654_435_761));
        loop {
            match sock.send_to(&pkt, &to) {
                Ok(_) => break,
                // The socket buffer is full: the sender outran the path.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    std::thread::yield_now();
                }
                Err(e) => return Err(e).with_context(|| format!("sending SYN {n}")),
            }
        }
        sent += 1;
    }
    Ok(FloodReport {
        sent,
        elapsed: start.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::ip_l4_checksum;
    use std::collections::HashSet;

    #[test]
    fn tuples_are_distinct() {
        let ports = [7001, 7002, 7003, 7004];
        let n = 120_000;
        let set: HashSet<(u16, u16)> = (0..n).map(|i| tuple(i, &ports)).collect();
        assert_eq!(set.len(), n as usize);
        assert!(set.iter().all(|(s, _)| *s >= 1024));
    }

    #[test]
    fn syn_checksum_verifies() {
        let src = Ipv4Addr::new(10, 1, 0, 12);
        let dst = Ipv4Addr::new(198, 51, 100, 10);
        let p = syn(src, dst, 40000, 7001, 1);
        assert_eq!(ip_l4_checksum(&p), 0);
    }
}

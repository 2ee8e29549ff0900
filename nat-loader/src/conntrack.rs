//! The control plane's view of the conntrack maps: listing flows and
//! sweeping expired ones.

use std::{
    fmt,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use anyhow::Result;
use aya::maps::{HashMap, MapData};
use nat_common::{CtKey, CtValue, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, tcp, timeouts::Timeouts};

type CtMap = HashMap<MapData, CtKey, CtValue>;

/// A translated flow as an operator reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    pub proto: u8,
    pub inside: SocketAddrV4,
    pub external: SocketAddrV4,
    pub remote: SocketAddrV4,
    pub tcp_state: u8,
    pub idle: Duration,
}

fn addr(raw: u32) -> Ipv4Addr {
    Ipv4Addr::from(raw.to_ne_bytes())
}

fn sock(raw_addr: u32, raw_port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(addr(raw_addr), u16::from_be(raw_port))
}

impl Flow {
    pub fn from_entry(key: &CtKey, v: &CtValue, now_ns: u64) -> Flow {
        let (ext_addr, ext_port) = v.snat_addr_port();
        Flow {
            proto: key.proto,
            inside: sock(key.src_addr, key.src_port),
            external: sock(ext_addr, ext_port),
            remote: sock(key.dst_addr, key.dst_port),
            tcp_state: v.tcp_state,
            idle: Duration::from_nanos(now_ns.saturating_sub(v.last_seen_ns)),
        }
    }
}

impl fmt::Display for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (proto, state) = match self.proto {
            IPPROTO_TCP => ("tcp", tcp::phase_name(self.tcp_state)),
            IPPROTO_UDP => ("udp", ""),
            IPPROTO_ICMP => ("icmp", ""),
            _ => ("?", ""),
        };
        write!(
            f,
            "{proto:<4} {} -> {} => {} -> {} {state} idle {}s",
            self.inside,
            self.remote,
            self.external,
            self.remote,
            self.idle.as_secs()
        )
    }
}

/// Every flow in the forward table.
pub fn flows(fwd: &CtMap, now_ns: u64) -> Vec<Flow> {
    fwd.iter()
        .filter_map(|r| r.ok())
        .map(|(k, v)| Flow::from_entry(&k, &v, now_ns))
        .collect()
}

/// What a sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    pub expired: usize,
    pub orphans: usize,
    pub remaining: usize,
}

/// Removes the pairs idle longer than their timeout, and reverse entries
/// whose forward twin is gone. Keys are collected first: deleting while
/// walking a BPF hash map restarts the walk.
pub fn sweep(fwd: &mut CtMap, rev: &mut CtMap, t: &Timeouts, now_ns: u64) -> Result<Sweep> {
    let mut out = Sweep::default();
    let entries: Vec<(CtKey, CtValue)> = fwd.iter().filter_map(|r| r.ok()).collect();
    for (k, v) in &entries {
        let rev_seen = rev.get(&v.peer, 0).map(|r| r.last_seen_ns).unwrap_or(0);
        let last = v.last_seen_ns.max(rev_seen);
        if t.expired(k.proto, v.tcp_state, last, now_ns) {
            // Forward first: a new packet of the flow then builds a fresh
            // pair instead of reusing a half-removed one.
            let _ = fwd.remove(k);
            let _ = rev.remove(&v.peer);
            out.expired += 1;
        } else {
            out.remaining += 1;
        }
    }
    let rev_entries: Vec<(CtKey, CtValue)> = rev.iter().filter_map(|r| r.ok()).collect();
    for (k, v) in &rev_entries {
        if fwd.get(&v.peer, 0).is_err() && t.expired(k.proto, 0, v.last_seen_ns, now_ns) {
            let _ = rev.remove(k);
            out.orphans += 1;
        }
    }
    Ok(out)
}

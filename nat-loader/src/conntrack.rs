//! The control plane's view of the conntrack maps: listing flows and
//! sweeping expired ones.

use std::{
    collections::HashSet,
    fmt,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use anyhow::Result;
use aya::maps::{HashMap, MapData};
use nat_common::{
    BIND_F_RELEASED, BindKey, BindValue, CT_F_INBOUND, CtKey, CtValue, IPPROTO_ICMP, IPPROTO_TCP,
    IPPROTO_UDP, tcp, timeouts::Timeouts,
};

use crate::dataplane::CtMaps;

type CtMap = HashMap<MapData, CtKey, CtValue>;

/// A translated flow as an operator reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    pub proto: u8,
    pub inside: SocketAddrV4,
    pub external: SocketAddrV4,
    pub remote: SocketAddrV4,
    pub tcp_state: u8,
    /// Opened by an inbound packet (a filtering mode other than the
    /// default let it in).
    pub inbound: bool,
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
            inbound: v.flags & CT_F_INBOUND != 0,
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
        let opened = if self.inbound { " opened-inbound" } else { "" };
        write!(
            f,
            "{proto:<4} {} -> {} => {} -> {} {state}{opened} idle {}s",
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
    /// Sessions removed for being idle longer than their timeout.
    pub expired: usize,
    /// Sessions left.
    pub remaining: usize,
    /// Bindings no session uses any more, now held.
    pub released: usize,
    /// Bindings whose hold ended: their external port is free again.
    pub freed: usize,
    /// Half-bindings or filter entries with nothing behind them.
    pub orphans: usize,
}

/// Removes idle sessions; releases the bindings no session uses (they stay
/// reserved for their inside endpoint for `hold_ns`, RFC 6888) and frees
/// those held longer; drops address-filter entries of remotes no session
/// talks to any more. Keys are collected first: deleting while walking a
/// BPF hash map restarts the walk.
pub fn sweep(m: &mut CtMaps, t: &Timeouts, hold_ns: u64, now_ns: u64) -> Result<Sweep> {
    let mut out = Sweep::default();
    let mut live_ports: HashSet<BindKey> = HashSet::new();
    let mut live_remotes: HashSet<CtKey> = HashSet::new();
    let sessions: Vec<(CtKey, CtValue)> = m.sessions.iter().filter_map(|r| r.ok()).collect();
    for (k, v) in &sessions {
        if t.expired(k.proto, v.tcp_state, v.last_seen_ns, now_ns) {
            let _ = m.sessions.remove(k);
            out.expired += 1;
        } else {
            out.remaining += 1;
            let p = &v.peer;
            live_ports.insert(BindKey::new(p.proto, p.dst_addr, p.dst_port));
            live_remotes.insert(CtKey::new(p.proto, p.src_addr, 0, p.dst_addr, p.dst_port));
        }
    }
    let bindings: Vec<(BindKey, BindValue)> = m.bind_rev.iter().filter_map(|r| r.ok()).collect();
    for (ek, v) in &bindings {
        let released = v.flags & BIND_F_RELEASED != 0;
        if live_ports.contains(ek) {
            if released {
                // Taken back by an inbound-opened session.
                let _ = m.bind_rev.insert(
                    ek,
                    BindValue {
                        flags: 0,
                        released_ns: 0,
                        ..*v
                    },
                    0,
                );
            }
        } else if !released {
            let held = BindValue {
                flags: BIND_F_RELEASED,
                released_ns: now_ns,
                ..*v
            };
            let _ = m.bind_rev.insert(ek, held, 0);
            out.released += 1;
        } else if now_ns.saturating_sub(v.released_ns) > hold_ns {
            let ik = BindKey::new(ek.proto, v.addr, v.port);
            if m.bind.get(&ik, 0).is_ok_and(|b| b.port == ek.port) {
                let _ = m.bind.remove(&ik);
            }
            let _ = m.bind_rev.remove(ek);
            out.freed += 1;
        }
    }
    // Inside halves whose external half is gone (an insert race lost, or
    // freed above).
    let inside: Vec<(BindKey, BindValue)> = m.bind.iter().filter_map(|r| r.ok()).collect();
    for (ik, v) in &inside {
        let ek = BindKey::new(ik.proto, v.addr, v.port);
        let owned = m
            .bind_rev
            .get(&ek, 0)
            .is_ok_and(|r| r.addr == ik.addr && r.port == ik.port);
        if !owned {
            let _ = m.bind.remove(ik);
            out.orphans += 1;
        }
    }
    let remotes: Vec<CtKey> = m.adf.keys().filter_map(|r| r.ok()).collect();
    for k in &remotes {
        if !live_remotes.contains(k) {
            let _ = m.adf.remove(k);
            out.orphans += 1;
        }
    }
    Ok(out)
}

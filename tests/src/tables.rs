//! The conntrack tables as a whole (sessions and both halves of the
//! bindings), read from a loaded object or from a gateway's pin
//! directory, and what would make them inconsistent: the definition of a
//! leaked or dangling entry that the property test (tests/adversarial.rs)
//! and the soak check.

use std::{
    collections::HashMap as StdHashMap,
    fmt,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
};

use anyhow::{Context, Result};
use aya::{
    Ebpf, Pod,
    maps::{HashMap, Map, MapData},
};
use nat_common::{
    BindExt, BindKey, BindValue, CtKey, CtValue, MAP_BIND, MAP_BIND_REV, MAP_CT_FWD,
    MAP_POOL_ADDRS, POOL_ACTIVE, PoolAddr,
};

use crate::test_run::entries;

/// A snapshot of the three tables.
#[derive(Clone, Debug, Default)]
pub struct Tables {
    pub sessions: Vec<(CtKey, CtValue)>,
    /// Inside endpoint → its external endpoint.
    pub bind: Vec<(BindKey, BindExt)>,
    /// External endpoint → its inside endpoint.
    pub bind_rev: Vec<(BindKey, BindValue)>,
    /// The pool's slots, by index.
    pub pool: Vec<PoolAddr>,
}

/// Something that should not be in the tables.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Inconsistency {
    /// A session whose inside endpoint has no binding, or one to another
    /// external endpoint than the session translates to: its replies find
    /// no way in, or the way in of another endpoint.
    SessionWithoutBinding(CtKey),
    /// A session whose external endpoint is bound (reverse half) to another
    /// inside endpoint, or to none.
    SessionWithoutReverse(CtKey),
    /// The inside half of a binding whose external half does not point
    /// back (the sweeper removes these; they must not last).
    HalfBinding(BindKey),
    /// The external half of a binding whose inside half does not point
    /// to it: the external port is taken, by nobody.
    HalfReverse(BindKey),
}

fn sock(addr: u32, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(addr.to_ne_bytes()), u16::from_be(port))
}

impl fmt::Display for Inconsistency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Inconsistency::SessionWithoutBinding(k) => write!(
                f,
                "session proto {} {} -> {} has no binding to its external endpoint",
                k.proto,
                sock(k.src_addr, k.src_port),
                sock(k.dst_addr, k.dst_port)
            ),
            Inconsistency::SessionWithoutReverse(k) => write!(
                f,
                "session proto {} {} -> {}: its external endpoint is not bound back to it",
                k.proto,
                sock(k.src_addr, k.src_port),
                sock(k.dst_addr, k.dst_port)
            ),
            Inconsistency::HalfBinding(k) => write!(
                f,
                "binding of inside endpoint proto {} {} without its external half",
                k.proto,
                sock(k.addr, k.port)
            ),
            Inconsistency::HalfReverse(k) => write!(
                f,
                "external endpoint proto {} {} bound to an inside endpoint that is not bound to it",
                k.proto,
                sock(k.addr, k.port)
            ),
        }
    }
}

impl Tables {
    /// The tables of a loaded object.
    pub fn of(ebpf: &Ebpf) -> Result<Tables> {
        Ok(Tables {
            sessions: entries(ebpf, MAP_CT_FWD)?,
            bind: entries(ebpf, MAP_BIND)?,
            bind_rev: entries(ebpf, MAP_BIND_REV)?,
            pool: pool_of(ebpf)?,
        })
    }

    /// The address (network order) of pool slot `slot`, and whether it is
    /// active (0, false: no such slot).
    pub fn slot(&self, slot: u32) -> (u32, bool) {
        self.pool
            .get(slot as usize)
            .map(|a| (a.addr, a.state == POOL_ACTIVE))
            .unwrap_or((0, false))
    }

    /// The tables a gateway pinned in `dir` (its `--bpffs-dir`).
    pub fn pinned(dir: &Path) -> Result<Tables> {
        Ok(Tables {
            sessions: pinned_entries(dir, MAP_CT_FWD)?,
            bind: pinned_entries(dir, MAP_BIND)?,
            bind_rev: pinned_entries(dir, MAP_BIND_REV)?,
            pool: pinned_pool(dir)?,
        })
    }

    /// Whether all three are empty.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty() && self.bind.is_empty() && self.bind_rev.is_empty()
    }

    /// Every entry that breaks the tables' invariants: each session has its
    /// binding both ways (inside endpoint → the session's external
    /// endpoint → back), and the two halves of every binding point at each
    /// other. A binding without sessions is fine (held after its last
    /// session, or its session did not fit in the table); the sweeper
    /// frees it. A session or external half on a draining address may
    /// have an inside half that moved to an active address.
    pub fn inconsistencies(&self) -> Vec<Inconsistency> {
        let bind: StdHashMap<BindKey, BindExt> = self.bind.iter().copied().collect();
        let rev: StdHashMap<BindKey, BindValue> = self.bind_rev.iter().copied().collect();
        let points = |v: &BindValue, addr: u32, port: u16| v.addr == addr && v.port == port;
        let points_out = |v: &BindExt, addr: u32, port: u16| {
            self.slot(v.pool as u32).0 == addr && v.port == port
        };
        let active = |addr: u32| {
            self.pool
                .iter()
                .any(|a| a.addr == addr && a.state == POOL_ACTIVE)
        };
        let mut out = Vec::new();
        for (k, v) in &self.sessions {
            let inside = BindKey::new(k.proto, k.src_addr, k.src_port);
            let (ext_addr, active_slot) = self.slot(v.pool());
            let ext_port = v.ext_port;
            let external = BindKey::new(k.proto, ext_addr, ext_port);
            if active_slot
                && !bind
                    .get(&inside)
                    .is_some_and(|b| points_out(b, ext_addr, ext_port))
            {
                out.push(Inconsistency::SessionWithoutBinding(*k));
            }
            if !rev
                .get(&external)
                .is_some_and(|b| points(b, k.src_addr, k.src_port))
            {
                out.push(Inconsistency::SessionWithoutReverse(*k));
            }
        }
        for (ik, v) in &self.bind {
            let ek = BindKey::new(ik.proto, self.slot(v.pool as u32).0, v.port);
            if !rev.get(&ek).is_some_and(|r| points(r, ik.addr, ik.port)) {
                out.push(Inconsistency::HalfBinding(*ik));
            }
        }
        for (ek, v) in &self.bind_rev {
            let ik = BindKey::new(ek.proto, v.addr, v.port);
            if active(ek.addr)
                && !bind
                    .get(&ik)
                    .is_some_and(|b| points_out(b, ek.addr, ek.port))
            {
                out.push(Inconsistency::HalfReverse(*ek));
            }
        }
        out
    }
}

fn pool_of(ebpf: &Ebpf) -> Result<Vec<PoolAddr>> {
    let map = ebpf
        .map(MAP_POOL_ADDRS)
        .with_context(|| format!("map {MAP_POOL_ADDRS}"))?;
    let a = aya::maps::Array::<&MapData, PoolAddr>::try_from(map)?;
    Ok(a.iter().filter_map(|r| r.ok()).collect())
}

fn pinned_pool(dir: &Path) -> Result<Vec<PoolAddr>> {
    let path = dir.join(MAP_POOL_ADDRS);
    let data =
        MapData::from_pin(&path).with_context(|| format!("opening pinned {}", path.display()))?;
    let a = aya::maps::Array::<MapData, PoolAddr>::try_from(Map::Array(data))
        .with_context(|| format!("{}'s type", path.display()))?;
    Ok(a.iter().filter_map(|r| r.ok()).collect())
}

fn pinned_entries<K: Pod, V: Pod>(dir: &Path, name: &str) -> Result<Vec<(K, V)>> {
    let path = dir.join(name);
    let data =
        MapData::from_pin(&path).with_context(|| format!("opening pinned {}", path.display()))?;
    let map = HashMap::<MapData, K, V>::try_from(Map::HashMap(data))
        .with_context(|| format!("{}'s type", path.display()))?;
    map.iter()
        .map(|r| r.with_context(|| format!("an entry of {}", path.display())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> Vec<PoolAddr> {
        vec![PoolAddr {
            addr: 100,
            state: POOL_ACTIVE,
        }]
    }

    fn session(src: u32, sport: u16, ext_port: u16) -> (CtKey, CtValue) {
        let k = CtKey::new(17, src, sport, 9, 53);
        (k, CtValue::new(0, ext_port, 0, 0, 0))
    }

    type Binding = ((BindKey, BindExt), (BindKey, BindValue));

    fn binding(src: u32, sport: u16, ext_port: u16) -> Binding {
        let ext = BindExt {
            port: ext_port,
            ..Default::default()
        };
        let owner = BindValue {
            addr: src,
            port: sport,
            ..Default::default()
        };
        (
            (BindKey::new(17, src, sport), ext),
            (BindKey::new(17, 100, ext_port), owner),
        )
    }

    fn tables(sessions: &[(CtKey, CtValue)], bindings: &[Binding]) -> Tables {
        Tables {
            sessions: sessions.to_vec(),
            bind: bindings.iter().map(|b| b.0).collect(),
            bind_rev: bindings.iter().map(|b| b.1).collect(),
            pool: pool(),
        }
    }

    #[test]
    fn sessions_with_their_bindings_and_idle_bindings_are_consistent() {
        let t = tables(
            &[session(1, 1000, 1000)],
            &[binding(1, 1000, 1000), binding(2, 1000, 1001)],
        );
        assert_eq!(t.inconsistencies(), vec![]);
    }

    #[test]
    fn a_session_without_its_binding_or_to_another_port_is_reported() {
        let s = session(1, 1000, 1000);
        assert_eq!(
            tables(&[s], &[]).inconsistencies(),
            vec![
                Inconsistency::SessionWithoutBinding(s.0),
                Inconsistency::SessionWithoutReverse(s.0)
            ]
        );
        // Bound, but to another external port than the session uses.
        let t = tables(&[s], &[binding(1, 1000, 2000)]);
        assert_eq!(
            t.inconsistencies(),
            vec![
                Inconsistency::SessionWithoutBinding(s.0),
                Inconsistency::SessionWithoutReverse(s.0)
            ]
        );
    }

    #[test]
    fn half_bindings_are_reported_from_either_side() {
        let (inside, external) = binding(1, 1000, 1000);
        let t = Tables {
            bind: vec![inside],
            pool: pool(),
            ..Default::default()
        };
        assert_eq!(
            t.inconsistencies(),
            vec![Inconsistency::HalfBinding(inside.0)]
        );
        let t = Tables {
            bind_rev: vec![external],
            pool: pool(),
            ..Default::default()
        };
        assert_eq!(
            t.inconsistencies(),
            vec![Inconsistency::HalfReverse(external.0)]
        );
    }
}

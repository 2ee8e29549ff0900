//! The SNAT address pool in the maps: which slot each address has, which
//! are active or draining, and how inside hosts pair with them
//! (RFC 4787 REQ-2). Sessions and bindings name their external address by
//! slot, so an address keeps its slot for as long as any flow may use it:
//! an address that leaves the pool (a restart with a smaller `--snat-ip`,
//! an address gone from `--ext` under `auto`) is *draining*, its flows go
//! on, new ones get active addresses.

use std::net::Ipv4Addr;

use anyhow::{Context, Result, bail};
use aya::maps::{Array, MapData};
use nat_common::{
    MAP_POOL, MAP_POOL_ADDRS, MAP_POOL_PAIR, PAIR_BUCKETS, POOL_ACTIVE, POOL_DRAINING, POOL_FREE,
    POOL_MAX, PoolAddr, PoolInfo,
};
use tracing::info;

/// The slots after making `wanted` the active addresses: an address keeps
/// its slot, active again if it was draining; a new one takes the first
/// free slot; an active one not wanted drains. Draining ones stay (their
/// flows may still use them).
pub fn plan(current: &[PoolAddr], wanted: &[Ipv4Addr]) -> Result<Vec<PoolAddr>> {
    let mut slots: Vec<PoolAddr> = current.to_vec();
    slots.resize(POOL_MAX as usize, PoolAddr::default());
    for s in slots.iter_mut() {
        if s.state == POOL_ACTIVE && !wanted.contains(&s.ip()) {
            s.state = POOL_DRAINING;
        }
    }
    for a in wanted {
        if let Some(s) = slots
            .iter_mut()
            .find(|s| s.state != POOL_FREE && s.ip() == *a)
        {
            s.state = POOL_ACTIVE;
            continue;
        }
        match slots.iter_mut().find(|s| s.state == POOL_FREE) {
            Some(s) => *s = PoolAddr::new(*a, POOL_ACTIVE),
            None => bail!(
                "the SNAT pool has no free slot for {a}: {POOL_MAX} addresses are active or \
                 draining (a restart without adoption, `nat-loader teardown`, empties it)"
            ),
        }
    }
    Ok(slots)
}

/// The pool's summary for the dataplane.
pub fn info(slots: &[PoolAddr], generation: u32) -> PoolInfo {
    let used = slots.iter().filter(|s| s.state != POOL_FREE);
    let hosts: Vec<u32> = used.map(|s| u32::from(s.ip())).collect();
    PoolInfo {
        active: slots.iter().filter(|s| s.state == POOL_ACTIVE).count() as u32,
        lo: hosts.iter().copied().min().unwrap_or(0),
        hi: hosts.iter().copied().max().unwrap_or(0),
        generation,
    }
}

/// The slot of each bucket of inside addresses: the active slots in turn,
/// so hosts spread evenly; with none active, slot 0 (whose address the
/// dataplane finds inactive: `drop_no_snat_address`).
pub fn pairing(slots: &[PoolAddr]) -> Vec<u32> {
    pairing_keeping(slots, &[])
}

/// [`pairing`], except that each `(bucket, slot)` of `keep` whose slot is
/// still active stays: the buckets of inside hosts that have bindings, so
/// that a pool that changes does not give a host a second address while
/// it has flows on the first (RFC 4787 REQ-2).
pub fn pairing_keeping(slots: &[PoolAddr], keep: &[(u32, u32)]) -> Vec<u32> {
    let active: Vec<u32> = (0..slots.len() as u32)
        .filter(|i| slots[*i as usize].state == POOL_ACTIVE)
        .collect();
    let mut out: Vec<u32> = (0..PAIR_BUCKETS)
        .map(|b| {
            if active.is_empty() {
                0
            } else {
                active[b as usize % active.len()]
            }
        })
        .collect();
    for &(bucket, slot) in keep {
        if active.contains(&slot)
            && let Some(b) = out.get_mut(bucket as usize)
        {
            *b = slot;
        }
    }
    out
}

/// `(bucket, slot)` of every inside host that has a binding (`bind`: the
/// inside halves, `NAT_BIND`'s entries).
pub fn occupied(bind: &[(nat_common::BindKey, nat_common::BindExt)]) -> Vec<(u32, u32)> {
    let mut v: Vec<(u32, u32)> = bind
        .iter()
        .map(|(k, b)| (nat_common::pair_bucket(k.addr), b.pool as u32))
        .collect();
    v.sort_unstable();
    v.dedup_by_key(|(bucket, _)| *bucket);
    v
}

/// The pool's three maps (opened by `dataplane::pool_maps`).
pub struct PoolMaps {
    pub info: Array<MapData, PoolInfo>,
    pub addrs: Array<MapData, PoolAddr>,
    pub pair: Array<MapData, u32>,
}

impl PoolMaps {
    /// Every slot, as the dataplane sees it.
    pub fn slots(&self) -> Result<Vec<PoolAddr>> {
        (0..POOL_MAX)
            .map(|i| {
                self.addrs
                    .get(&i, 0)
                    .with_context(|| format!("reading {MAP_POOL_ADDRS}[{i}]"))
            })
            .collect()
    }

    /// Makes `wanted` the active addresses ([`plan`]), keeping the buckets
    /// of `keep` ([`occupied`]: hosts with bindings) on their address while
    /// it stays active. The slots first, then the pairing, then the
    /// summary: a new flow never pairs with a slot that has no address
    /// yet. Logs what changed. Returns the slots.
    pub fn apply(&mut self, wanted: &[Ipv4Addr], keep: &[(u32, u32)]) -> Result<Vec<PoolAddr>> {
        let before = self.slots()?;
        let after = plan(&before, wanted)?;
        if after == before && self.info.get(&0, 0).is_ok_and(|i| i.generation > 0) {
            return Ok(after);
        }
        for (i, (b, a)) in before.iter().zip(&after).enumerate() {
            if b != a {
                self.addrs
                    .set(i as u32, *a, 0)
                    .with_context(|| format!("writing {MAP_POOL_ADDRS}[{i}]"))?;
                let state = match a.state {
                    POOL_ACTIVE => "active",
                    POOL_DRAINING => "draining",
                    _ => "free",
                };
                info!(slot = i, address = %a.ip(), state = %state, "SNAT pool address");
            }
        }
        // All 65,536 buckets in one batch.
        let pairs: Vec<(u32, u32)> = pairing_keeping(&after, keep)
            .into_iter()
            .zip(0u32..)
            .map(|(slot, b)| (b, slot))
            .collect();
        crate::batch::update(&self.pair, &pairs)
            .with_context(|| format!("writing {MAP_POOL_PAIR}"))?;
        let generation = self.info.get(&0, 0).map(|i| i.generation).unwrap_or(0) + 1;
        let summary = info(&after, generation);
        self.info
            .set(0, summary, 0)
            .with_context(|| format!("writing {MAP_POOL}"))?;
        info!(active = summary.active, generation, "SNAT pool updated");
        Ok(after)
    }
}

/// The label of a slot's state.
pub fn state_label(state: u32) -> &'static str {
    match state {
        POOL_ACTIVE => "active",
        POOL_DRAINING => "draining",
        _ => "free",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(d: u8) -> Ipv4Addr {
        Ipv4Addr::new(192, 0, 2, d)
    }

    #[test]
    fn a_new_pool_fills_slots_in_order() {
        let s = plan(&[], &[ip(1), ip(2)]).expect("plan");
        assert_eq!(s.len(), POOL_MAX as usize);
        assert_eq!(s[0], PoolAddr::new(ip(1), POOL_ACTIVE));
        assert_eq!(s[1], PoolAddr::new(ip(2), POOL_ACTIVE));
        assert_eq!(s[2].state, POOL_FREE);
    }

    #[test]
    fn a_removed_address_drains_in_its_slot_and_a_returning_one_gets_it_back() {
        let s = plan(&[], &[ip(1), ip(2), ip(3)]).expect("plan");
        let s = plan(&s, &[ip(3), ip(4)]).expect("smaller");
        assert_eq!(s[0], PoolAddr::new(ip(1), POOL_DRAINING));
        assert_eq!(s[1], PoolAddr::new(ip(2), POOL_DRAINING));
        assert_eq!(s[2], PoolAddr::new(ip(3), POOL_ACTIVE));
        assert_eq!(s[3], PoolAddr::new(ip(4), POOL_ACTIVE));
        let s = plan(&s, &[ip(1)]).expect("back");
        assert_eq!(s[0], PoolAddr::new(ip(1), POOL_ACTIVE));
        assert_eq!(s[2].state, POOL_DRAINING);
    }

    #[test]
    fn a_full_pool_is_an_error_naming_the_address() {
        let many: Vec<Ipv4Addr> = (0..POOL_MAX)
            .map(|i| Ipv4Addr::new(10, 0, 0, i as u8))
            .collect();
        let s = plan(&[], &many).expect("full");
        let e = plan(&s, &[ip(9)]).expect_err("no room");
        assert!(e.to_string().contains("192.0.2.9"), "{e}");
    }

    #[test]
    fn a_growing_pool_keeps_the_hosts_with_bindings_on_their_address() {
        let one = plan(&[], &[ip(1)]).expect("one");
        let four = plan(&one, &[ip(1), ip(2), ip(3), ip(4)]).expect("four");
        // Bucket 1 would go to slot 1; its host has a binding on slot 0.
        let p = pairing_keeping(&four, &[(1, 0), (5, 9)]);
        assert_eq!(
            (p[1], p[2], p[5]),
            (0, 2, 1),
            "kept, balanced, a stale slot ignored"
        );
        // A kept slot that drains is not kept.
        let drained = plan(&four, &[ip(2), ip(3), ip(4)]).expect("drain 1");
        assert_ne!(pairing_keeping(&drained, &[(1, 0)])[1], 0);
        let bind = [
            (
                nat_common::BindKey::new(17, 7, 1),
                nat_common::BindExt {
                    port: 1,
                    pool: 3,
                    _pad: 0,
                },
            ),
            (
                nat_common::BindKey::new(6, 7, 2),
                nat_common::BindExt {
                    port: 2,
                    pool: 3,
                    _pad: 0,
                },
            ),
        ];
        assert_eq!(occupied(&bind), vec![(nat_common::pair_bucket(7), 3)]);
    }

    #[test]
    fn pairing_spreads_buckets_over_active_slots_only() {
        let s = plan(&[], &[ip(1), ip(2), ip(3)]).expect("plan");
        let s = plan(&s, &[ip(1), ip(3)]).expect("drain 2");
        let p = pairing(&s);
        assert_eq!(p.len(), PAIR_BUCKETS as usize);
        assert!(p.iter().all(|slot| *slot == 0 || *slot == 2));
        assert_eq!(
            p.iter().filter(|s| **s == 0).count(),
            PAIR_BUCKETS as usize / 2
        );
        let i = info(&s, 7);
        assert_eq!(i.active, 2);
        assert_eq!((i.lo, i.hi), (u32::from(ip(1)), u32::from(ip(3))));
        assert_eq!(i.generation, 7);
        assert_eq!(info(&plan(&[], &[]).expect("empty"), 1).active, 0);
    }
}

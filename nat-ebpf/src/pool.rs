//! The SNAT address pool: which external address a new binding gets
//! (paired pooling, RFC 4787 REQ-2: the bucket of its inside address says
//! which), the address of a pool slot, and whether a destination may be
//! one of the pool's addresses. The loader writes the maps.

use nat_common::{POOL_ACTIVE, pair_bucket, stats};

use crate::maps::{NAT_PAIR, NAT_POOL, NAT_POOL_ADDRS};

/// The slot and address (network order) a new binding of inside host
/// `inside` gets, or `drop_no_snat_address` when its bucket names no
/// active address (all draining, or none yet).
#[inline(always)]
pub fn pick(inside: u32) -> Result<(u32, u32), u32> {
    let Some(slot) = NAT_PAIR.get(pair_bucket(inside)) else {
        return Err(stats::DROP_NO_SNAT_ADDRESS);
    };
    let slot = *slot;
    match NAT_POOL_ADDRS.get(slot) {
        Some(a) if a.state == POOL_ACTIVE && a.addr != 0 => Ok((slot, a.addr)),
        _ => Err(stats::DROP_NO_SNAT_ADDRESS),
    }
}

/// The address (network order) of pool slot `slot`, active or draining;
/// 0 for a slot out of range.
#[inline(always)]
pub fn addr(slot: u32) -> u32 {
    match NAT_POOL_ADDRS.get(slot) {
        Some(a) => a.addr,
        None => 0,
    }
}

/// Whether `addr` (network order) may be one of the pool's addresses: in
/// the range the pool spans. A binding lookup decides for certain; this
/// spares the lookup for every other destination.
#[inline(always)]
pub fn may_own(addr: u32) -> bool {
    match NAT_POOL.get(0) {
        Some(p) => p.may_own(addr),
        None => false,
    }
}

//! Per-CPU verdict counters: `STATS[slot(hook, reason)]`, the hooks and
//! reasons being `nat_common::stats`'s.

use crate::maps::{STATS, TRAFFIC};
use nat_common::stats::{direction, slot, traffic_slot};

#[inline(always)]
pub fn count(hook: u32, reason: u32) {
    if let Some(c) = STATS.get_ptr_mut(slot(hook, reason)) {
        // Per-CPU slot: no other CPU writes it.
        unsafe { *c += 1 };
    }
}

/// One more packet of `bytes` forwarded by hook `hook`, protocol `proto`.
/// Only where a packet really leaves (a redirect, or translated and handed
/// to the kernel to fragment), once per packet; not inlined, to keep the
/// callers' stacks as they were.
#[inline(never)]
pub fn traffic(hook: u32, proto: u8, bytes: u64) {
    if let Some(t) = TRAFFIC.get_ptr_mut(traffic_slot(direction(hook), proto)) {
        // Per-CPU slot: no other CPU writes it.
        unsafe {
            (*t).packets += 1;
            (*t).bytes += bytes;
        }
    }
}

/// Moves up to `n` of `hook`'s counts on this CPU from reason `from` to
/// reason `to`: a packet counted as forwarded that the kernel then refused
/// (refused.rs) was counted on this very CPU, which is where the kernel
/// reports the refusal.
#[inline(always)]
pub fn recount(hook: u32, from: u32, to: u32, n: u64) {
    let Some(f) = STATS.get_ptr_mut(slot(hook, from)) else {
        return;
    };
    let Some(t) = STATS.get_ptr_mut(slot(hook, to)) else {
        return;
    };
    // Per-CPU slots: no other CPU writes them.
    unsafe {
        let moved = if *f < n { *f } else { n };
        *f -= moved;
        *t += moved;
    }
}

//! Per-CPU verdict counters: `STATS[slot(hook, reason)]`, the hooks and
//! reasons being `nat_common::stats`'s.

use crate::maps::STATS;
use nat_common::stats::slot;

#[inline(always)]
pub fn count(hook: u32, reason: u32) {
    if let Some(c) = STATS.get_ptr_mut(slot(hook, reason)) {
        // Per-CPU slot: no other CPU writes it.
        unsafe { *c += 1 };
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

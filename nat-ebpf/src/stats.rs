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

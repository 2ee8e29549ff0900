//! Per-CPU verdict counters.

use crate::maps::STATS;
use nat_common::stats::COUNT;

/// Which program counts: each has its own block of counters, so a packet
/// that XDP hands to TC is visible at both and counted once by each.
pub const HOOK_XDP_INT: u32 = 0;
pub const HOOK_XDP_EXT: u32 = 1;
pub const HOOK_TC_INT: u32 = 2;
pub const HOOK_TC_EXT: u32 = 3;
pub const HOOKS: u32 = 4;

#[inline(always)]
pub fn count(hook: u32, reason: u32) {
    if let Some(c) = STATS.get_ptr_mut(hook * COUNT + reason) {
        // Per-CPU slot: no other CPU writes it.
        unsafe { *c += 1 };
    }
}

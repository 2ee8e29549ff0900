//! Counting the redirects the kernel refuses: the XDP tracepoints the
//! tracing programs attach to, where in each tracepoint's record the fields
//! they read are, and how a bulk-queue flush is attributed.
//!
//! Where a redirect to an interface index can fail after an XDP program
//! returned `XDP_REDIRECT` (kernel `net/core/filter.c`, `kernel/bpf/devmap.c`):
//! - at once, when the frame is queued (`xdp_do_redirect`: no such device,
//!   the device without `ndo-xmit` in its `xdp-features`, down, the frame
//!   too long) and in generic mode (`xdp_do_generic_redirect`):
//!   `xdp:xdp_redirect_err`, which names the program;
//! - native mode, later, when the per-CPU bulk queue is flushed at the end
//!   of the NAPI poll and the device's `ndo_xdp_xmit` takes fewer frames
//!   than it was given: `xdp:xdp_devmap_xmit`, which names the two
//!   interfaces but neither the program nor the namespace;
//! - generic mode, when the device's queue does not take the skb:
//!   `xdp:xdp_exception` with action `XDP_TX`, which names the program.

/// The tracepoints' category (tracefs `events/xdp/`).
pub const CATEGORY: &str = "xdp";
pub const REDIRECT_ERR: &str = "xdp_redirect_err";
pub const DEVMAP_XMIT: &str = "xdp_devmap_xmit";
pub const EXCEPTION: &str = "xdp_exception";

/// `(program, tracepoint)` of each tracing program.
pub const PROGRAMS: [(&str, &str); 3] = [
    (crate::PROG_TRACE_REDIRECT_ERR, REDIRECT_ERR),
    (crate::PROG_TRACE_DEVMAP_XMIT, DEVMAP_XMIT),
    (crate::PROG_TRACE_EXCEPTION, EXCEPTION),
];

/// Offsets, in the tracepoint's record, of the fields the programs read
/// (all 4-byte integers). Stable since Linux 4.18; the loader checks each
/// against the running kernel's format file ([`FIELDS`]) before attaching.
pub const REDIRECT_ERR_PROG_ID: usize = 8;
pub const DEVMAP_FROM_IFINDEX: usize = 8;
pub const DEVMAP_TO_IFINDEX: usize = 16;
pub const DEVMAP_DROPS: usize = 20;
pub const DEVMAP_SENT: usize = 24;
pub const EXCEPTION_PROG_ID: usize = 8;
pub const EXCEPTION_ACT: usize = 12;

/// `(tracepoint, field, offset)` of every field read.
pub const FIELDS: [(&str, &str, usize); 7] = [
    (REDIRECT_ERR, "prog_id", REDIRECT_ERR_PROG_ID),
    (DEVMAP_XMIT, "from_ifindex", DEVMAP_FROM_IFINDEX),
    (DEVMAP_XMIT, "to_ifindex", DEVMAP_TO_IFINDEX),
    (DEVMAP_XMIT, "drops", DEVMAP_DROPS),
    (DEVMAP_XMIT, "sent", DEVMAP_SENT),
    (EXCEPTION, "prog_id", EXCEPTION_PROG_ID),
    (EXCEPTION, "act", EXCEPTION_ACT),
];

/// `XDP_TX`: the action `xdp:xdp_exception` reports when generic XDP
/// could not hand a redirected skb to the egress device's queue.
pub const ACT_TX: u32 = 3;

/// A bulk-queue flush from our XDP program's NIC into its egress NIC
/// (`sent` frames taken, `drops` refused), with `pending` of our frames
/// queued on this CPU. The queue is per CPU and egress device and is
/// flushed before the NAPI poll that filled it ends, so while our frames
/// are pending, a flush between our two interface indexes on this CPU is
/// ours; with none pending it is another namespace's. Returns the frames
/// to count as refused and what stays pending, or `None` if not ours.
pub fn flush(pending: u64, sent: i32, drops: i32) -> Option<(u64, u64)> {
    if pending == 0 {
        return None;
    }
    let drops = drops.max(0) as u64;
    let flushed = sent.max(0) as u64 + drops;
    Some((drops, pending.saturating_sub(flushed)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flush_with_our_frames_pending_counts_its_drops_and_settles_them() {
        assert_eq!(flush(16, 10, 6), Some((6, 0)));
        // A full queue is flushed while the poll goes on queueing.
        assert_eq!(flush(17, 16, 0), Some((0, 1)));
        assert_eq!(flush(1, 0, 1), Some((1, 0)));
    }

    #[test]
    fn a_flush_with_nothing_of_ours_pending_is_another_namespaces() {
        assert_eq!(flush(0, 0, 16), None);
    }

    #[test]
    fn a_flush_larger_than_what_is_pending_leaves_nothing_pending() {
        assert_eq!(flush(3, 5, 2), Some((2, 0)));
        assert_eq!(flush(3, -1, -5), Some((0, 3)));
    }

    #[test]
    fn every_traced_field_is_listed_once() {
        let mut f: Vec<_> = FIELDS.iter().map(|(t, f, _)| (*t, *f)).collect();
        f.sort();
        f.dedup();
        assert_eq!(f.len(), FIELDS.len());
        for (_, tp) in PROGRAMS {
            assert!(FIELDS.iter().any(|(t, _, _)| *t == tp), "{tp}");
        }
    }
}

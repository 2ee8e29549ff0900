//! Connection tracking: finding a flow's entries and creating a new pair.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_get_prandom_u32};
use nat_common::{
    CT_F_REVERSE, CtKey, CtValue, NatConfig, ports, stats,
    tcp::{self, DIR_OUT},
};

use crate::maps::{CT_FWD, CT_REV};

const EEXIST: i32 = 17;
/// Refresh `last_seen` at most this often: writing it on every packet would
/// bounce the entry's cache line between CPUs.
const REFRESH_NS: u64 = 1_000_000_000;

/// Creates the forward/reverse pair for a new outbound flow and returns the
/// forward entry with the event to count (a new flow, or an insert race lost
/// to another CPU that created the same flow). The reverse entry is inserted first, with no-overwrite, so
/// two flows can never claim the same external tuple; if the forward insert
/// then fails the reverse one is rolled back.
#[inline(always)]
pub fn create(
    key: &CtKey,
    cfg: &NatConfig,
    now: u64,
    tcp_flags: u8,
) -> Result<(*mut CtValue, u32), u32> {
    let rnd = unsafe { bpf_get_prandom_u32() };
    // ICMP echo carries its identifier in src_port; ports are host order here.
    let preferred = u16::from_be(key.src_port);
    let mut attempt = 0;
    while attempt < ports::MAX_PORT_ATTEMPTS {
        let port = ports::candidate(cfg.port_min, cfg.port_max, preferred, rnd, attempt);
        attempt += 1;
        let rev_key = CtKey::new(
            key.proto,
            key.dst_addr,
            key.dst_port,
            cfg.snat_addr,
            port.to_be(),
        );
        let rev = CtValue {
            peer: *key,
            last_seen_ns: now,
            tcp_state: 0,
            flags: CT_F_REVERSE,
            _pad: [0; 6],
        };
        match CT_REV.insert(rev_key, rev, BPF_NOEXIST as u64) {
            Ok(()) => {}
            Err(e) if e == -EEXIST => continue,
            Err(_) => return Err(stats::DROP_TABLE_FULL),
        }
        let fwd = CtValue {
            peer: rev_key,
            last_seen_ns: now,
            tcp_state: if key.proto == nat_common::IPPROTO_TCP {
                tcp::update(0, DIR_OUT, tcp_flags)
            } else {
                0
            },
            flags: 0,
            _pad: [0; 6],
        };
        let event = match CT_FWD.insert(key, fwd, BPF_NOEXIST as u64) {
            Ok(()) => stats::EV_NEW_FLOW,
            Err(e) => {
                let _ = CT_REV.remove(rev_key);
                if e != -EEXIST {
                    return Err(stats::DROP_TABLE_FULL);
                }
                // Another CPU created this flow meanwhile: use its entry.
                stats::EV_INSERT_RACE
            }
        };
        return CT_FWD
            .get_ptr_mut(key)
            .map(|v| (v, event))
            .ok_or(stats::DROP_INTERNAL);
    }
    Err(stats::DROP_NO_PORT)
}

/// Marks an entry as seen now.
#[inline(always)]
pub fn touch(v: *mut CtValue, now: u64) {
    unsafe {
        if now.wrapping_sub((*v).last_seen_ns) > REFRESH_NS {
            (*v).last_seen_ns = now;
        }
    }
}

/// Applies a TCP control packet seen in direction `dir` to the forward entry.
#[inline(always)]
pub fn tcp_update(fwd: *mut CtValue, dir: u8, tcp_flags: u8) {
    unsafe {
        let s = (*fwd).tcp_state;
        let n = tcp::update(s, dir, tcp_flags);
        if n != s {
            (*fwd).tcp_state = n;
        }
    }
}

/// The forward entry of a reverse entry (for TCP state changes seen inbound).
#[inline(always)]
pub fn forward_of(rev: *const CtValue) -> Option<*mut CtValue> {
    let peer = unsafe { (*rev).peer };
    CT_FWD.get_ptr_mut(peer)
}

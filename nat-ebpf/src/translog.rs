//! The translation log (`--translation-log`): a record per binding created
//! and per new flow refused for want of a port, into the `TRANSLOG` ring
//! buffer, which the loader reads and writes out as JSON lines. Only new
//! flows pay for it: established packets never get here. A full ring never
//! blocks the packet; the lost record is counted (`event_translog_lost`).

use aya_ebpf::helpers::bpf_ktime_get_ns;
use nat_common::{TranslogEvent, stats};

use crate::{maps::TRANSLOG, stats::count};

/// Writes one record. Scalars only, packed so they fit the five argument
/// registers of a BPF-to-BPF call (not inlined: the callers' stacks are
/// near the limit): `head` = hook << 16 | kind << 8 | protocol, `ports` =
/// inside port << 16 | external port (each network order, as in the
/// packet).
#[inline(never)]
pub fn emit(head: u32, inside_addr: u32, ext_addr: u32, ports: u32) {
    let hook = head >> 16;
    match TRANSLOG.reserve::<TranslogEvent>(0) {
        Some(mut e) => {
            e.write(TranslogEvent {
                ts_ns: unsafe { bpf_ktime_get_ns() },
                inside_addr,
                ext_addr,
                inside_port: (ports >> 16) as u16,
                ext_port: ports as u16,
                kind: (head >> 8) as u8,
                proto: head as u8,
                _pad: [0; 2],
            });
            e.submit(0);
        }
        None => count(hook, stats::EV_TRANSLOG_LOST),
    }
}

/// [`emit`]'s `head`.
#[inline(always)]
pub fn head(hook: u32, kind: u8, proto: u8) -> u32 {
    (hook << 16) | ((kind as u32) << 8) | proto as u32
}

/// [`emit`]'s `ports`.
#[inline(always)]
pub fn ports(inside_port: u16, ext_port: u16) -> u32 {
    ((inside_port as u32) << 16) | ext_port as u32
}

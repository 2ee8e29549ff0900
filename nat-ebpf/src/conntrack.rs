//! Connection tracking: bindings (one external port per inside endpoint,
//! whatever the remote: endpoint-independent mapping) and sessions (one per
//! inside endpoint and remote, holding the TCP state and the idle timer).

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_get_prandom_u32};
use nat_common::{
    BIND_F_RELEASED, BindExt, BindKey, BindValue, CFG_F_UDP_INBOUND_REFRESH, CT_F_INBOUND,
    CT_F_REPLIED, CtKey, CtValue, FILTER_ADDRESS, FILTER_ENDPOINT_INDEPENDENT, IPPROTO_TCP,
    IPPROTO_UDP, NatConfig, POOL_ACTIVE, binding, ports, stats,
    tcp::{self, DIR_IN, DIR_OUT, TCP_SYN},
    ticks,
};

use crate::{
    maps::{CT_ADF, CT_FWD, NAT_BIND, NAT_BIND_REV, NAT_POOL_ADDRS},
    policy, pool,
};

const EEXIST: i32 = 17;
/// Refresh `last_seen` at most every this many ticks (about 1 s): writing
/// it on every packet would bounce the entry's cache line between CPUs.
const REFRESH_TICKS: u32 = 60;

/// A binding: the pool slot, external address and external port (both
/// network order) of an inside endpoint.
#[derive(Clone, Copy)]
pub struct Bound {
    pub slot: u32,
    pub addr: u32,
    pub port: u16,
}

/// The binding of inside endpoint `(addr, port)`, creating one if there is
/// none or if its address is draining (the sessions that have the old one
/// keep it). The second value is the event to count when one was created.
#[inline(always)]
fn bind(
    proto: u8,
    addr: u32,
    port: u16,
    cfg: &NatConfig,
    now: u64,
) -> Result<(Bound, Option<u32>), u32> {
    let ik = BindKey::new(proto, addr, port);
    if let Some(b) = unsafe { NAT_BIND.get(ik) } {
        let (slot, ext_port) = (b.pool as u32, b.port);
        if let Some(a) = NAT_POOL_ADDRS.get(slot)
            && a.state == POOL_ACTIVE
        {
            let ext_addr = a.addr;
            let ek = BindKey::new(proto, ext_addr, ext_port);
            if let Some(r) = NAT_BIND_REV.get_ptr_mut(ek) {
                unsafe {
                    if (*r).addr == addr && (*r).port == port {
                        // Taken back if released (within its hold time),
                        // and stamped either way: a sweep walking right
                        // now may not see the new session
                        // (nat_common::binding).
                        *r = binding::claimed(&*r, now);
                        let b = Bound {
                            slot,
                            addr: ext_addr,
                            port: ext_port,
                        };
                        return Ok((b, None));
                    }
                }
            }
        }
        // The external half was swept, or its address left the pool (the
        // old half stays for the sessions that use it): start over.
        let _ = NAT_BIND.remove(ik);
    }
    let (slot, ext_addr) = pool::pick(addr)?;
    let rnd = unsafe { bpf_get_prandom_u32() };
    let preferred = u16::from_be(port);
    let (min, max) = ports::range_for(
        preferred,
        (cfg.port_min, cfg.port_max),
        (cfg.low_port_min, cfg.low_port_max),
    );
    let inside = BindValue {
        addr,
        port,
        flags: 0,
        _pad: 0,
        stamp: ticks(now),
    };
    let mut attempt = 0;
    while attempt < ports::MAX_PORT_ATTEMPTS {
        let ext_port = ports::candidate(min, max, preferred, rnd, attempt).to_be();
        attempt += 1;
        if ext_port == cfg.probe_port {
            continue;
        }
        let ek = BindKey::new(proto, ext_addr, ext_port);
        // The external half first, with no-overwrite: two endpoints can
        // never claim the same external port, held ports included.
        match NAT_BIND_REV.insert(ek, inside, BPF_NOEXIST as u64) {
            Ok(()) => {}
            Err(e) if e == -EEXIST => continue,
            Err(_) => return Err(stats::DROP_TABLE_FULL),
        }
        let external = BindExt {
            port: ext_port,
            pool: slot as u8,
            _pad: 0,
        };
        let bound = Bound {
            slot,
            addr: ext_addr,
            port: ext_port,
        };
        return match NAT_BIND.insert(ik, external, BPF_NOEXIST as u64) {
            Ok(()) => Ok((bound, Some(stats::EV_NEW_BINDING))),
            Err(e) => {
                let _ = NAT_BIND_REV.remove(ek);
                if e != -EEXIST {
                    return Err(stats::DROP_TABLE_FULL);
                }
                // Another CPU bound this endpoint meanwhile: use its port.
                match unsafe { NAT_BIND.get(ik) } {
                    Some(b) => {
                        let slot = b.pool as u32;
                        let b = Bound {
                            slot,
                            addr: pool::addr(slot),
                            port: b.port,
                        };
                        Ok((b, Some(stats::EV_INSERT_RACE)))
                    }
                    None => Err(stats::DROP_INTERNAL),
                }
            }
        };
    }
    Err(stats::DROP_NO_PORT)
}

/// Creates the session of a new outbound flow (and its binding if the inside
/// endpoint has none) and returns it with the events to count.
#[inline(always)]
pub fn create(
    key: &CtKey,
    cfg: &NatConfig,
    now: u64,
    tcp_flags: u8,
) -> Result<(*mut CtValue, Option<u32>, u32), u32> {
    let (bind_event, event) = create_entries(key, cfg, now, tcp_flags)?;
    CT_FWD
        .get_ptr_mut(key)
        .map(|v| (v, bind_event, event))
        .ok_or(stats::DROP_INTERNAL)
}

/// The map work of [`create`]. A BPF-to-BPF call rather than inlined:
/// outbound and hairpin both use it, and a copy inlined into each
/// overflows the 512-byte stack. It returns only scalars: a map value
/// pointer handed back through memory loses its type for the verifier.
#[inline(never)]
fn create_entries(
    key: &CtKey,
    cfg: &NatConfig,
    now: u64,
    tcp_flags: u8,
) -> Result<(Option<u32>, u32), u32> {
    let (b, bind_event) = bind(key.proto, key.src_addr, key.src_port, cfg, now)?;
    let tcp_state = if key.proto == IPPROTO_TCP {
        tcp::update(0, DIR_OUT, tcp_flags)
    } else {
        0
    };
    let session = CtValue::new(b.slot, b.port, ticks(now), tcp_state, 0);
    let event = insert_session(key, &session)?;
    if cfg.filtering == FILTER_ADDRESS {
        // Remember the remote address for address-dependent filtering;
        // a full table only narrows what may come in.
        let adf = CtKey::new(key.proto, key.dst_addr, 0, b.addr, b.port);
        let _ = CT_ADF.insert(adf, 0, 0);
    }
    Ok((bind_event, event))
}

#[inline(always)]
fn insert_session(key: &CtKey, v: &CtValue) -> Result<u32, u32> {
    match CT_FWD.insert(key, v, BPF_NOEXIST as u64) {
        Ok(()) => Ok(stats::EV_NEW_FLOW),
        // Another CPU created this session meanwhile: use its entry.
        Err(e) if e == -EEXIST => Ok(stats::EV_INSERT_RACE),
        // The binding stays; the sweeper releases it if no session uses it.
        Err(_) => Err(stats::DROP_TABLE_FULL),
    }
}

/// The external address and port (network order) a session translates to.
#[inline(always)]
pub fn external(s: *const CtValue) -> (u32, u16) {
    let (slot, port) = unsafe { ((*s).pool(), (*s).ext_port) };
    (pool::addr(slot), port)
}

/// An inbound packet's session: the binding of its destination port gives
/// the inside endpoint, and the session of that endpoint with the packet's
/// source decides. Without one the filtering policy may open a session.
/// Returns the session, the inside endpoint and the event to count, or the
/// reason to refuse (`None`: no binding at all).
#[inline(always)]
pub fn inbound(
    reply: &CtKey,
    cfg: &NatConfig,
    now: u64,
    tcp_flags: u8,
) -> Result<(*mut CtValue, u32, u16, Option<u32>), Option<u32>> {
    let ek = BindKey::new(reply.proto, reply.dst_addr, reply.dst_port);
    let Some(b) = (unsafe { NAT_BIND_REV.get(ek) }) else {
        return Err(None);
    };
    let (addr, port, released) = (b.addr, b.port, b.flags & BIND_F_RELEASED != 0);
    let key = CtKey::new(reply.proto, addr, port, reply.src_addr, reply.src_port);
    if let Some(s) = CT_FWD.get_ptr_mut(key) {
        return Ok((s, addr, port, None));
    }
    // The binding's inside half: its slot, for the new session (and a
    // binding whose inside half moved to another address, being drained,
    // opens nothing new).
    let slot = match unsafe { NAT_BIND.get(BindKey::new(reply.proto, addr, port)) } {
        Some(i) if i.port == reply.dst_port && pool::addr(i.pool as u32) == reply.dst_addr => {
            i.pool as u32
        }
        _ => return Err(Some(stats::DROP_FILTERED)),
    };
    let allowed = !released
        && match cfg.filtering {
            FILTER_ENDPOINT_INDEPENDENT => true,
            FILTER_ADDRESS => {
                let adf = CtKey::new(reply.proto, reply.src_addr, 0, reply.dst_addr, reply.dst_port);
                unsafe { CT_ADF.get(adf) }.is_some()
            }
            _ => false,
        }
        // Only TCP and UDP open sessions from outside: a stray TCP segment
        // without SYN or an unasked-for echo reply is not a new session.
        && match reply.proto {
            IPPROTO_TCP => tcp_flags & TCP_SYN != 0,
            IPPROTO_UDP => true,
            _ => false,
        };
    if !allowed {
        return Err(Some(stats::DROP_FILTERED));
    }
    // The egress policy judges such a flow as if the inside endpoint had
    // opened it (to the remote's address and port): the inside would talk
    // to the remote all the same. Denied, whatever the rule's answer, it is
    // dropped silently: the answers go inside, and this came from outside.
    let flow = policy::flow(reply.proto, u16::from_be(reply.src_port));
    if policy::admit(addr, reply.src_addr, flow, policy::options(0, true)) != policy::ALLOWED {
        return Err(Some(stats::DROP_POLICY_DENIED));
    }
    let tcp_state = if reply.proto == IPPROTO_TCP {
        tcp::update(0, DIR_IN, tcp_flags)
    } else {
        0
    };
    let session = CtValue::new(slot, reply.dst_port, ticks(now), tcp_state, CT_F_INBOUND);
    insert_session(&key, &session).map_err(Some)?;
    CT_FWD
        .get_ptr_mut(key)
        .map(|s| (s, addr, port, Some(stats::EV_INBOUND_SESSION)))
        .ok_or(Some(stats::DROP_INTERNAL))
}

/// Whether an external port is bound (to an inside endpoint).
#[inline(always)]
pub fn is_bound(proto: u8, addr: u32, port: u16) -> bool {
    unsafe { NAT_BIND_REV.get(BindKey::new(proto, addr, port)) }.is_some()
}

/// Marks a session as seen now by a packet in direction `dir`. Outbound
/// packets always refresh it; inbound UDP only if configured (RFC 4787
/// REQ-6: outbound refresh is what keeps a mapping alive).
///
/// The first packet against the direction that opened the session marks
/// it answered ([`CT_F_REPLIED`]): under table pressure the sweeper evicts
/// unanswered sessions first. Written once per session, so the cache line
/// is not dirtied per packet.
#[inline(always)]
pub fn touch(v: *mut CtValue, now: u64, proto: u8, dir: u8, cfg: &NatConfig) {
    unsafe {
        let flags = (*v).flags;
        let opened_inbound = flags & CT_F_INBOUND != 0;
        if flags & CT_F_REPLIED == 0 && (dir == DIR_IN) != opened_inbound {
            (*v).flags = flags | CT_F_REPLIED;
        }
    }
    if dir == DIR_IN && proto == IPPROTO_UDP && cfg.flags & CFG_F_UDP_INBOUND_REFRESH == 0 {
        return;
    }
    let now = ticks(now);
    unsafe {
        if now.wrapping_sub((*v).last_seen) > REFRESH_TICKS {
            (*v).last_seen = now;
        }
    }
}

/// Applies a TCP control packet seen in direction `dir` to the session.
#[inline(always)]
pub fn tcp_update(s: *mut CtValue, dir: u8, tcp_flags: u8) {
    unsafe {
        let old = (*s).tcp_state;
        let new = tcp::update(old, dir, tcp_flags);
        if new != old {
            (*s).tcp_state = new;
        }
    }
}

//! A large conntrack table, filled through the maps, and the sweeper run
//! over it: what tests/tests/scale.rs checks and `nat-sweep-bench`
//! measures (CPU time of a pass with nothing to remove and with everything
//! to remove; the batched sweep against an entry-by-entry walk of the same
//! maps, the way the sweeper read them before).

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf,
    maps::{HashMap, MapData},
};
use nat_common::{
    BindExt, BindKey, BindValue, CtKey, CtValue, IPPROTO_TCP, IPPROTO_UDP, NatConfig, ticks,
    timeouts::Timeouts,
};
use nat_loader::{batch, conntrack, dataplane, dataplane::CtMaps, pressure::Limits};

/// The SNAT address of the filled table (pool slot 0).
pub const SNAT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// Sessions per inside endpoint (remote ports 1000..1000+N of one server).
pub const PER_ENDPOINT: u32 = 8;
const PORTS: u32 = 64_000;

fn raw(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

/// Inside endpoint `j`: its protocol, address and external port (UDP for
/// the first 64,000, TCP after: one external port each).
fn endpoint(j: u32) -> (u8, u32, u16) {
    let proto = if j < PORTS { IPPROTO_UDP } else { IPPROTO_TCP };
    let addr = raw(Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + j));
    (proto, addr, (1024 + j % PORTS) as u16)
}

/// Loads the real programs with room for `max_flows` sessions.
pub fn load(max_flows: u32) -> Result<Ebpf> {
    dataplane::load(&NatConfig::new(1, 2, SNAT), max_flows).context("loading the eBPF object")
}

/// Fills the table with `sessions` UDP and TCP sessions of
/// `sessions / PER_ENDPOINT` inside endpoints, each with its binding both
/// ways: those for which `expired(i)` is true last seen `idle` before
/// `now_ns`, the others at `now_ns`. Returns the number of bindings.
pub fn fill(
    ebpf: &mut Ebpf,
    sessions: u32,
    now_ns: u64,
    idle: Duration,
    expired: impl Fn(u32) -> bool,
) -> Result<u32> {
    let endpoints = sessions.div_ceil(PER_ENDPOINT);
    if endpoints > 2 * PORTS {
        bail!("{sessions} sessions need more than {} endpoints", 2 * PORTS);
    }
    let server = raw(Ipv4Addr::new(198, 51, 100, 10));
    // In ticks, wrapping like the dataplane's clock: `idle` may be longer
    // than the machine has been up.
    let old = ticks(now_ns).wrapping_sub((idle.as_nanos() >> nat_common::TICK_SHIFT) as u32);
    let established = nat_common::tcp::SYN_IN | nat_common::tcp::SYN_OUT;
    let mut s = Vec::with_capacity(sessions as usize);
    for i in 0..sessions {
        let (proto, addr, ext) = endpoint(i / PER_ENDPOINT);
        let key = CtKey::new(
            proto,
            addr,
            40000u16.to_be(),
            server,
            (1000 + (i % PER_ENDPOINT) as u16).to_be(),
        );
        let seen = if expired(i) { old } else { ticks(now_ns) };
        let state = if proto == IPPROTO_TCP { established } else { 0 };
        let flags = nat_common::CT_F_REPLIED;
        s.push((key, CtValue::new(0, ext.to_be(), seen, state, flags)));
    }
    let mut out = Vec::with_capacity(endpoints as usize);
    let mut rev = Vec::with_capacity(endpoints as usize);
    for j in 0..endpoints {
        let (proto, addr, ext) = endpoint(j);
        let inside = BindKey::new(proto, addr, 40000u16.to_be());
        out.push((
            inside,
            BindExt {
                port: ext.to_be(),
                pool: 0,
                _pad: 0,
            },
        ));
        rev.push((
            BindKey::new(proto, raw(SNAT), ext.to_be()),
            BindValue {
                addr,
                port: 40000u16.to_be(),
                flags: 0,
                _pad: 0,
                stamp: old,
            },
        ));
    }
    put(ebpf, nat_common::MAP_CT_FWD, &s).context("filling the sessions")?;
    put(ebpf, nat_common::MAP_BIND, &out).context("filling the bindings")?;
    put(ebpf, nat_common::MAP_BIND_REV, &rev).context("filling the bindings' external halves")?;
    Ok(endpoints)
}

/// Writes `entries` into hash map `name` of `ebpf`.
fn put<K, V>(ebpf: &mut Ebpf, name: &str, entries: &[(K, V)]) -> Result<()>
where
    K: aya::Pod + bytemuck::Pod,
    V: aya::Pod + bytemuck::Pod,
{
    let map = ebpf.map_mut(name).with_context(|| name.to_string())?;
    let map = HashMap::<&mut MapData, K, V>::try_from(map)?;
    batch::update(&map, entries)?;
    Ok(())
}

/// CPU time (user + system) of this process so far.
pub fn cpu_time() -> Duration {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid rusage to fill.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// One sweeper pass over `maps` (taken out of the object:
/// `CtMaps::take`) at `now_ns`, with the default timeouts and no
/// pressure: what it did and the CPU time it took.
pub fn sweep(
    maps: &mut CtMaps,
    max_flows: u32,
    now_ns: u64,
) -> Result<(conntrack::Sweep, Duration)> {
    let pool = maps.pool_slots()?;
    let limits = Limits::for_table(max_flows);
    let t = Timeouts::DEFAULT;
    let before = cpu_time();
    let s = conntrack::sweep(
        maps,
        &pool,
        &t,
        nat_common::PORT_HOLD_NS,
        &limits,
        false,
        now_ns,
    )?;
    Ok((s, cpu_time() - before))
}

/// The sweeper's walk as it was before batching, over the same maps: every
/// session, binding half and filter entry read key by key (`get_next_key`
/// and a lookup each), the expired sessions removed one syscall each.
/// Returns how many it removed and the CPU time it took.
pub fn walk_entry_by_entry(maps: &mut CtMaps, now_ns: u64) -> Result<(usize, Duration)> {
    let t = Timeouts::DEFAULT;
    let before = cpu_time();
    let _: Vec<CtKey> = maps.adf.keys().filter_map(|r| r.ok()).collect();
    let sessions: Vec<(CtKey, CtValue)> = maps.sessions.iter().filter_map(|r| r.ok()).collect();
    let mut removed = 0;
    for (k, v) in &sessions {
        if t.expired_tick(k.proto, v.tcp_state, v.last_seen, now_ns) {
            let _ = maps.sessions.remove(k);
            removed += 1;
        }
    }
    let _: Vec<(BindKey, BindValue)> = maps.bind_rev.iter().filter_map(|r| r.ok()).collect();
    let _: Vec<(BindKey, BindExt)> = maps.bind.iter().filter_map(|r| r.ok()).collect();
    Ok((removed, cpu_time() - before))
}

/// The sessions left in `maps`.
pub fn sessions_left(maps: &CtMaps) -> Result<Vec<(CtKey, CtValue)>> {
    Ok(batch::entries(&maps.sessions)?)
}

/// Whether session number `i` of [`fill`] has key `k`: the inverse of its
/// numbering, for checking which sessions a sweep kept.
pub fn session_number(k: &CtKey) -> u32 {
    let host = u32::from(Ipv4Addr::from(k.src_addr.to_ne_bytes()))
        - u32::from(Ipv4Addr::new(10, 128, 0, 0));
    host * PER_ENDPOINT + (u16::from_be(k.dst_port) as u32 - 1000)
}

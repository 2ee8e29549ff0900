//! The control plane's view of the conntrack maps: listing flows,
//! sweeping expired ones and, under table pressure, evicting unanswered
//! ones ([`crate::pressure`] decides which).

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    fmt,
    hash::{BuildHasher, Hasher},
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use anyhow::{Context, Result};
use aya::maps::{HashMap, MapData, PerCpuArray};
use nat_common::{
    BIND_F_RELEASED, BindExt, BindKey, BindValue, CtKey, CtValue, IPPROTO_ICMP, IPPROTO_TCP,
    IPPROTO_UDP, POOL_DRAINING, PoolAddr,
    binding::{self, Fate},
    stats,
    timeouts::Timeouts,
};
use tracing::{info, warn};

use crate::{
    batch,
    dataplane::CtMaps,
    pressure::{self, Limits, Standing},
    stats::Stats,
    summary::{SessionTally, Summary, proto_name, state},
};

type CtMap = HashMap<MapData, CtKey, CtValue>;

/// A translated flow as an operator reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    pub proto: u8,
    pub inside: SocketAddrV4,
    pub external: SocketAddrV4,
    pub remote: SocketAddrV4,
    pub tcp_state: u8,
    /// Opened by an inbound packet (a filtering mode other than the
    /// default let it in).
    pub inbound: bool,
    /// Answered: a packet went against the opening direction.
    pub replied: bool,
    pub idle: Duration,
}

fn addr(raw: u32) -> Ipv4Addr {
    Ipv4Addr::from(raw.to_ne_bytes())
}

fn sock(raw_addr: u32, raw_port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(addr(raw_addr), u16::from_be(raw_port))
}

impl Flow {
    /// The flow of session `(key, v)`, its external address taken from
    /// the pool's slots.
    pub fn from_entry(key: &CtKey, v: &CtValue, pool: &[PoolAddr], now_ns: u64) -> Flow {
        Flow {
            proto: key.proto,
            inside: sock(key.src_addr, key.src_port),
            external: sock(slot_addr(pool, v.pool()), v.ext_port),
            remote: sock(key.dst_addr, key.dst_port),
            tcp_state: v.tcp_bits(),
            inbound: v.inbound(),
            replied: v.replied(),
            idle: Duration::from_nanos(v.idle_ns(now_ns)),
        }
    }

    pub fn proto_name(&self) -> &'static str {
        proto_name(self.proto)
    }

    /// [`state`] of this session.
    pub fn state(&self) -> &'static str {
        state(self.proto, self.tcp_state, self.replied)
    }
}

/// The address (network order) of pool slot `slot` (0 if none).
fn slot_addr(pool: &[PoolAddr], slot: u32) -> u32 {
    pool.get(slot as usize).map(|a| a.addr).unwrap_or(0)
}

impl fmt::Display for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (proto, state) = (self.proto_name(), self.state());
        let opened = if self.inbound { " opened-inbound" } else { "" };
        write!(
            f,
            "{proto:<4} {} -> {} => {} -> {} {state}{opened} idle {}s",
            self.inside,
            self.remote,
            self.external,
            self.remote,
            self.idle.as_secs()
        )
    }
}

/// Every flow in the forward table (`pool`: the pool's slots).
pub fn flows(fwd: &CtMap, pool: &[PoolAddr], now_ns: u64) -> Result<Vec<Flow>> {
    Ok(batch::entries(fwd)
        .context("reading the sessions")?
        .iter()
        .map(|(k, v)| Flow::from_entry(k, v, pool, now_ns))
        .collect())
}

/// What a sweep did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Sessions removed for being idle longer than their timeout.
    pub expired: usize,
    /// Sessions evicted under table pressure (unanswered or reset).
    pub evicted: usize,
    /// Sessions left.
    pub remaining: usize,
    /// Of those, how many are unanswered or reset (evictable once quiet).
    pub unanswered: usize,
    /// Whether this pass was under pressure (see [`crate::pressure`]).
    pub pressed: bool,
    /// Bindings no session uses any more, now held.
    pub released: usize,
    /// Of those, how many only unanswered (or pressure-evicted reset)
    /// sessions used: freed at the next pass, without the hold.
    pub released_unanswered: usize,
    /// Bindings whose hold ended: their external port is free again.
    pub freed: usize,
    /// Half-bindings or filter entries with nothing behind them.
    pub orphans: usize,
    /// What the table holds after the pass (for the metrics: a scrape
    /// never walks the table).
    pub summary: Summary,
    /// Bindings released (held) and freed by this pass, for the
    /// translation log.
    pub binding_changes: Vec<crate::summary::SweepRecord>,
    /// Bindings per pool address.
    pub per_address: Vec<AddressUse>,
    /// Draining addresses that had no binding left: their slots are free.
    pub drained: Vec<Ipv4Addr>,
    /// The pass's CPU time (user and system), phase by phase: most of it
    /// is the kernel's batched map reads and deletes, and this tells which
    /// (`nat-sweep-bench` prints it).
    pub phases: Vec<(&'static str, Duration)>,
}

/// This thread's CPU time (user and system) since the last lap, kept in
/// [`Sweep::phases`].
struct CpuLaps(Duration);

impl CpuLaps {
    fn thread_cpu() -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid timespec to fill. On failure it stays zero and
        // the laps read zero: only the breakdown is lost.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    fn start() -> CpuLaps {
        CpuLaps(Self::thread_cpu())
    }

    fn lap(&mut self, phases: &mut Vec<(&'static str, Duration)>, what: &'static str) {
        let now = Self::thread_cpu();
        phases.push((what, now.saturating_sub(self.0)));
        self.0 = now;
    }
}

/// A hasher for the sweeper's sets of map keys (a million entries at
/// 1 M sessions): std's SipHash costs more than the kernel's batch read.
/// Multiply-rotate over the key's words, seeded at random per sweep so
/// that flows chosen from outside cannot be made to collide on purpose.
#[derive(Clone, Copy)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 29)
    }
    fn write(&mut self, bytes: &[u8]) {
        for c in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            self.write_u64(u64::from_ne_bytes(w));
        }
    }
    fn write_u8(&mut self, n: u8) {
        self.write_u64(n as u64)
    }
    fn write_u16(&mut self, n: u16) {
        self.write_u64(n as u64)
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(n as u64)
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(23) ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// Builds [`KeyHasher`]s from one random seed.
#[derive(Clone, Copy)]
struct KeyHash(u64);

impl KeyHash {
    fn new() -> KeyHash {
        KeyHash(std::collections::hash_map::RandomState::new().hash_one(0u64))
    }
}

impl BuildHasher for KeyHash {
    type Hasher = KeyHasher;
    fn build_hasher(&self) -> KeyHasher {
        KeyHasher(self.0)
    }
}

type KeySet<K> = HashSet<K, KeyHash>;

/// Ports per protocol and address.
const PORTS: usize = 1 << 16;

/// The row of protocol `proto` in a [`PortSet`] (other protocols have none).
fn proto_row(proto: u8) -> Option<usize> {
    match proto {
        IPPROTO_TCP => Some(0),
        IPPROTO_UDP => Some(1),
        IPPROTO_ICMP => Some(2),
        _ => None,
    }
}

/// A set of external endpoints (the [`BindKey`]s of `NAT_BIND_REV`) with
/// one bit per TCP, UDP and ICMP port of each distinct pool address: the
/// sweeper adds one per session, a million times a pass at 1 M sessions,
/// and setting a bit costs a small fraction of a hash-set insert. Other
/// protocols go to a hash set.
struct PortSet {
    /// The address of each row of bits; row 0 is address 0, what a
    /// session's slot outside the pool stands for ([`slot_addr`]).
    addrs: Vec<u32>,
    /// The row of each pool slot a session can name.
    slot_rows: Vec<usize>,
    bits: Vec<u64>,
    other: KeySet<BindKey>,
}

impl PortSet {
    fn new(pool: &[PoolAddr], hash: KeyHash) -> PortSet {
        let mut addrs = vec![0];
        let slots = pool.len().max(1 << (8 - nat_common::CT_POOL_SHIFT));
        let slot_rows = (0..slots)
            .map(|slot| {
                let a = pool.get(slot).map_or(0, |a| a.addr);
                addrs.iter().position(|&x| x == a).unwrap_or_else(|| {
                    addrs.push(a);
                    addrs.len() - 1
                })
            })
            .collect();
        PortSet {
            // Zeroed on allocation: pages no port falls in cost nothing.
            bits: vec![0; addrs.len() * 3 * PORTS / 64],
            addrs,
            slot_rows,
            other: KeySet::with_hasher(hash),
        }
    }

    /// Bit `port` (network order) of row `row`, protocol row `proto`.
    fn bit(row: usize, proto: usize, port: u16) -> (usize, u64) {
        let i = (row * 3 + proto) * PORTS + port as usize;
        (i / 64, 1 << (i % 64))
    }

    /// Adds the external endpoint of session `v` of protocol `proto`: the
    /// address of its pool slot, its external port.
    fn insert_session(&mut self, proto: u8, v: &CtValue) {
        let row = self.slot_rows.get(v.pool() as usize).copied().unwrap_or(0);
        match proto_row(proto) {
            Some(p) => {
                let (w, b) = Self::bit(row, p, v.ext_port);
                self.bits[w] |= b;
            }
            None => {
                self.other
                    .insert(BindKey::new(proto, self.addrs[row], v.ext_port));
            }
        }
    }

    fn contains(&self, ek: &BindKey) -> bool {
        let Some(p) = proto_row(ek.proto) else {
            return self.other.contains(ek);
        };
        // Keys are made with `BindKey::new`: one with padding set is none
        // of them.
        let Some(row) = self.addrs.iter().position(|&a| a == ek.addr) else {
            return false;
        };
        let (w, b) = Self::bit(row, p, ek.port);
        ek._pad == 0 && self.bits[w] & b != 0
    }
}

/// Removes idle sessions and, under pressure (`refused`: new flows were
/// dropped for a full table since the last pass, or the table is above
/// `limits.high`), evicts unanswered and reset ones down to `limits.low`
/// ([`crate::pressure::victims`]). Releases the bindings no session uses:
/// they stay reserved for their inside endpoint for `hold_ns` (RFC 6888),
/// except those only unanswered sessions used, which are freed at the next
/// pass: the hold keeps a port someone outside may still be talking to
/// from going to another host, and nobody outside ever talked to these.
/// Drops address-filter entries of remotes no session talks to any more.
/// Maps are read and sessions deleted in batches ([`crate::batch`]).
pub fn sweep(
    m: &mut CtMaps,
    pool: &[PoolAddr],
    t: &Timeouts,
    hold_ns: u64,
    limits: &Limits,
    refused: bool,
    now_ns: u64,
) -> Result<Sweep> {
    let mut laps = CpuLaps::start();
    let mut out = Sweep::default();
    let hash = KeyHash::new();
    let mut live_ports = PortSet::new(pool, hash);
    let mut live_remotes: KeySet<CtKey> = KeySet::with_hasher(hash);
    // Bindings that lost a session somebody outside answered: those keep
    // the hold.
    let mut answered_ports = PortSet::new(pool, hash);
    let port_of =
        |k: &CtKey, v: &CtValue| BindKey::new(k.proto, slot_addr(pool, v.pool()), v.ext_port);
    // Walked before the sessions: the dataplane adds a remote's filter
    // entry after its session, so every entry seen here has its session in
    // the walk below, and one added later is left for the next pass.
    let remotes: Vec<CtKey> = batch::entries(&m.adf)
        .context("reading the address filter")?
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    let mut alive: Vec<(CtKey, CtValue)> =
        batch::entries(&m.sessions).context("reading the sessions")?;
    laps.lap(&mut out.phases, "read sessions");
    let mut gone: Vec<CtKey> = Vec::new();
    // In place: a second vector of the live ones would be another copy of
    // the table.
    alive.retain(|(k, v)| {
        if !t.expired_tick(k.proto, v.tcp_state, v.last_seen, now_ns) {
            return true;
        }
        gone.push(*k);
        if pressure::standing(k.proto, v) != Standing::Unanswered {
            answered_ports.insert_session(k.proto, v);
        }
        false
    });
    out.expired = gone.len();
    out.pressed = limits.pressed(alive.len(), refused);
    let victims = pressure::victims(&alive, limits, now_ns, out.pressed);
    let mut evicted = vec![false; if victims.is_empty() { 0 } else { alive.len() }];
    for &i in &victims {
        gone.push(alive[i].0);
        evicted[i] = true;
    }
    laps.lap(&mut out.phases, "expiry and pressure");
    // Gone already (another sweeper of an adopted table) is fine.
    batch::delete(&m.sessions, &gone).context("deleting sessions")?;
    laps.lap(&mut out.phases, "delete sessions");
    out.evicted = victims.len();
    let mut tally = SessionTally::default();
    for (i, (k, v)) in alive.iter().enumerate() {
        if evicted.get(i) == Some(&true) {
            continue;
        }
        tally.add(k.proto, v);
        if pressure::standing(k.proto, v) != Standing::Kept {
            out.unanswered += 1;
        }
        live_ports.insert_session(k.proto, v);
        if !remotes.is_empty() {
            let ext = port_of(k, v);
            live_remotes.insert(CtKey::new(k.proto, k.dst_addr, 0, ext.addr, ext.port));
        }
    }
    out.remaining = alive.len() - victims.len();
    out.summary.sessions(&tally);
    laps.lap(&mut out.phases, "live sessions' ports, summary");
    let bindings: Vec<(BindKey, BindValue)> =
        batch::entries(&m.bind_rev).context("reading the bindings")?;
    laps.lap(&mut out.phases, "read bindings");
    let mut freed: Vec<BindKey> = Vec::new();
    // Bindings to write back (restored or released), in one batch.
    let mut changed: Vec<(BindKey, BindValue)> = Vec::new();
    for (ek, v) in &bindings {
        let in_use = live_ports.contains(ek);
        match binding::fate(v, in_use, answered_ports.contains(ek), now_ns, hold_ns) {
            Fate::Keep => out.summary.binding(ek, v.released()),
            // Taken back by a session (an inbound-opened one, or one
            // created just as the last pass released the binding).
            Fate::Restore => {
                changed.push((*ek, binding::claimed(v, now_ns)));
                out.summary.binding(ek, false);
            }
            Fate::Release { no_hold } => {
                changed.push((*ek, binding::released(v, no_hold, now_ns)));
                out.released += 1;
                out.released_unanswered += no_hold as usize;
                out.summary.binding(ek, true);
                out.binding_changes
                    .push((crate::summary::Change::Released, *ek, *v));
            }
            Fate::Free => {
                // Read again: an outbound packet of the endpoint may have
                // taken it back since the walk (the dataplane clears the
                // flags).
                let still_released = m
                    .bind_rev
                    .get(ek, 0)
                    .is_ok_and(|r| r.flags & BIND_F_RELEASED != 0);
                if !still_released {
                    out.summary.binding(ek, false);
                    continue;
                }
                let ik = BindKey::new(ek.proto, v.addr, v.port);
                if m.bind
                    .get(&ik, 0)
                    .is_ok_and(|b| b.port == ek.port && slot_addr(pool, b.pool as u32) == ek.addr)
                {
                    let _ = m.bind.remove(&ik);
                }
                freed.push(*ek);
                out.freed += 1;
                out.binding_changes
                    .push((crate::summary::Change::Freed, *ek, *v));
            }
        }
    }
    laps.lap(&mut out.phases, "bindings' fates");
    batch::update(&m.bind_rev, &changed).context("releasing bindings")?;
    batch::delete(&m.bind_rev, &freed).context("freeing bindings")?;
    laps.lap(&mut out.phases, "release and free bindings");
    // Inside halves whose external half is gone (an insert race lost, or
    // freed above). Judged on the external halves read above: one the
    // dataplane added since is read again before its inside half goes
    // (it adds the external half first).
    let mut owners: StdHashMap<BindKey, (u32, u16), KeyHash> =
        StdHashMap::with_capacity_and_hasher(bindings.len(), hash);
    owners.extend(bindings.iter().map(|(ek, v)| (*ek, (v.addr, v.port))));
    let mut freed_set: KeySet<BindKey> = KeySet::with_hasher(hash);
    freed_set.extend(freed);
    let freed = freed_set;
    let inside: Vec<(BindKey, BindExt)> =
        batch::entries(&m.bind).context("reading the bindings' inside halves")?;
    laps.lap(&mut out.phases, "read inside halves");
    let mut orphans: Vec<BindKey> = Vec::new();
    for (ik, v) in &inside {
        let ek = BindKey::new(ik.proto, slot_addr(pool, v.pool as u32), v.port);
        let owned = !freed.contains(&ek)
            && owners
                .get(&ek)
                .is_some_and(|&(a, p)| a == ik.addr && p == ik.port);
        if owned {
            continue;
        }
        let owned_now = m
            .bind_rev
            .get(&ek, 0)
            .is_ok_and(|r| r.addr == ik.addr && r.port == ik.port);
        if !owned_now {
            orphans.push(*ik);
        }
    }
    out.orphans += batch::delete(&m.bind, &orphans).context("deleting orphan bindings")?;
    let stale: Vec<CtKey> = remotes
        .into_iter()
        .filter(|k| !live_remotes.contains(k))
        .collect();
    out.orphans += batch::delete(&m.adf, &stale).context("deleting filter entries")?;
    let left: Vec<(BindKey, BindValue)> = bindings
        .into_iter()
        .filter(|(ek, _)| !freed.contains(ek))
        .collect();
    out.per_address = per_address(pool, &left);
    // A draining address without bindings has no flow left (a session
    // keeps its binding, and no new one goes to a draining address): its
    // slot is free for another address.
    for (slot, u) in pool.iter().zip(0u32..).filter_map(|(a, i)| {
        let u = out.per_address.iter().find(|u| u.addr == a.ip())?;
        (a.state == POOL_DRAINING && u.bindings == [0; 3]).then_some((i, u.addr))
    }) {
        m.pool
            .set(slot, PoolAddr::default(), 0)
            .with_context(|| format!("freeing pool slot {slot}"))?;
        info!(slot, address = %u, "the SNAT address has drained: no flow uses it any more");
        out.drained.push(u);
    }
    laps.lap(&mut out.phases, "orphans, filter, per address");
    Ok(out)
}

/// Bindings per pool address and protocol: (address, state, [tcp, udp,
/// icmp]) for every used slot.
pub fn per_address(pool: &[PoolAddr], bindings: &[(BindKey, BindValue)]) -> Vec<AddressUse> {
    let mut out: Vec<AddressUse> = pool
        .iter()
        .filter(|a| a.state != nat_common::POOL_FREE)
        .map(|a| AddressUse {
            addr: a.ip(),
            state: a.state,
            bindings: [0; 3],
        })
        .collect();
    for (ek, _) in bindings {
        let Some(u) = out
            .iter_mut()
            .find(|u| u.addr.octets() == ek.addr.to_ne_bytes())
        else {
            continue;
        };
        match ek.proto {
            IPPROTO_TCP => u.bindings[0] += 1,
            IPPROTO_UDP => u.bindings[1] += 1,
            IPPROTO_ICMP => u.bindings[2] += 1,
            _ => {}
        }
    }
    out
}

/// How many bindings (external ports in use or held) one pool address has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressUse {
    pub addr: Ipv4Addr,
    /// `POOL_ACTIVE` or `POOL_DRAINING`.
    pub state: u32,
    /// TCP, UDP, ICMP.
    pub bindings: [usize; 3],
}

/// Drops that evicting unanswered sessions can cure: a full session or
/// binding table, or no free external port.
const REFUSALS: [u32; 2] = [stats::DROP_TABLE_FULL, stats::DROP_NO_PORT];

/// The sweeper between passes: whether it is under pressure, and what it
/// needs to tell (refusals since the last pass, an episode's totals).
pub struct Sweeper {
    pub timeouts: Timeouts,
    pub hold_ns: u64,
    pub limits: Limits,
    /// How long between passes when not under pressure.
    pub interval: Duration,
    refusals: Option<u64>,
    episode: Option<Episode>,
    /// Where each pass's summary goes (the metrics).
    published: Option<std::sync::Arc<crate::summary::Published>>,
    /// Where the bindings released and freed go (the translation log).
    binding_log: Option<std::sync::mpsc::Sender<crate::summary::SweepRecord>>,
}

/// One stretch of passes under pressure.
struct Episode {
    started: std::time::Instant,
    refusals_at_start: u64,
    evicted: usize,
}

impl Sweeper {
    pub fn new(timeouts: Timeouts, hold_ns: u64, max_flows: u32, interval: Duration) -> Sweeper {
        Sweeper {
            timeouts,
            hold_ns,
            limits: Limits::for_table(max_flows),
            interval,
            refusals: None,
            episode: None,
            published: None,
            binding_log: None,
        }
    }

    /// Sends the bindings each pass releases and frees there.
    pub fn log_bindings_to(
        mut self,
        log: Option<std::sync::mpsc::Sender<crate::summary::SweepRecord>>,
    ) -> Sweeper {
        self.binding_log = log;
        self
    }

    /// Publishes each pass's summary there.
    pub fn publish_to(mut self, p: std::sync::Arc<crate::summary::Published>) -> Sweeper {
        self.published = Some(p);
        self
    }

    /// Whether the last pass was under pressure.
    pub fn pressed(&self) -> bool {
        self.episode.is_some()
    }

    /// How long until the next pass: [`pressure::PRESSURE_SWEEP`] under
    /// pressure (new flows are refused until a pass makes room), else the
    /// configured interval.
    pub fn next_in(&self) -> Duration {
        if self.pressed() {
            pressure::PRESSURE_SWEEP.min(self.interval)
        } else {
            self.interval
        }
    }

    /// One pass; logs what it did and when pressure starts or ends.
    pub fn run(
        &mut self,
        m: &mut CtMaps,
        counters: &PerCpuArray<MapData, u64>,
        now_ns: u64,
    ) -> Result<Sweep> {
        let started = std::time::Instant::now();
        let total = Stats::sum(counters, &REFUSALS)?;
        // The first pass has nothing to compare with (an adopted table's
        // counters are from before).
        let refused = self.refusals.is_some_and(|before| total > before);
        self.refusals = Some(total);
        let pool = m.pool_slots()?;
        let s = sweep(
            m,
            &pool,
            &self.timeouts,
            self.hold_ns,
            &self.limits,
            refused,
            now_ns,
        )?;
        match (&mut self.episode, s.pressed) {
            (None, true) => {
                warn!(
                    sessions = s.remaining + s.evicted,
                    high_watermark = self.limits.high,
                    refused_since_last_sweep = refused,
                    evicted = s.evicted,
                    unanswered_left = s.unanswered,
                    "conntrack table under pressure: evicting unanswered and reset sessions, \
                     sweeping every second"
                );
                self.episode = Some(Episode {
                    started: std::time::Instant::now(),
                    refusals_at_start: total,
                    evicted: s.evicted,
                });
            }
            (Some(e), true) => e.evicted += s.evicted,
            (Some(e), false) => {
                info!(
                    sessions = s.remaining,
                    evicted = e.evicted,
                    refused = total - e.refusals_at_start,
                    seconds = e.started.elapsed().as_secs_f64(),
                    "conntrack table pressure over"
                );
                self.episode = None;
            }
            (None, false) => {}
        }
        if s.expired + s.evicted + s.released + s.freed + s.orphans > 0 {
            info!(
                expired = s.expired,
                evicted = s.evicted,
                remaining = s.remaining,
                unanswered = s.unanswered,
                released = s.released,
                released_unanswered = s.released_unanswered,
                freed = s.freed,
                orphans = s.orphans,
                ms = started.elapsed().as_millis() as u64,
                "swept conntrack"
            );
        }
        if let Some(log) = &self.binding_log {
            for r in &s.binding_changes {
                let _ = log.send(*r);
            }
        }
        if let Some(p) = &self.published {
            p.pass(
                s.summary.clone(),
                s.expired,
                s.evicted,
                s.pressed,
                started.elapsed(),
            );
        }
        Ok(s)
    }
}

/// The sweeper on a thread of its own. A pass reads every session and
/// binding (in batches: about a third of a second of CPU at a million
/// sessions); on the runtime's one thread it would hold up the health
/// checks, the `/healthz` answers and signal handling for that long.
pub struct SweeperThread {
    stop: std::sync::mpsc::Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SweeperThread {
    /// Runs a first pass at once, then one every [`Sweeper::next_in`], on
    /// handles of its own to the maps. A failing pass ends the thread; its
    /// error is sent on `failed`.
    pub fn spawn(
        mut sweeper: Sweeper,
        mut maps: CtMaps,
        stats: PerCpuArray<MapData, u64>,
        failed: tokio::sync::oneshot::Sender<anyhow::Error>,
    ) -> Result<SweeperThread> {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("sweeper".into())
            .spawn(move || {
                loop {
                    if let Err(e) = sweeper.run(&mut maps, &stats, crate::monotonic_ns()) {
                        let _ = failed.send(e);
                        return;
                    }
                    match stopped.recv_timeout(sweeper.next_in()) {
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                        // Asked to stop, or the loader is gone.
                        _ => return,
                    }
                }
            })
            .context("starting the sweeper thread")?;
        Ok(SweeperThread {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread: at once between passes; a pass under way finishes
    /// first (waited for up to `grace`, then left to end with the process).
    pub fn stop(&mut self, grace: Duration) {
        let _ = self.stop.send(());
        let Some(thread) = self.thread.take() else {
            return;
        };
        let deadline = std::time::Instant::now() + grace;
        while !thread.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if thread.is_finished() {
            let _ = thread.join();
        } else {
            warn!(
                seconds = grace.as_secs_f64(),
                "a conntrack sweep is still running; not waiting for it"
            );
        }
    }
}

impl Drop for SweeperThread {
    fn drop(&mut self) {
        self.stop(Duration::ZERO);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nat_common::{POOL_ACTIVE, POOL_FREE};

    #[test]
    fn a_port_set_holds_the_same_endpoints_as_a_set_of_binding_keys() {
        let a = PoolAddr::new(Ipv4Addr::new(192, 0, 2, 1), POOL_ACTIVE);
        let b = PoolAddr::new(Ipv4Addr::new(192, 0, 2, 2), POOL_ACTIVE);
        // Slot 2 names `a` again; slot 3 is free (address 0); slots past
        // the pool stand for address 0 too.
        let pool = [a, b, a, PoolAddr::new(Ipv4Addr::UNSPECIFIED, POOL_FREE)];
        let mut set = PortSet::new(&pool, KeyHash::new());
        let mut want = std::collections::HashSet::new();
        for (proto, slot, port) in [
            (IPPROTO_TCP, 0, 1024u16),
            (IPPROTO_UDP, 1, 1024),
            (IPPROTO_ICMP, 2, 7),
            (IPPROTO_UDP, 3, 65535),
            (IPPROTO_TCP, 40, 0),
            (47, 1, 9),
        ] {
            let v = CtValue::new(slot, port.to_be(), 0, 0, 0);
            set.insert_session(proto, &v);
            want.insert(BindKey::new(proto, slot_addr(&pool, slot), port.to_be()));
        }
        let addrs = [a.addr, b.addr, 0, 0x0a00_0001];
        for proto in [IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP, 47, 132] {
            for addr in addrs {
                for port in [0u16, 7, 9, 1023, 1024, 1025, 65535] {
                    let ek = BindKey::new(proto, addr, port.to_be());
                    assert_eq!(set.contains(&ek), want.contains(&ek), "{ek:?}");
                }
            }
        }
        let padded = BindKey {
            _pad: 1,
            ..BindKey::new(IPPROTO_TCP, a.addr, 1024u16.to_be())
        };
        assert!(!set.contains(&padded));
    }
}

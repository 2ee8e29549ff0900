//! What RFC 9693 ("Benchmarking methodology for stateful NATxy gateways")
//! asks of a stateful NAT, asked of iptables MASQUERADE, nftables
//! masquerade and nat-gateway side by side, each in a topology of its own
//! with a large table:
//!
//! - *connection establishment rate*: every packet a new 5-tuple (a new
//!   session); the highest rate forwarded without loss (a binary search of
//!   paced trials), and the gateway's CPU time per new session when it is
//!   saturated;
//! - *table capacity*: new flows at a steady rate into a table of
//!   `capacity_table` sessions until they start to fail; and the memory
//!   per session;
//! - *forwarding at scale*: 64-byte packets cycling over 1 k … 4 M active
//!   flows (each flow created first at a pace the variant takes without
//!   loss), forwarded rate and CPU per packet, and where a BPF program
//!   runs, its run time per packet (bpf_stats);
//! - *tear-down rate*: the sweeper's CPU time for a million expired
//!   sessions (ours; the kernel expires conntrack entries in its GC worker,
//!   spread over time, with nothing to attribute them to).
//!
//! The kernel's table is sized like ours: `nf_conntrack_max` and its hash
//! (host-wide settings, restored when the run ends) and the unreplied-UDP
//! timeout (per namespace, see `Topo::with_table`).

use std::{path::Path, time::Duration};

use anyhow::{Context, Result, bail};

use super::{
    Plan, Variant,
    generator::{self, Blast},
    measure::{self, Cpus},
    progress,
    topo::Topo,
};
use crate::sweep_scale;

/// The variants compared.
pub const VARIANTS: [Variant; 3] = [Variant::Iptables, Variant::Nftables, Variant::Gateway];

/// A trial counts as loss-free when at most this fraction is lost (one
/// packet in 10,000: a VM's rare stray drop at the sink must not halve the
/// result).
const LOSS_FREE: f64 = 1e-4;
/// A slice of the capacity fill in which new flows *fail* loses more than
/// this: a full table refuses nearly all of them, where a burst of load
/// (a sweeper pass, a hiccup of the VM) loses some for a moment; those
/// slices are counted apart.
const FAILING: f64 = 0.5;

#[derive(Clone, Debug, Default)]
pub struct StatefulResult {
    /// Table size of the establishment and forwarding phases.
    pub table: u32,
    /// Table size of the capacity phase.
    pub capacity_table: u32,
    pub variants: Vec<StatefulVariant>,
    /// Ours: the sweeper's CPU time for `sweep_sessions` sessions.
    pub sweep: Option<SweepCost>,
}

#[derive(Clone, Debug)]
pub struct StatefulVariant {
    pub variant: Variant,
    pub establish: Establish,
    pub capacity: Capacity,
    pub scale: Vec<ScalePoint>,
}

#[derive(Clone, Debug, Default)]
pub struct Establish {
    /// New sessions per second forwarded flat out (the gateway saturated),
    /// median of the saturated trials.
    pub saturated_pps: f64,
    /// Gateway CPU (its NAPI threads) per new session, saturated: the
    /// median of `cpu_ns`, one per saturated trial.
    pub cpu_ns_per_session: f64,
    pub cpu_ns: Vec<f64>,
    /// Highest paced rate forwarded without loss.
    pub loss_free_pps: f64,
    /// Every trial: (rate, sent, received).
    pub trials: Vec<(f64, u64, u64)>,
    /// One more saturated trial with bpf_stats on (ours): each program's
    /// time on new sessions.
    pub progs: Vec<measure::ProgTime>,
}

#[derive(Clone, Debug, Default)]
pub struct Capacity {
    /// Rate of the fill (new sessions per second).
    pub rate: f64,
    /// Sessions created (packets received) before the first slice of the
    /// fill in which new flows failed ([`FAILING`]); `None`: none did.
    pub failed_at: Option<u64>,
    /// Slices before that which lost some (not most) of their new flows.
    pub lossy_slices: u32,
    /// New flows sent and received over the whole fill.
    pub sent: u64,
    pub received: u64,
    /// Memory per session: ours every map of the object (memlock) over the
    /// table size; the kernel's the conntrack entries (slab) and hash
    /// buckets over the entries they hold.
    pub bytes_per_session: f64,
}

#[derive(Clone, Debug, Default)]
pub struct ScalePoint {
    pub flows: u64,
    /// Flows whose first packet got through before the measurement.
    pub created: u64,
    /// Per repeat: forwarded pps and gateway CPU ns per packet.
    pub pps: Vec<f64>,
    pub cpu_ns: Vec<f64>,
    /// bpf_stats, one more window: each program that ran.
    pub progs: Vec<measure::ProgTime>,
}

#[derive(Clone, Debug, Default)]
pub struct SweepCost {
    pub sessions: u32,
    /// CPU of one pass that removes nothing, and of one that removes all.
    pub keep_all: Duration,
    pub remove_all: Duration,
}

impl SweepCost {
    /// CPU ms per million sessions.
    pub fn ms_per_million(d: Duration, sessions: u32) -> f64 {
        d.as_secs_f64() * 1e3 * 1e6 / sessions as f64
    }
}

/// Restores `nf_conntrack_max` and the conntrack hash size when dropped.
struct ConntrackLimits {
    max: String,
    hash: String,
}

const CT_MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_max";
const CT_HASH: &str = "/sys/module/nf_conntrack/parameters/hashsize";

impl ConntrackLimits {
    fn save() -> Result<ConntrackLimits> {
        if !Path::new(CT_HASH).exists() {
            // A fresh host may not have conntrack loaded yet (the first
            // iptables rule loads it).
            let _ = std::process::Command::new("modprobe")
                .arg("nf_conntrack")
                .status();
        }
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .map(|s| s.trim().to_string())
                .with_context(|| format!("reading {p} (is nf_conntrack loaded?)"))
        };
        Ok(ConntrackLimits {
            max: read(CT_MAX)?,
            hash: read(CT_HASH)?,
        })
    }

    /// The kernel's table sized like ours: `to` entries, `to` buckets.
    fn set(&self, to: u32) -> Result<()> {
        for p in [CT_HASH, CT_MAX] {
            std::fs::write(p, to.to_string()).with_context(|| format!("setting {p} to {to}"))?;
        }
        Ok(())
    }
}

impl Drop for ConntrackLimits {
    fn drop(&mut self) {
        for (p, v) in [(CT_HASH, &self.hash), (CT_MAX, &self.max)] {
            if let Err(e) = std::fs::write(p, v) {
                eprintln!("nat-bench: could not restore {p} to {v}: {e}");
            }
        }
    }
}

/// Runs the four measurements for every variant of [`VARIANTS`].
pub fn run(plan: &Plan, cpus: Cpus, work: &Path) -> Result<StatefulResult> {
    let limits = ConntrackLimits::save()?;
    let mut res = StatefulResult {
        table: plan.stateful_table,
        capacity_table: plan.capacity_table,
        ..Default::default()
    };
    for v in VARIANTS {
        progress(&format!(
            "RFC 9693, {}: connection establishment rate",
            v.key()
        ));
        limits.set(plan.stateful_table)?;
        let establish = {
            let t = Topo::with_table(v, work, plan.stateful_table)?;
            establishment(&t, plan, cpus)?
        };
        // What the variant takes without loss, with room to spare:
        // creating flows must not lose any.
        let pace = (establish.loss_free_pps * 0.8).max(10_000.0);

        progress(&format!("RFC 9693, {}: table capacity", v.key()));
        limits.set(plan.capacity_table)?;
        let capacity = {
            let t = Topo::with_table(v, work, plan.capacity_table)?;
            capacity(&t, plan, cpus, pace)?
        };

        limits.set(plan.stateful_table)?;
        let t = Topo::with_table(v, work, plan.stateful_table)?;
        let mut scale = Vec::new();
        for &flows in &plan.scale_flows {
            progress(&format!(
                "RFC 9693, {}: forwarding over {flows} active flows",
                v.key()
            ));
            scale.push(at_scale(&t, plan, cpus, flows, pace)?);
        }
        res.variants.push(StatefulVariant {
            variant: v,
            establish,
            capacity,
            scale,
        });
    }
    progress("RFC 9693: tear-down (sweep) rate");
    res.sweep = Some(sweep_cost(plan.sweep_sessions)?);
    Ok(res)
}

/// Sends `b`, then waits for what is in flight; (sent, received).
fn trial(t: &Topo, cpus: Cpus, b: Blast) -> Result<(u64, u64)> {
    let before = t.sink_count()?;
    let sent = generator::blast(t, cpus.other, b)?;
    // The last frames are still in the rings and NAPI threads.
    std::thread::sleep(Duration::from_millis(100));
    Ok((sent, t.sink_count()?.saturating_sub(before)))
}

fn lossless(sent: u64, received: u64) -> bool {
    sent > 0 && (sent.saturating_sub(received) as f64) <= sent as f64 * LOSS_FREE
}

fn establishment(t: &Topo, plan: &Plan, cpus: Cpus) -> Result<Establish> {
    let gw_threads = t.pin_napi(cpus.gw, cpus.other)?;
    let gw_cpu = || -> u64 {
        gw_threads
            .iter()
            .map(|&p| super::topo::task_cpu_ns(p))
            .sum()
    };
    // Every packet a new flow, never one of an earlier trial.
    let mut e = Establish::default();

    // Saturated, `repeats` times: how fast, and at what CPU per session.
    let mut pps = Vec::new();
    for r in 0..plan.repeats {
        super::check_interrupted()?;
        let cpu0 = gw_cpu();
        let b = Blast {
            first: (r == 0).then_some(0),
            ..Blast::flat_out(0, plan.establish_secs)
        };
        let (sent, received) = trial(t, cpus, b)?;
        let cpu = gw_cpu().saturating_sub(cpu0);
        if received == 0 {
            bail!("{}: no new flow got through", t.variant.key());
        }
        pps.push(received as f64 / plan.establish_secs);
        e.cpu_ns.push(cpu as f64 / received as f64);
        e.trials.push((f64::INFINITY, sent, received));
    }
    e.saturated_pps = super::report::Stat::of(&pps).median;
    e.cpu_ns_per_session = super::report::Stat::of(&e.cpu_ns).median;

    // Binary search of the paced rate, between nothing and a little above
    // the saturated rate. A rate passes when one of two trials at it lost
    // nothing: a VM's stray hiccup must not end the search low, a rate the
    // gateway cannot take loses in both.
    let (mut lo, mut hi) = (0.0f64, e.saturated_pps * 1.1);
    for _ in 0..plan.establish_steps {
        let rate = (lo + hi) / 2.0;
        let mut passed = false;
        for _ in 0..2 {
            super::check_interrupted()?;
            let b = Blast {
                flows: 0,
                first: None,
                rate: Some(rate),
                secs: plan.establish_secs,
                packets: None,
            };
            let (sent, received) = trial(t, cpus, b)?;
            e.trials.push((rate, sent, received));
            if lossless(sent, received) {
                passed = true;
                break;
            }
        }
        if passed {
            lo = rate;
        } else {
            hi = rate;
        }
    }
    e.loss_free_pps = lo;
    if t.variant == Variant::Gateway {
        let saturated = || trial(t, cpus, Blast::flat_out(0, plan.establish_secs));
        e.progs = measure::program_times_of(t, saturated)?.1;
    }
    Ok(e)
}

fn capacity(t: &Topo, plan: &Plan, cpus: Cpus, rate: f64) -> Result<Capacity> {
    t.pin_napi(cpus.gw, cpus.other)?;
    let slab_before = conntrack_slab()?;
    let mut c = Capacity {
        rate,
        ..Default::default()
    };
    // Slices until 1.5 tables' worth was sent, each a tenth of a second
    // and at most an eighth of the table: a small (quick) table fills over
    // several slices, so the ones after it is full lose nearly everything.
    let slice = ((rate / 10.0) as u64)
        .min(plan.capacity_table as u64 / 8)
        .max(1);
    let total = plan.capacity_table as u64 * 3 / 2;
    while c.sent < total {
        super::check_interrupted()?;
        let b = Blast {
            flows: 0,
            first: (c.sent == 0).then_some(0),
            rate: Some(rate),
            secs: 60.0,
            packets: Some(slice.min(total - c.sent)),
        };
        let (sent, received) = trial(t, cpus, b)?;
        let lost = sent.saturating_sub(received) as f64;
        if c.failed_at.is_none() {
            if lost > sent as f64 * FAILING {
                c.failed_at = Some(c.received + received);
            } else if lost > sent as f64 * LOSS_FREE {
                c.lossy_slices += 1;
            }
        }
        c.sent += sent;
        c.received += received;
    }
    c.bytes_per_session = match t.variant {
        Variant::Gateway => {
            let ebpf = sweep_scale::load(plan.capacity_table)?;
            let mut bytes = 0;
            for (_, map) in ebpf.maps() {
                bytes += super::scale::memlock(super::scale::map_data(map))?;
            }
            bytes as f64 / plan.capacity_table as f64
        }
        _ => {
            let (objs, objsize) = conntrack_slab()?;
            let entries = objs.saturating_sub(slab_before.0).max(1);
            let hash: u64 = std::fs::read_to_string(CT_HASH)?.trim().parse()?;
            // One pointer per hash bucket.
            (entries * objsize + hash * 8) as f64 / entries as f64
        }
    };
    Ok(c)
}

/// (active objects, object size) of the nf_conntrack slab cache.
fn conntrack_slab() -> Result<(u64, u64)> {
    let s = std::fs::read_to_string("/proc/slabinfo").context("reading /proc/slabinfo")?;
    let line = s
        .lines()
        .find(|l| l.starts_with("nf_conntrack "))
        .context("no nf_conntrack cache in /proc/slabinfo (merged into another?)")?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(3)
        .filter_map(|v| v.parse().ok())
        .collect();
    match f[..] {
        [active, _, size] => Ok((active, size)),
        _ => bail!("unexpected /proc/slabinfo line: {line}"),
    }
}

fn at_scale(t: &Topo, plan: &Plan, cpus: Cpus, flows: u64, pace: f64) -> Result<ScalePoint> {
    t.pin_napi(cpus.gw, cpus.other)?;
    // Create every flow once, at a pace taken without loss.
    let b = Blast {
        flows,
        first: Some(0),
        rate: Some(pace),
        secs: f64::MAX,
        packets: Some(flows),
    };
    // Packets lost here leave flows to be created while measured: said
    // in the table, not hidden.
    let (_, created) = trial(t, cpus, b)?;
    let mut p = ScalePoint {
        flows,
        created,
        ..Default::default()
    };
    for _ in 0..plan.repeats {
        super::check_interrupted()?;
        let s = measure::pps(t, cpus, flows, plan.pps_warmup_secs, plan.pps_secs)?;
        p.pps.push(s.pps);
        p.cpu_ns.push(s.cpu_ns_per_pkt);
    }
    if t.variant == Variant::Gateway {
        p.progs = measure::program_times(t, cpus, flows, plan.pps_warmup_secs, plan.pps_secs)?.1;
    }
    Ok(p)
}

/// The sweeper's pass over `sessions` sessions of the real maps, nothing
/// to remove and then everything.
fn sweep_cost(sessions: u32) -> Result<SweepCost> {
    let max_flows = sessions.next_power_of_two();
    let idle = Duration::from_secs(100_000);
    let mut cost = SweepCost {
        sessions,
        ..Default::default()
    };
    for expire_all in [false, true] {
        let mut ebpf = sweep_scale::load(max_flows)?;
        let now = nat_loader::monotonic_ns();
        sweep_scale::fill(&mut ebpf, sessions, now, idle, |_| expire_all)?;
        let mut maps = nat_loader::dataplane::CtMaps::take(&mut ebpf)?;
        let (s, cpu) = sweep_scale::sweep(&mut maps, max_flows, now)?;
        let want = if expire_all { sessions as usize } else { 0 };
        if s.expired != want {
            bail!("the sweep removed {} sessions, not {want}", s.expired);
        }
        if expire_all {
            cost.remove_all = cpu;
        } else {
            cost.keep_all = cpu;
        }
    }
    Ok(cost)
}

//! The benchmark behind `cargo xtask bench` (binary `nat-bench`).
//!
//! Five copies of one topology, generator → gateway → sink (three network
//! namespaces, two veth pairs), differ only in what the gateway runs:
//! kernel forwarding, iptables MASQUERADE, nftables masquerade, our
//! gateway (the real `nat-loader`), and a forward-only XDP program (the
//! ceiling). The gateway's NAPI runs in threads pinned to one CPU, the
//! generator, the sink and their NAPI threads on the other. Every point is
//! measured `repeats` times, the variants taking turns each round so that a
//! burst of load from elsewhere on the machine hits all of them alike.
//!
//! Results go to `results.md`, `results.json` and `chart.png` in the
//! output directory. Everything the run creates (namespaces, processes,
//! programs, the bpf_stats sysctl, temporary files) is removed again, also
//! on failure.

mod generator;
mod measure;
mod policy_cost;
mod report;
pub mod scale;
pub mod stateful;
mod topo;

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::{Context, Result};

pub use measure::percentile;
pub use report::{Report, Stat};

use measure::{BLAST_FLOWS, Cpus};
use topo::Topo;

/// What the gateway in the middle runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    Kernel,
    Iptables,
    Nftables,
    Gateway,
    XdpFwd,
}

impl Variant {
    pub const ALL: [Variant; 5] = [
        Variant::Kernel,
        Variant::Iptables,
        Variant::Nftables,
        Variant::Gateway,
        Variant::XdpFwd,
    ];

    pub fn key(self) -> &'static str {
        match self {
            Variant::Kernel => "kernel",
            Variant::Iptables => "iptables",
            Variant::Nftables => "nftables",
            Variant::Gateway => "gateway",
            Variant::XdpFwd => "xdp_fwd",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Variant::Kernel => "kernel forwarding, no NAT",
            Variant::Iptables => "iptables MASQUERADE",
            Variant::Nftables => "nftables masquerade",
            Variant::Gateway => "nat-gateway (ours)",
            Variant::XdpFwd => "XDP forward-only, no NAT",
        }
    }

    /// The XDP program it runs on the gateway's inside interface, if any.
    pub fn xdp_program(self) -> Option<&'static str> {
        match self {
            Variant::Gateway => Some(nat_common::PROG_XDP_INT),
            Variant::XdpFwd => Some(nat_common::PROG_XDP_FWD_ONLY),
            _ => None,
        }
    }

    /// First letter of its interface names.
    fn letter(self) -> char {
        match self {
            Variant::Kernel => 'k',
            Variant::Iptables => 't',
            Variant::Nftables => 'n',
            Variant::Gateway => 'g',
            Variant::XdpFwd => 'x',
        }
    }
}

/// How long and how often each point is measured.
#[derive(Clone, Debug)]
pub struct Plan {
    pub quick: bool,
    pub repeats: usize,
    pub pps_warmup_secs: f64,
    pub pps_secs: f64,
    pub tcp_secs: u32,
    pub conn_secs: f64,
    pub conn_workers: usize,
    pub rtts: usize,
    pub ct_small: u32,
    pub ct_large: u32,
    pub ct_rounds: usize,
    pub ct_hot_runs: u32,
    pub ct_spread_samples: u32,
    /// RFC 9693 (stateful.rs): table size of the establishment and
    /// forwarding phases, of the capacity phase; active flows of the
    /// forwarding phase; length of an establishment trial and steps of its
    /// search; sessions of the sweep.
    pub stateful_table: u32,
    pub capacity_table: u32,
    pub scale_flows: Vec<u64>,
    pub establish_secs: f64,
    pub establish_steps: usize,
    pub sweep_sessions: u32,
}

impl Plan {
    /// The full benchmark: about 6 minutes on 2 cores.
    pub fn full() -> Plan {
        Plan {
            quick: false,
            repeats: 5,
            pps_warmup_secs: 1.0,
            pps_secs: 3.0,
            tcp_secs: 3,
            conn_secs: 3.0,
            conn_workers: 4,
            rtts: 2000,
            ct_small: 1_000,
            ct_large: 1 << 20,
            ct_rounds: 5,
            ct_hot_runs: 200,
            ct_spread_samples: 2_000,
            stateful_table: 1 << 23,
            capacity_table: 1 << 20,
            scale_flows: vec![1_000, 100_000, 1_000_000, 4_000_000],
            establish_secs: 0.5,
            establish_steps: 7,
            sweep_sessions: 1_000_000,
        }
    }

    /// A short run that exercises every path (the test suite runs it).
    pub fn quick() -> Plan {
        Plan {
            quick: true,
            repeats: 2,
            pps_warmup_secs: 0.5,
            pps_secs: 1.0,
            tcp_secs: 1,
            conn_secs: 1.0,
            conn_workers: 4,
            rtts: 300,
            ct_small: 1_000,
            ct_large: 1 << 16,
            ct_rounds: 2,
            ct_hot_runs: 30,
            ct_spread_samples: 300,
            stateful_table: 1 << 20,
            capacity_table: 1 << 14,
            scale_flows: vec![1_000, 20_000],
            establish_secs: 0.1,
            establish_steps: 3,
            sweep_sessions: 50_000,
        }
    }
}

/// The default output directory: `target/bench` of the workspace.
pub fn default_out_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench")
}

/// Removes a directory of temporary files when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Turns SIGINT and SIGTERM into a clean stop: the run notices between
/// steps and unwinds, so every topology, process and sysctl is cleaned up.
/// Call it first thing in `main` (threads started later inherit the mask).
pub fn handle_signals() -> Result<()> {
    // SAFETY: plain libc signal-set calls on a local set; the waiting
    // thread owns a copy.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            anyhow::bail!("blocking SIGINT and SIGTERM failed");
        }
        std::thread::spawn(move || {
            let mut sig = 0;
            if libc::sigwait(&set, &mut sig) == 0 {
                INTERRUPTED.store(true, Ordering::Relaxed);
                progress("interrupted: cleaning up");
            }
        });
    }
    Ok(())
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        anyhow::bail!("interrupted");
    }
    Ok(())
}

/// Sleeps `secs`, unless the run is interrupted.
fn nap(secs: f64) -> Result<()> {
    let end = std::time::Instant::now() + std::time::Duration::from_secs_f64(secs);
    loop {
        check_interrupted()?;
        let left = end.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(std::time::Duration::from_millis(100)));
    }
}

fn progress(msg: &str) {
    eprintln!("nat-bench: {msg}");
}

/// Fails with one clear line if a tool the benchmark runs is missing.
fn check_tools() -> Result<()> {
    let missing: Vec<&str> = ["iptables", "nft", "iperf3", "bpftool", "taskset"]
        .into_iter()
        .filter(|tool| {
            !std::process::Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    if !missing.is_empty() {
        anyhow::bail!(
            "missing {}: run `cargo xtask bootstrap` (or `cargo xtask bench`, which runs it)",
            missing.join(", ")
        );
    }
    Ok(())
}

/// Runs the benchmark and writes results.md, results.json and chart.png
/// into `out`.
pub fn run(plan: &Plan, out: &Path) -> Result<Report> {
    check_tools()?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let work = TempDir(std::env::temp_dir().join(format!("nat-bench-{}", std::process::id())));
    std::fs::create_dir_all(&work.0)?;
    let cpus = Cpus::detect();
    let started = std::time::Instant::now();

    progress("building the five topologies");
    let topos: Vec<Topo> = Variant::ALL
        .iter()
        .map(|&v| Topo::new(v, &work.0))
        .collect::<Result<_>>()?;
    let mut rep = Report::new(plan, cpus, &topos);
    if let Err(e) = measure_all(plan, cpus, &topos, &mut rep) {
        if let Some(secs) = std::env::var("NAT_BENCH_HOLD_ON_ERROR")
            .ok()
            .and_then(|s| s.parse().ok())
        {
            // Debugging aid: look at the failed topologies by hand.
            progress(&format!("{e:#}; holding the topologies for {secs} s"));
            std::thread::sleep(std::time::Duration::from_secs(secs));
        }
        return Err(e);
    }
    drop(topos);
    rep.stateful = Some(stateful::run(plan, cpus, &work.0)?);

    rep.duration_secs = started.elapsed().as_secs_f64();
    rep.write(out)?;
    Ok(rep)
}

fn measure_all(plan: &Plan, cpus: Cpus, topos: &[Topo], rep: &mut Report) -> Result<()> {
    for r in 0..plan.repeats {
        progress(&format!("64-byte UDP, round {}/{}", r + 1, plan.repeats));
        for (i, t) in topos.iter().enumerate() {
            check_interrupted()?;
            let s = measure::pps(t, cpus, BLAST_FLOWS, plan.pps_warmup_secs, plan.pps_secs)?;
            rep.variants[i].pps.push(s);
        }
    }

    // Where the time of the XDP variants goes: the programs' own run time
    // (kernel.bpf_stats_enabled, on only for these extra windows).
    progress("program run times (bpf_stats)");
    for (i, t) in topos.iter().enumerate() {
        if t.variant.xdp_program().is_none() {
            continue;
        }
        check_interrupted()?;
        let (s, progs) =
            measure::program_times(t, cpus, BLAST_FLOWS, plan.pps_warmup_secs, plan.pps_secs)?;
        let d = &mut rep.variants[i];
        d.xdp_prog_window_cpu_ns = Some(s.cpu_ns_per_pkt);
        d.progs = progs;
    }
    // What moves that figure: flows (cache misses) and whether the
    // gateway's NAPI shares a CPU with the generator and the sink.
    if let Some(t) = topos.iter().find(|t| t.variant == Variant::Gateway) {
        progress("nat_xdp_int run time by placement and flows (bpf_stats)");
        for flows in [256, BLAST_FLOWS] {
            for shared_cpu in [false, true] {
                check_interrupted()?;
                let c = if shared_cpu {
                    Cpus {
                        gw: cpus.other,
                        other: cpus.other,
                    }
                } else {
                    cpus
                };
                let (s, progs) =
                    measure::program_times(t, c, flows, plan.pps_warmup_secs, plan.pps_secs)?;
                let prog_ns = progs
                    .iter()
                    .find(|p| p.name == nat_common::PROG_XDP_INT)
                    .map_or(0.0, |p| p.ns_per_run);
                rep.placement.push(report::Placement {
                    flows,
                    shared_cpu,
                    prog_ns,
                    cpu_ns_per_pkt: s.cpu_ns_per_pkt,
                    pps: s.pps,
                });
            }
        }
    }

    let servers: Vec<_> = topos
        .iter()
        .map(|t| measure::iperf_server(t, cpus))
        .collect::<Result<_>>()?;
    for r in 0..plan.repeats {
        progress(&format!("TCP throughput, round {}/{}", r + 1, plan.repeats));
        for (i, t) in topos.iter().enumerate() {
            check_interrupted()?;
            let g = measure::tcp_gbps(t, cpus, plan.tcp_secs)?;
            rep.variants[i].tcp_gbps.push(g);
        }
    }
    drop(servers);

    for r in 0..plan.repeats {
        progress(&format!(
            "new connections, round {}/{}",
            r + 1,
            plan.repeats
        ));
        for (i, t) in topos.iter().enumerate() {
            check_interrupted()?;
            let c = measure::conn_rate(t, cpus, plan.conn_workers, plan.conn_secs)?;
            rep.variants[i].conn_s.push(c);
        }
    }

    for r in 0..plan.repeats {
        progress(&format!("latency, round {}/{}", r + 1, plan.repeats));
        for (i, t) in topos.iter().enumerate() {
            check_interrupted()?;
            let (p50, p99) = measure::latency(t, cpus, plan.rtts)?;
            rep.variants[i].p50_us.push(p50);
            rep.variants[i].p99_us.push(p99);
        }
    }

    progress(&format!(
        "conntrack scale: {} and {} flows",
        plan.ct_small, plan.ct_large
    ));
    // Any gateway namespace will do; the kernel variant's has nothing
    // attached that could interfere.
    let scale = scale::run(&topos[0], plan)?;
    rep.scale = Some(scale);

    progress("egress policy cost: 0, 100 and 10000 rules");
    rep.policy = Some(policy_cost::run(&topos[0], plan)?);
    Ok(())
}

/// RFC 9693's measurements alone (`nat-bench --stateful`): their tables.
pub fn stateful_only(plan: &Plan) -> Result<String> {
    check_tools()?;
    let work = TempDir(std::env::temp_dir().join(format!("nat-bench-{}", std::process::id())));
    std::fs::create_dir_all(&work.0)?;
    let r = stateful::run(plan, Cpus::detect(), &work.0)?;
    Ok(report::stateful_tables(&r))
}

/// The egress policy's cost alone (`nat-bench --policy-cost`): one
/// topology, the measurement, its table. Needs no traffic tools.
pub fn policy_cost_only(plan: &Plan) -> Result<String> {
    let work = TempDir(std::env::temp_dir().join(format!("nat-bench-{}", std::process::id())));
    std::fs::create_dir_all(&work.0)?;
    let topo = Topo::new(Variant::Kernel, &work.0)?;
    let cost = policy_cost::run(&topo, plan)?;
    Ok(report::policy_table(&cost))
}

//! Medians, spreads, goals, and the three outputs: results.md (ratios to
//! iptables), results.json, chart.png.

use std::{fmt::Write as _, path::Path, process::Command};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::{
    Plan, Variant,
    measure::{Cpus, PpsSample, ProgTime},
    policy_cost::{self, PolicyCost},
    scale::ScaleResult,
    stateful::{StatefulResult, SweepCost},
    topo::Topo,
};

/// A spread (max − min) / median above this marks a point as unreliable.
pub const WIDE_SPREAD: f64 = 0.20;

/// Median and range of the repeats of one point.
#[derive(Clone, Debug, Default)]
pub struct Stat {
    pub samples: Vec<f64>,
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stat {
    pub fn of(samples: &[f64]) -> Stat {
        let mut s = samples.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        let median = match s.len() {
            0 => 0.0,
            n if n % 2 == 1 => s[n / 2],
            n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
        };
        Stat {
            median,
            min: s.first().copied().unwrap_or(0.0),
            max: s.last().copied().unwrap_or(0.0),
            samples: samples.to_vec(),
        }
    }

    /// (max − min) / median.
    pub fn spread(&self) -> f64 {
        if self.median == 0.0 {
            0.0
        } else {
            (self.max - self.min) / self.median
        }
    }

    pub fn wide(&self) -> bool {
        self.spread() > WIDE_SPREAD
    }

    fn json(&self) -> Value {
        json!({
            "median": self.median,
            "min": self.min,
            "max": self.max,
            "spread": self.spread(),
            "spread_too_wide": self.wide(),
            "samples": self.samples,
        })
    }

    /// `median (min–max)` with `digits` decimals, scaled by `scale`, and a
    /// warning sign when the spread is too wide.
    fn cell(&self, scale: f64, digits: usize) -> String {
        format!(
            "{:.d$} ({:.d$}–{:.d$}){}",
            self.median * scale,
            self.min * scale,
            self.max * scale,
            if self.wide() { " ⚠" } else { "" },
            d = digits
        )
    }
}

/// Everything measured for one variant.
#[derive(Clone, Debug)]
pub struct VariantData {
    pub variant: Variant,
    pub pps: Vec<PpsSample>,
    pub tcp_gbps: Vec<f64>,
    pub conn_s: Vec<f64>,
    pub p50_us: Vec<f64>,
    pub p99_us: Vec<f64>,
    /// Gateway CPU ns per packet in the bpf_stats window.
    pub xdp_prog_window_cpu_ns: Option<f64>,
    /// Every program that ran in that window (bpf_stats).
    pub progs: Vec<ProgTime>,
}

/// nat_xdp_int's run time with the gateway's NAPI threads on a CPU of
/// their own or on the generator's, over few or many flows: what moves the
/// figure bpf_stats reports.
#[derive(Clone, Debug)]
pub struct Placement {
    pub flows: u64,
    pub shared_cpu: bool,
    pub prog_ns: f64,
    pub cpu_ns_per_pkt: f64,
    pub pps: f64,
}

impl VariantData {
    /// Mean run time of the XDP program on the gateway's inside interface
    /// in the bpf_stats window, ns per packet.
    pub fn xdp_prog_ns(&self) -> Option<f64> {
        let name = self.variant.xdp_program()?;
        self.progs
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.ns_per_run)
    }

    pub fn pps(&self) -> Stat {
        self.of_pps(|s| s.pps)
    }
    pub fn offered(&self) -> Stat {
        self.of_pps(|s| s.offered_pps)
    }
    pub fn cpu(&self) -> Stat {
        self.of_pps(|s| s.cpu_ns_per_pkt)
    }
    pub fn busy(&self) -> Stat {
        self.of_pps(|s| s.gw_busy)
    }
    pub fn cpu_stat(&self) -> Stat {
        self.of_pps(|s| s.cpu_stat_ns_per_pkt)
    }
    /// One field of the 64-byte UDP windows, over the rounds.
    fn of_pps(&self, field: impl Fn(&PpsSample) -> f64) -> Stat {
        Stat::of(&self.pps.iter().map(field).collect::<Vec<_>>())
    }
    pub fn tcp(&self) -> Stat {
        Stat::of(&self.tcp_gbps)
    }
    pub fn conn(&self) -> Stat {
        Stat::of(&self.conn_s)
    }
    pub fn p50(&self) -> Stat {
        Stat::of(&self.p50_us)
    }
    pub fn p99(&self) -> Stat {
        Stat::of(&self.p99_us)
    }
}

/// A goal of issue 6, judged.
#[derive(Clone, Debug)]
pub struct Goal {
    pub name: &'static str,
    pub target: String,
    pub value: String,
    pub met: bool,
}

pub struct Report {
    pub plan: Plan,
    pub cpus: Cpus,
    pub machine: Machine,
    pub interfaces: Vec<(Variant, String, String)>,
    pub variants: Vec<VariantData>,
    pub scale: Option<ScaleResult>,
    pub placement: Vec<Placement>,
    pub stateful: Option<StatefulResult>,
    /// The egress policy's cost (`policy_cost`).
    pub policy: Option<PolicyCost>,
    pub duration_secs: f64,
}

#[derive(Clone, Debug)]
pub struct Machine {
    pub cpu_model: String,
    pub nproc: usize,
    pub kernel: String,
    pub iptables: String,
    pub nft: String,
    pub date: String,
}

fn cmd_line(argv: &[&str]) -> String {
    Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

impl Machine {
    fn detect() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Machine {
            cpu_model: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
                .unwrap_or_else(|| "unknown".into()),
            nproc: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            kernel: cmd_line(&["uname", "-r"]),
            iptables: cmd_line(&["iptables", "--version"]),
            nft: cmd_line(&["nft", "--version"]),
            date: cmd_line(&["date", "-u", "+%Y-%m-%d %H:%M UTC"]),
        }
    }
}

impl Report {
    pub fn new(plan: &Plan, cpus: Cpus, topos: &[Topo]) -> Report {
        Report {
            plan: plan.clone(),
            cpus,
            machine: Machine::detect(),
            interfaces: topos
                .iter()
                .map(|t| (t.variant, t.gw_int.name.clone(), t.gw_ext.name.clone()))
                .collect(),
            variants: topos
                .iter()
                .map(|t| VariantData {
                    variant: t.variant,
                    pps: Vec::new(),
                    tcp_gbps: Vec::new(),
                    conn_s: Vec::new(),
                    p50_us: Vec::new(),
                    p99_us: Vec::new(),
                    xdp_prog_window_cpu_ns: None,
                    progs: Vec::new(),
                })
                .collect(),
            placement: Vec::new(),
            stateful: None,
            scale: None,
            policy: None,
            duration_secs: 0.0,
        }
    }

    pub fn variant(&self, v: Variant) -> Option<&VariantData> {
        self.variants.iter().find(|d| d.variant == v)
    }

    pub fn goals(&self) -> Vec<Goal> {
        let mut goals = Vec::new();
        let (Some(gw), Some(ipt), Some(xdp)) = (
            self.variant(Variant::Gateway),
            self.variant(Variant::Iptables),
            self.variant(Variant::XdpFwd),
        ) else {
            return goals;
        };
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        let mut goal = |name, target: &str, value, met| {
            goals.push(Goal {
                name,
                target: target.into(),
                value,
                met,
            })
        };
        let r = ratio(gw.pps().median, ipt.pps().median);
        let name = "64-byte pps vs iptables MASQUERADE";
        goal(name, "≥ 3×", format!("{r:.2}×"), r >= 3.0);
        let r = ratio(gw.pps().median, xdp.pps().median);
        let name = "64-byte pps vs forward-only XDP";
        goal(name, "≥ 80 %", format!("{:.0} %", r * 100.0), r >= 0.8);
        let r = ratio(gw.conn().median, ipt.conn().median);
        let name = "new connections/s vs iptables MASQUERADE";
        goal(name, "≥ 2×", format!("{r:.2}×"), r >= 2.0);
        if let Some(s) = &self.scale {
            let b = s.bytes_per_flow();
            let value = format!("{b:.0} B (at {} flows)", s.large);
            goal("map memory per tracked flow", "≤ 128 B", value, b <= 128.0);
            let small = Stat::of(&s.spread_ns[0]).median;
            let large = Stat::of(&s.spread_ns[1]).median;
            let d = ratio(large, small) - 1.0;
            let name = "lookup cost, large vs 1 k flows (many flows, one run each)";
            let value = format!(
                "{:+.1} % ({small:.0} → {large:.0} ns at {} flows)",
                d * 100.0,
                s.large
            );
            goal(name, "within 10 %", value, d.abs() <= 0.10);
        }
        if let Some(st) = &self.stateful {
            let v = |k| st.variants.iter().find(|v| v.variant == k);
            if let (Some(o), Some(i)) = (v(Variant::Gateway), v(Variant::Iptables)) {
                let r = ratio(
                    i.establish.cpu_ns_per_session,
                    o.establish.cpu_ns_per_session,
                );
                let value = format!(
                    "{r:.2}× ({:.0} vs {:.0} ns)",
                    o.establish.cpu_ns_per_session, i.establish.cpu_ns_per_session
                );
                let name = "CPU per new session vs iptables MASQUERADE (RFC 9693)";
                goal(name, "≥ 3× less", value, r >= 3.0);
                // The point nearest 1 M active flows (quick mode stops
                // short of it).
                let near = |s: &[super::stateful::ScalePoint]| {
                    s.iter()
                        .min_by_key(|p| p.flows.abs_diff(1_000_000))
                        .map(|p| (p.flows, Stat::of(&p.cpu_ns).median))
                };
                if let (Some((flows, oc)), Some((_, ic))) = (near(&o.scale), near(&i.scale)) {
                    let r = ratio(ic, oc);
                    let value = format!("{r:.2}× ({oc:.0} vs {ic:.0} ns at {flows} flows)");
                    let name = "CPU per packet at 1 M active flows vs iptables";
                    goal(name, "≥ 3× less", value, r >= 3.0);
                }
            }
            if let Some(sw) = &st.sweep {
                let worst = sw.keep_all.max(sw.remove_all);
                let ms = SweepCost::ms_per_million(worst, sw.sessions);
                let value = format!(
                    "{:.0} ms all removed, {:.0} ms none (per million, {} swept)",
                    SweepCost::ms_per_million(sw.remove_all, sw.sessions),
                    SweepCost::ms_per_million(sw.keep_all, sw.sessions),
                    sw.sessions
                );
                goal("sweep of 1 M sessions, CPU", "≤ 200 ms", value, ms <= 200.0);
            }
        }
        if let Some(p) = &self.policy {
            let last = policy_cost::RULES.len() - 1;
            let est = [&p.established_ns[0], &p.established_ns[last]].map(|v| Stat::of(v));
            let d = ratio(est[1].median, est[0].median) - 1.0;
            let value = format!(
                "{:+.1} % ({:.0} → {:.0} ns)",
                d * 100.0,
                est[0].median,
                est[1].median
            );
            // Within noise: the spread of the measurement itself.
            let noise = est[0].spread().max(est[1].spread()).max(0.05);
            let name = "established-flow cost, 10000 rules vs none";
            goal(name, "unchanged (within noise)", value, d.abs() <= noise);
            let new = [&p.new_flow_ns[0], &p.new_flow_ns[last]].map(|v| Stat::of(v));
            let r = ratio(new[1].median, new[0].median);
            let value = format!("{r:.2}× ({:.0} → {:.0} ns)", new[0].median, new[1].median);
            let name = "new-session cost, 10000 rules vs none";
            goal(name, "≤ 2×", value, r <= 2.0);
        }
        goals
    }

    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let m = &self.machine;
        let ipt = self.variant(Variant::Iptables);
        let x = |v: f64, base: Option<f64>| match base {
            Some(b) if b > 0.0 => format!("{:.2}×", v / b),
            _ => "–".into(),
        };
        let _ = writeln!(
            md,
            "Benchmark{} — {} — {} CPU(s), {}, Linux {}; `cargo xtask bench{}`\n",
            if self.plan.quick { " (quick mode)" } else { "" },
            m.date,
            m.nproc,
            m.cpu_model,
            m.kernel,
            if self.plan.quick { " --quick" } else { "" },
        );
        let _ = writeln!(
            md,
            "| variant | 64 B UDP Mpps | × iptables | offered Mpps | gateway CPU ns/pkt (= ms per M pkts) | gateway CPU busy % | TCP Gbit/s | × iptables | new conn/s | × iptables | RTT p50 µs | RTT p99 µs |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|");
        for d in &self.variants {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                d.variant.label(),
                d.pps().cell(1e-6, 3),
                x(d.pps().median, ipt.map(|i| i.pps().median)),
                d.offered().cell(1e-6, 3),
                d.cpu().cell(1.0, 0),
                d.busy().cell(100.0, 0),
                d.tcp().cell(1.0, 2),
                x(d.tcp().median, ipt.map(|i| i.tcp().median)),
                d.conn().cell(1.0, 0),
                x(d.conn().median, ipt.map(|i| i.conn().median)),
                d.p50().cell(1.0, 0),
                d.p99().cell(1.0, 0),
            );
        }
        let _ = writeln!(
            md,
            "\nMedian (min–max) of {} repeats; ⚠ marks a spread (max − min) / median above {:.0} %: that point is not reliable.\n",
            self.plan.repeats,
            WIDE_SPREAD * 100.0
        );
        let wide: Vec<String> = self
            .variants
            .iter()
            .flat_map(|d| {
                [
                    ("pps", d.pps()),
                    ("TCP", d.tcp()),
                    ("conn/s", d.conn()),
                    ("p50", d.p50()),
                    ("p99", d.p99()),
                ]
                .into_iter()
                .filter(|(_, s)| s.wide())
                .map(move |(n, s)| format!("{} {n} ({:.0} %)", d.variant.key(), s.spread() * 100.0))
            })
            .collect();
        if !wide.is_empty() {
            let _ = writeln!(
                md,
                "**Spread too wide:** {} — re-run on a quiet machine.\n",
                wide.join(", ")
            );
        }
        if let Some(s) = &self.scale {
            let hot = [Stat::of(&s.hot_ns[0]), Stat::of(&s.hot_ns[1])];
            let spread = [Stat::of(&s.spread_ns[0]), Stat::of(&s.spread_ns[1])];
            let _ = writeln!(
                md,
                "Conntrack scale (the real programs, `max_flows` = {}): sessions (CT_FWD) {} + every other map of the object (bindings, filter, pool, fragments, counters) {} bytes of map memory (kernel memlock) = **{:.0} bytes per flow**.\n",
                s.max_flows,
                s.fwd_memlock,
                s.rev_memlock,
                s.bytes_per_flow()
            );
            let _ = writeln!(
                md,
                "| nat_xdp_int on a tracked flow (BPF_PROG_TEST_RUN, one run per call), ns/packet | {} flows | {} flows | change |",
                s.small, s.large
            );
            let _ = writeln!(md, "|---|---|---|---|");
            for (name, st) in [
                (
                    "many flows across the table, one run each (cold-ish)",
                    &spread,
                ),
                ("32 flows again and again (hot cache)", &hot),
            ] {
                let _ = writeln!(
                    md,
                    "| {name} | {} | {} | {:+.1} % |",
                    st[0].cell(1.0, 0),
                    st[1].cell(1.0, 0),
                    (st[1].median / st[0].median.max(1e-9) - 1.0) * 100.0
                );
            }
            md.push('\n');
        }
        if let Some(p) = &self.policy {
            md.push_str(&policy_table(p));
            md.push('\n');
        }
        let _ = writeln!(md, "| goal | target | measured | |");
        let _ = writeln!(md, "|---|---|---|---|");
        for g in self.goals() {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} |",
                g.name,
                g.target,
                g.value,
                if g.met { "met" } else { "**missed**" }
            );
        }
        md.push('\n');
        for d in &self.variants {
            if let (Some(p), Some(c)) = (d.xdp_prog_ns(), d.xdp_prog_window_cpu_ns) {
                let _ = writeln!(
                    md,
                    "- {}: the XDP program itself runs {p:.0} ns per packet of the {c:.0} ns of gateway CPU per forwarded packet (bpf_stats window); the rest is the veth driver, redirect and NAPI.",
                    d.variant.label()
                );
            }
        }
        let _ = writeln!(
            md,
            "- Offered load: bench_gen (BPF_PROG_RUN live frames) on CPU {other}, 60-byte frames (64 on the wire) over {flows} flows with complete checksums, as fast as it can; the gateway's NAPI threads (threaded NAPI on its veths) pinned to CPU {gw}; CPU time is theirs (/proc/<pid>/schedstat) per packet delivered to the sink.\n\
             - TCP (iperf3, 1 stream) and short connections (4 workers, 1-byte request and response, RST close) run with TX checksum offload off on the generator and the sink, so the XDP variants take their fast path for TCP too; latency: UDP ping-pong, one at a time, {rtts} round trips per repeat.\n\
             - iptables is `{ipt}`; nftables `{nft}`. The map memory is the kernel's memlock accounting of every map of the gateway's object (sessions, bindings, address filter, pool, fragments, counters).",
            other = self.cpus.other,
            gw = self.cpus.gw,
            rtts = self.plan.rtts,
            ipt = m.iptables,
            nft = m.nft,
            flows = super::measure::BLAST_FLOWS,
        );
        md.push('\n');
        md.push_str(&self.programs_markdown());
        if let Some(st) = &self.stateful {
            md.push('\n');
            md.push_str(&stateful_tables(st));
        }
        md
    }

    /// Each program's bpf_stats in the 64-byte window, and nat_xdp_int's
    /// by placement and flows.
    fn programs_markdown(&self) -> String {
        let mut md = String::new();
        for d in self.variants.iter().filter(|d| !d.progs.is_empty()) {
            let _ = writeln!(
                md,
                "{}: every program that ran in the bpf_stats window (64-byte blast over {} flows), ns per run (runs per forwarded packet): {}\n",
                d.variant.label(),
                super::measure::BLAST_FLOWS,
                progs_inline(&d.progs)
            );
        }
        if !self.placement.is_empty() {
            let _ = writeln!(
                md,
                "| nat_xdp_int, bpf_stats ns per run | flows | gateway NAPI CPU | ns per run | gateway CPU ns/pkt | Mpps |\n|---|---|---|---|---|---|"
            );
            for p in &self.placement {
                let _ = writeln!(
                    md,
                    "| | {} | {} | {:.0} | {:.0} | {:.3} |",
                    p.flows,
                    if p.shared_cpu {
                        "shared with the generator and sink"
                    } else {
                        "its own"
                    },
                    p.prog_ns,
                    p.cpu_ns_per_pkt,
                    p.pps * 1e-6
                );
            }
        }
        md
    }

    pub fn json(&self) -> Value {
        let m = &self.machine;
        json!({
            "quick": self.plan.quick,
            "repeats": self.plan.repeats,
            "duration_secs": self.duration_secs,
            "machine": {
                "cpu_model": m.cpu_model,
                "nproc": m.nproc,
                "kernel": m.kernel,
                "iptables": m.iptables,
                "nft": m.nft,
                "date": m.date,
                "gateway_cpu": self.cpus.gw,
                "generator_cpu": self.cpus.other,
            },
            "variants": self.variants.iter().map(|d| json!({
                "key": d.variant.key(),
                "label": d.variant.label(),
                "pps": d.pps().json(),
                "offered_pps": d.offered().json(),
                "cpu_ns_per_pkt": d.cpu().json(),
                "cpu_stat_ns_per_pkt": d.cpu_stat().json(),
                "gateway_cpu_busy": d.busy().json(),
                "tcp_gbps": d.tcp().json(),
                "conn_per_s": d.conn().json(),
                "rtt_p50_us": d.p50().json(),
                "rtt_p99_us": d.p99().json(),
                "xdp_prog_ns_per_pkt": d.xdp_prog_ns(),
                "xdp_prog_window_cpu_ns_per_pkt": d.xdp_prog_window_cpu_ns,
                "programs": d.progs.iter().map(prog_json).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "placement": self.placement.iter().map(|p| json!({
                "flows": p.flows,
                "shared_cpu": p.shared_cpu,
                "nat_xdp_int_ns_per_run": p.prog_ns,
                "cpu_ns_per_pkt": p.cpu_ns_per_pkt,
                "pps": p.pps,
            })).collect::<Vec<_>>(),
            "rfc9693": self.stateful.as_ref().map(stateful_json),
            "conntrack_scale": self.scale.as_ref().map(|s| json!({
                "max_flows": s.max_flows,
                "small_flows": s.small,
                "large_flows": s.large,
                "ct_fwd_memlock_bytes": s.fwd_memlock,
                "bindings_memlock_bytes": s.rev_memlock,
                "bytes_per_flow": s.bytes_per_flow(),
                "spread_ns": [Stat::of(&s.spread_ns[0]).json(), Stat::of(&s.spread_ns[1]).json()],
                "hot_ns": [Stat::of(&s.hot_ns[0]).json(), Stat::of(&s.hot_ns[1]).json()],
            })),
            "egress_policy": self.policy.as_ref().map(|p| json!({
                "rules": policy_cost::RULES,
                "new_flow_ns": p.new_flow_ns.iter().map(|v| Stat::of(v).json()).collect::<Vec<_>>(),
                "established_ns": p.established_ns.iter().map(|v| Stat::of(v).json()).collect::<Vec<_>>(),
            })),
            "goals": self.goals().iter().map(|g| json!({
                "name": g.name,
                "target": g.target,
                "measured": g.value,
                "met": g.met,
            })).collect::<Vec<_>>(),
        })
    }

    /// Writes results.md, results.json, chart.png and (with RFC 9693's
    /// measurements) chart-scale.png into `out`.
    pub fn write(&self, out: &Path) -> Result<()> {
        std::fs::write(out.join("results.md"), self.markdown())?;
        let json_path = out.join("results.json");
        std::fs::write(&json_path, serde_json::to_string_pretty(&self.json())?)?;
        chart(CHART_PY, &json_path, &out.join("chart.png"))?;
        if self.stateful.is_some() {
            chart(SCALE_PY, &json_path, &out.join("chart-scale.png"))?;
        }
        Ok(())
    }
}

/// Draws chart.png from results.json with matplotlib (Debian's
/// python3-matplotlib, installed by scripts/bootstrap.sh).
const CHART_PY: &str = r##"
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
r = json.load(open(sys.argv[1]))
vs = r["variants"]
import textwrap
labels = [textwrap.fill(v["label"].replace(",", ""), 13) for v in vs]
panels = [("pps", 1e-6, "64-byte UDP forwarded (Mpps)"),
          ("cpu_ns_per_pkt", 1, "gateway CPU per packet (ns = ms per M packets)"),
          ("tcp_gbps", 1, "TCP throughput (Gbit/s)"),
          ("conn_per_s", 1, "new TCP connections / s"),
          ("rtt_p50_us", 1, "RTT p50 under light load (µs)"),
          ("rtt_p99_us", 1, "RTT p99 under light load (µs)")]
fig, axes = plt.subplots(2, 3, figsize=(17, 8))
colors = ["#888888", "#d62728", "#ff7f0e", "#2ca02c", "#1f77b4"]
for ax, (key, scale, title) in zip(axes.flat, panels):
    med = [v[key]["median"] * scale for v in vs]
    lo = [(v[key]["median"] - v[key]["min"]) * scale for v in vs]
    hi = [(v[key]["max"] - v[key]["median"]) * scale for v in vs]
    ax.bar(range(len(vs)), med, yerr=[lo, hi], capsize=4, color=colors[:len(vs)])
    ax.set_xticks(range(len(vs)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_title(title, fontsize=10)
    for i, m in enumerate(med):
        ax.annotate(f"{m:.3g}", (i, m), ha="center", va="bottom", fontsize=7)
m = r["machine"]
fig.suptitle(f"nat-gateway benchmark{' (quick)' if r['quick'] else ''}: {m['nproc']} CPUs, {m['cpu_model']}, Linux {m['kernel']}; median of {r['repeats']}, bars min-max", fontsize=10)
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=100)
"##;

/// Draws chart-scale.png: RFC 9693's forwarding at scale, CPU per packet
/// and forwarded rate against active flows.
const SCALE_PY: &str = r##"
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
r = json.load(open(sys.argv[1]))
vs = r["rfc9693"]["variants"]
fig, axes = plt.subplots(1, 2, figsize=(13, 5))
colors = {"iptables": "#d62728", "nftables": "#ff7f0e", "gateway": "#2ca02c"}
for ax, (key, scale, title) in zip(axes, [("cpu_ns_per_pkt", 1, "gateway CPU per packet (ns)"), ("pps", 1e-6, "64-byte UDP forwarded (Mpps)")]):
    for v in vs:
        pts = v["scale"]
        x = [p["flows"] for p in pts]
        med = [p[key]["median"] * scale for p in pts]
        lo = [(p[key]["median"] - p[key]["min"]) * scale for p in pts]
        hi = [(p[key]["max"] - p[key]["median"]) * scale for p in pts]
        ax.errorbar(x, med, yerr=[lo, hi], marker="o", capsize=4, label=v["label"], color=colors.get(v["key"]))
        for xi, m in zip(x, med):
            ax.annotate(f"{m:.3g}", (xi, m), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("active flows")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
m = r["machine"]
fig.suptitle(f"RFC 9693 forwarding at scale{' (quick)' if r['quick'] else ''}: {m['nproc']} CPUs, Linux {m['kernel']}; median, bars min-max", fontsize=10)
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=100)
"##;

fn chart(script: &str, json: &Path, png: &Path) -> Result<()> {
    // Debian's interpreter: a python3 earlier on PATH (pyenv, venv) may lack
    // the Debian matplotlib.
    let python = if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    };
    let out = Command::new(python)
        .arg("-c")
        .arg(script)
        .arg(json)
        .arg(png)
        .output()
        .with_context(|| format!("running {python} for the chart"))?;
    if !out.status.success() {
        bail!(
            "drawing the chart failed (is python3-matplotlib installed? `cargo xtask bootstrap`): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The egress policy's cost as a markdown table.
pub fn policy_table(p: &PolicyCost) -> String {
    let mut md = String::new();
    let head: Vec<String> = policy_cost::RULES
        .iter()
        .map(|n| format!("{n} rules"))
        .collect();
    let _ = writeln!(
        md,
        "| egress policy: nat_xdp_int (BPF_PROG_TEST_RUN, one run per call), ns/packet | {} |",
        head.join(" | ")
    );
    let _ = writeln!(md, "|---|{}", "---|".repeat(head.len()));
    for (name, rows) in [
        (
            "first packet of a new flow (verdict taken, session created)",
            &p.new_flow_ns,
        ),
        (
            "packet of an established flow (policy not consulted)",
            &p.established_ns,
        ),
    ] {
        let cells: Vec<String> = rows.iter().map(|v| Stat::of(v).cell(1.0, 0)).collect();
        let _ = writeln!(md, "| {name} | {} |", cells.join(" | "));
    }
    md
}

/// Programs as one line: `` `name` ns (runs per packet) ``, comma-separated.
fn progs_inline(progs: &[ProgTime]) -> String {
    progs
        .iter()
        .map(|p| format!("`{}` {}", p.name, p.cell()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// RFC 9693's measurements as markdown tables: establishment, capacity,
/// forwarding at scale (with each program's run time), tear-down.
pub fn stateful_tables(r: &StatefulResult) -> String {
    let mut md = String::new();
    let base = r.variants.iter().find(|v| v.variant == Variant::Iptables);
    let _ = writeln!(
        md,
        "RFC 9693 connection establishment (every packet a new 5-tuple; table of {} sessions; saturated: median (min–max) of the repeats; loss-free: one of two trials at the rate lost at most 1 in 10,000):\n",
        thousands(r.table as u64)
    );
    let _ = writeln!(
        md,
        "| variant | highest loss-free rate, new sessions/s | saturated, new sessions/s | gateway CPU ns per new session | CPU × iptables |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|");
    for v in &r.variants {
        let e = &v.establish;
        let ratio = base
            .map(|b| b.establish.cpu_ns_per_session / e.cpu_ns_per_session)
            .unwrap_or(f64::NAN);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.2}× less |",
            v.variant.label(),
            thousands(e.loss_free_pps as u64),
            thousands(e.saturated_pps as u64),
            Stat::of(&e.cpu_ns).cell(1.0, 0),
            ratio
        );
    }
    for v in r.variants.iter().filter(|v| !v.establish.progs.is_empty()) {
        let _ = writeln!(
            md,
            "\n{} on new sessions (one more saturated trial, bpf_stats), ns per run (runs per forwarded packet): {}",
            v.variant.label(),
            progs_inline(&v.establish.progs)
        );
    }
    let _ = writeln!(
        md,
        "\nRFC 9693 table capacity (new flows at a steady rate into a table of {} sessions, 1.5 tables' worth, in slices of 0.1 s):\n",
        thousands(r.capacity_table as u64)
    );
    let _ = writeln!(
        md,
        "| variant | fill rate, new flows/s | new flows refused (a slice lost over half) after | slices before that with some loss | received of sent | memory per session |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    for v in &r.variants {
        let c = &v.capacity;
        let failed = c.failed_at.map_or_else(
            || match v.variant {
                Variant::Gateway => {
                    "never (full: the sweeper evicted unanswered sessions, see Table pressure)"
                        .to_string()
                }
                _ => "never (full table: oldest unreplied entries dropped early)".to_string(),
            },
            |n| format!("{} sessions", thousands(n)),
        );
        let _ = writeln!(
            md,
            "| {} | {} | {failed} | {} | {} of {} | {:.0} B |",
            v.variant.label(),
            thousands(c.rate as u64),
            c.lossy_slices,
            thousands(c.received),
            thousands(c.sent),
            c.bytes_per_session
        );
    }
    let _ = writeln!(
        md,
        "\nRFC 9693 forwarding at scale (64-byte UDP cycling over N active flows, each created first), median (min–max):\n"
    );
    let mut head = String::from("| active flows |");
    let mut rule = String::from("|---|");
    for v in &r.variants {
        let _ = write!(
            head,
            " {} Mpps | {} CPU ns/pkt |",
            v.variant.key(),
            v.variant.key()
        );
        rule.push_str("---|---|");
    }
    head.push_str(" CPU × iptables |");
    rule.push_str("---|");
    let _ = writeln!(md, "{head}\n{rule}");
    let points = r.variants.first().map_or(0, |v| v.scale.len());
    for i in 0..points {
        let p0 = &r.variants[0].scale[i];
        let short: Vec<String> = r
            .variants
            .iter()
            .filter(|v| v.scale[i].created < v.scale[i].flows)
            .map(|v| {
                format!(
                    "{} created {}",
                    v.variant.key(),
                    thousands(v.scale[i].created)
                )
            })
            .collect();
        let mut row = if short.is_empty() {
            format!("| {} |", thousands(p0.flows))
        } else {
            format!("| {} ({}) |", thousands(p0.flows), short.join(", "))
        };
        let mut cpu = Vec::new();
        for v in &r.variants {
            let p = &v.scale[i];
            let c = Stat::of(&p.cpu_ns);
            let _ = write!(
                row,
                " {} | {} |",
                Stat::of(&p.pps).cell(1e-6, 3),
                c.cell(1.0, 0)
            );
            cpu.push((v.variant, c.median));
        }
        let base = cpu.iter().find(|c| c.0 == Variant::Iptables).map(|c| c.1);
        let ours = cpu.iter().find(|c| c.0 == Variant::Gateway).map(|c| c.1);
        match (base, ours) {
            (Some(b), Some(o)) if o > 0.0 => {
                let _ = write!(row, " {:.2}× less |", b / o);
            }
            _ => row.push_str(" |"),
        }
        let _ = writeln!(md, "{row}");
    }
    if let Some(g) = r.variants.iter().find(|v| v.variant == Variant::Gateway) {
        let _ = writeln!(
            md,
            "\nnat-gateway's programs at scale (bpf_stats, one more window): ns per run (runs per forwarded packet)\n"
        );
        let mut names: Vec<String> = g
            .scale
            .iter()
            .flat_map(|p| p.progs.iter().map(|x| x.name.clone()))
            .collect();
        names.sort();
        names.dedup();
        let _ = writeln!(md, "| active flows | {} |", names.join(" | "));
        let _ = writeln!(md, "|---|{}", "---|".repeat(names.len()));
        for p in &g.scale {
            let cells: Vec<String> = names
                .iter()
                .map(|n| {
                    p.progs
                        .iter()
                        .find(|x| &x.name == n)
                        .map_or("–".to_string(), ProgTime::cell)
                })
                .collect();
            let _ = writeln!(md, "| {} | {} |", thousands(p.flows), cells.join(" | "));
        }
    }
    if let Some(s) = &r.sweep {
        let _ = writeln!(
            md,
            "\nRFC 9693 tear-down: one sweeper pass over {} sessions of the real maps, CPU time\n",
            thousands(s.sessions as u64)
        );
        let _ = writeln!(md, "| pass | CPU ms | CPU ms per million sessions |");
        let _ = writeln!(md, "|---|---|---|");
        for (what, d) in [
            ("nothing expired", s.keep_all),
            ("all expired (removed)", s.remove_all),
        ] {
            let _ = writeln!(
                md,
                "| {what} | {:.0} | {:.0} |",
                d.as_secs_f64() * 1e3,
                SweepCost::ms_per_million(d, s.sessions)
            );
        }
    }
    md
}

fn prog_json(p: &ProgTime) -> Value {
    json!({"name": p.name, "ns_per_run": p.ns_per_run, "runs_per_pkt": p.runs_per_pkt})
}

fn stateful_json(r: &StatefulResult) -> Value {
    json!({
        "table": r.table,
        "capacity_table": r.capacity_table,
        "variants": r.variants.iter().map(|v| json!({
            "key": v.variant.key(),
            "label": v.variant.label(),
            "establishment": {
                "loss_free_sessions_per_s": v.establish.loss_free_pps,
                "saturated_sessions_per_s": v.establish.saturated_pps,
                "cpu_ns_per_session": v.establish.cpu_ns_per_session,
                "cpu_ns_per_session_trials": v.establish.cpu_ns,
                "programs": v.establish.progs.iter().map(prog_json).collect::<Vec<_>>(),
                "trials": v.establish.trials.iter().map(|(rate, sent, got)| json!({
                    "rate": if rate.is_finite() { json!(rate) } else { json!("flat out") },
                    "sent": sent,
                    "received": got,
                })).collect::<Vec<_>>(),
            },
            "capacity": {
                "fill_rate": v.capacity.rate,
                "failed_at_sessions": v.capacity.failed_at,
                "lossy_slices": v.capacity.lossy_slices,
                "sent": v.capacity.sent,
                "received": v.capacity.received,
                "bytes_per_session": v.capacity.bytes_per_session,
            },
            "scale": v.scale.iter().map(|p| json!({
                "flows": p.flows,
                "created": p.created,
                "pps": Stat::of(&p.pps).json(),
                "cpu_ns_per_pkt": Stat::of(&p.cpu_ns).json(),
                "programs": p.progs.iter().map(prog_json).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "sweep": r.sweep.as_ref().map(|s| json!({
            "sessions": s.sessions,
            "keep_all_cpu_ms": s.keep_all.as_secs_f64() * 1e3,
            "remove_all_cpu_ms": s.remove_all.as_secs_f64() * 1e3,
        })),
    })
}

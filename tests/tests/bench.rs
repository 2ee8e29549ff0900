//! The benchmark's quick mode, so `cargo xtask bench` cannot rot: it must
//! build its five topologies, push traffic through every variant, and write a
//! table, JSON and a chart that say something. Speed goals are reported by
//! the benchmark, not asserted here (this machine is shared and noisy).

use std::path::PathBuf;

use nat_lab::bench::{self, Plan, Variant};

fn out_dir() -> PathBuf {
    // Not target/bench: that holds the last full run, quoted in the README.
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench-quick-test")
}

fn bench_namespaces() -> Vec<String> {
    let me = format!("{}{}-bench", nat_lab::NS_PREFIX, std::process::id());
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .filter(|n| n.starts_with(&me))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn bench_quick_mode_produces_table_json_and_chart() {
    let out = out_dir();
    let _ = std::fs::remove_dir_all(&out);
    let bpf_stats = || std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").ok();
    let bpf_stats_before = bpf_stats();
    let ct_limits = || {
        [
            "/proc/sys/net/netfilter/nf_conntrack_max",
            "/sys/module/nf_conntrack/parameters/hashsize",
        ]
        .map(|p| std::fs::read_to_string(p).ok())
    };
    let ct_limits_before = ct_limits();
    let report = bench::run(&Plan::quick(), &out).expect("quick benchmark run");

    // Every variant forwarded traffic of every kind.
    assert_eq!(report.variants.len(), Variant::ALL.len());
    for d in &report.variants {
        let name = d.variant.key();
        assert!(d.pps().median > 0.0, "{name}: no 64-byte packet forwarded");
        assert!(d.offered().median > 0.0, "{name}: nothing offered");
        assert!(d.cpu().median > 0.0, "{name}: no gateway CPU time measured");
        assert!(d.tcp().median > 0.0, "{name}: no TCP throughput");
        assert!(d.conn().median > 0.0, "{name}: no connection completed");
        assert!(
            d.p50().median > 0.0 && d.p99().median >= d.p50().median,
            "{name}: latency p50 {} p99 {}",
            d.p50().median,
            d.p99().median
        );
    }
    for v in [Variant::Gateway, Variant::XdpFwd] {
        let d = report.variant(v).expect("variant measured");
        assert!(
            d.xdp_prog_ns().is_some_and(|ns| ns > 0.0),
            "{}: no XDP program run time",
            v.key()
        );
    }
    let scale = report.scale.as_ref().expect("conntrack scale measured");
    assert!(scale.bytes_per_flow() > 0.0, "no map memory reported");
    assert!(
        scale.spread_ns.iter().all(|r| r.iter().all(|&ns| ns > 0.0)),
        "lookup costs: {:?}",
        scale.spread_ns
    );

    // Each program's time: the gateway's XDP program ran once per packet.
    let gw = report.variant(Variant::Gateway).expect("gateway measured");
    let xdp = gw
        .progs
        .iter()
        .find(|p| p.name == nat_common::PROG_XDP_INT)
        .unwrap_or_else(|| panic!("no bpf_stats for nat_xdp_int: {:?}", gw.progs));
    assert!(
        xdp.ns_per_run > 0.0 && (0.9..1.5).contains(&xdp.runs_per_pkt),
        "{xdp:?}"
    );
    assert_eq!(report.placement.len(), 4, "{:?}", report.placement);
    assert!(
        report
            .placement
            .iter()
            .all(|p| p.prog_ns > 0.0 && p.pps > 0.0)
    );

    // RFC 9693's four answers, for iptables, nftables and ours.
    let st = report.stateful.as_ref().expect("RFC 9693 measured");
    assert_eq!(st.variants.len(), bench::stateful::VARIANTS.len());
    for v in &st.variants {
        let name = v.variant.key();
        let e = &v.establish;
        assert!(
            e.loss_free_pps > 0.0 && e.saturated_pps > 0.0 && e.cpu_ns_per_session > 0.0,
            "{name}: {e:?}"
        );
        assert!(
            v.capacity.bytes_per_session > 0.0,
            "{name}: {:?}",
            v.capacity
        );
        assert_eq!(v.scale.len(), Plan::quick().scale_flows.len());
        assert!(
            v.scale
                .iter()
                .all(|p| p.pps.iter().chain(&p.cpu_ns).all(|&x| x > 0.0)),
            "{name}: {:?}",
            v.scale
        );
    }
    let ours = st
        .variants
        .iter()
        .find(|v| v.variant == Variant::Gateway)
        .expect("ours");
    // A full table refuses new flows: they fail before more sessions than
    // it holds exist.
    let failed = ours.capacity.failed_at.expect("new flows never failed");
    assert!(
        failed <= st.capacity_table as u64,
        "{failed} sessions in a table of {}",
        st.capacity_table
    );
    let sweep = st.sweep.as_ref().expect("sweep measured");
    assert!(!sweep.keep_all.is_zero() && !sweep.remove_all.is_zero());

    // The three outputs.
    let md = std::fs::read_to_string(out.join("results.md")).expect("results.md");
    for v in Variant::ALL {
        assert!(
            md.contains(v.label()),
            "results.md lacks {}:\n{md}",
            v.label()
        );
    }
    assert!(md.contains("× iptables"), "results.md has no ratios:\n{md}");
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("results.json")).expect("results.json"),
    )
    .expect("results.json parses");
    assert_eq!(
        json["variants"].as_array().map(Vec::len),
        Some(Variant::ALL.len())
    );
    assert!(json["variants"][3]["pps"]["median"].as_f64() > Some(0.0));
    // Every goal the report judges, in the JSON too.
    let goals = report.goals();
    assert!(!goals.is_empty(), "no goal judged");
    assert_eq!(
        json["goals"].as_array().map(Vec::len),
        Some(goals.len()),
        "{json}"
    );
    let png = std::fs::read(out.join("chart.png")).expect("chart.png");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "chart.png is not a real PNG ({} bytes)",
        png.len()
    );

    assert!(
        json["rfc9693"]["variants"][1]["scale"][0]["cpu_ns_per_pkt"]["median"].as_f64() > Some(0.0)
    );
    let png = std::fs::read(out.join("chart-scale.png")).expect("chart-scale.png");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "chart-scale.png is not a real PNG ({} bytes)",
        png.len()
    );

    // Nothing left behind.
    assert!(
        bench_namespaces().is_empty(),
        "namespaces left: {:?}",
        bench_namespaces()
    );
    assert_eq!(
        bpf_stats(),
        bpf_stats_before,
        "kernel.bpf_stats_enabled not restored"
    );
    assert_eq!(
        ct_limits(),
        ct_limits_before,
        "nf_conntrack_max or the conntrack hash size not restored"
    );
}

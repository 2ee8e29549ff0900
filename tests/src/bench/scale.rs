//! Conntrack scale: the real programs with a table of `large` flows, map
//! memory per flow as the kernel accounts it, and the cost of translating a
//! packet of an existing flow with `small` and with `large` flows tracked.

use std::{
    net::Ipv4Addr,
    os::fd::{AsFd, AsRawFd},
};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf,
    maps::{HashMap, MapData},
    programs::Xdp,
};
use nat_common::{CtKey, CtValue, IPPROTO_UDP, MAP_CT_FWD, NatConfig, PROG_XDP_INT};
use nat_loader::dataplane;

use super::{
    Plan,
    topo::{GEN_IP, GW_EXT_IP, Role, SINK_IP, Topo},
};
use crate::{
    packet::{Csum, L4, Packet},
    test_run::test_run,
};

const XDP_REDIRECT: u32 = 4;
/// Flows created by real packets through the program, then measured again
/// and again (hot caches).
const HOT_FLOWS: u16 = 32;

#[derive(Clone, Debug, Default)]
pub struct ScaleResult {
    pub max_flows: u32,
    pub small: u32,
    pub large: u32,
    /// memlock (bytes, as /proc/<pid>/fdinfo says) of the sessions map
    /// (CT_FWD) and of the binding and filter maps (NAT_BIND, NAT_BIND_REV,
    /// CT_ADF): all the conntrack memory for `large` sessions.
    pub fwd_memlock: u64,
    pub rev_memlock: u64,
    /// Median ns per packet (nat_xdp_int on a hit) over many runs of the
    /// hot flows, per round: [small, large].
    pub hot_ns: [Vec<f64>; 2],
    /// Median ns of single runs over many different flows (cold-ish).
    pub spread_ns: [Vec<f64>; 2],
}

impl ScaleResult {
    pub fn bytes_per_flow(&self) -> f64 {
        (self.fwd_memlock + self.rev_memlock) as f64 / self.large as f64
    }
}

fn raw(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// Synthetic session `i`: a distinct inside address, to the sink; its
/// reply tuple is made unique by (destination port, external port). Only
/// sessions are filled: an outbound packet of a known session never looks
/// at the bindings, whose maps are preallocated at their full size anyway.
fn synthetic(i: u32) -> (CtKey, CtKey) {
    let (src, dport) = synthetic_tuple(i);
    let ext_port = 1024 + (i % 64_000) as u16;
    let fwd = CtKey::new(
        IPPROTO_UDP,
        raw(src),
        40000u16.to_be(),
        raw(SINK_IP),
        dport.to_be(),
    );
    let rev = CtKey::new(
        IPPROTO_UDP,
        raw(SINK_IP),
        dport.to_be(),
        raw(GW_EXT_IP),
        ext_port.to_be(),
    );
    (fwd, rev)
}

/// Inside address and destination port of synthetic flow `i`.
fn synthetic_tuple(i: u32) -> (Ipv4Addr, u16) {
    (
        Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i),
        1 + (i / 64_000) as u16,
    )
}

fn frame(t: &Topo, src: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    Packet {
        dst_mac: t.gw_int.mac,
        src_mac: t.gen_if.mac,
        src,
        dst: SINK_IP,
        ttl: 64,
        options: vec![],
        l4: L4::Udp { sport, dport },
        payload: vec![0; 18],
        csum: Csum::Full,
    }
    .build()
}

pub fn map_data(map: &aya::maps::Map) -> &MapData {
    use aya::maps::Map;
    match map {
        Map::Array(d)
        | Map::ArrayOfMaps(d)
        | Map::BloomFilter(d)
        | Map::CgroupArray(d)
        | Map::CgroupStorage(d)
        | Map::CgrpStorage(d)
        | Map::CpuMap(d)
        | Map::DevMap(d)
        | Map::DevMapHash(d)
        | Map::HashMap(d)
        | Map::HashOfMaps(d)
        | Map::InodeStorage(d)
        | Map::LpmTrie(d)
        | Map::LruHashMap(d)
        | Map::PerCpuArray(d)
        | Map::PerCpuCgroupStorage(d)
        | Map::PerCpuHashMap(d)
        | Map::PerCpuLruHashMap(d)
        | Map::PerfEventArray(d)
        | Map::ProgramArray(d)
        | Map::Queue(d)
        | Map::ReusePortSockArray(d)
        | Map::RingBuf(d)
        | Map::SockHash(d)
        | Map::SockMap(d)
        | Map::SkStorage(d)
        | Map::Stack(d)
        | Map::StackTraceMap(d)
        | Map::Unsupported(d)
        | Map::XskMap(d) => d,
    }
}

pub fn memlock(map: &MapData) -> Result<u64> {
    let fd = map.fd().as_fd().as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no memlock in the map's fdinfo")
}

/// One BPF_PROG_TEST_RUN of nat_xdp_int on `data`: verdict and run time.
fn run_once(ebpf: &mut Ebpf, data: &[u8]) -> Result<(u32, f64)> {
    let r = test_run::<Xdp>(ebpf, PROG_XDP_INT, data)?;
    Ok((r.verdict, r.duration.as_nanos() as f64))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

/// Runs in the gateway namespace of `t` (the FIB answers from its routes),
/// with `plan`'s table sizes, rounds and samples.
pub fn run(t: &Topo, plan: &Plan) -> Result<ScaleResult> {
    // A pinned neighbour: the measured path is the fast path, not ARP.
    t.pin_neighbour(Role::Gw, SINK_IP, t.sink_if.mac, &t.gw_ext.name)?;
    // As the loader's defaults (free ports, filtering), with no probe port
    // to skip.
    let cfg = NatConfig::new(t.gw_int.index, t.gw_ext.index, GW_EXT_IP).with_probe_port(0);
    t.in_ns(Role::Gw, || measure(t, cfg, plan))?
}

fn measure(t: &Topo, cfg: NatConfig, plan: &Plan) -> Result<ScaleResult> {
    let (small, large, samples) = (plan.ct_small, plan.ct_large, plan.ct_spread_samples);
    let mut ebpf = dataplane::load(&cfg, large).context("loading the dataplane")?;
    let mut res = ScaleResult {
        max_flows: large,
        small,
        large,
        ..Default::default()
    };
    {
        // Every map of the gateway's object: the sessions, and all the
        // others (bindings, filter, pool, fragments, counters...).
        for (name, map) in ebpf.maps() {
            let bytes = memlock(map_data(map))?;
            if name == MAP_CT_FWD {
                res.fwd_memlock = bytes;
            } else {
                res.rev_memlock += bytes;
            }
        }
    }
    // Real flows, created by the program itself.
    let hot: Vec<Vec<u8>> = (0..HOT_FLOWS)
        .map(|j| frame(t, GEN_IP, 20000 + j, 53))
        .collect();
    for f in &hot {
        let (verdict, _) = run_once(&mut ebpf, f)?;
        if verdict != XDP_REDIRECT {
            bail!("the first packet of a flow was not translated (XDP verdict {verdict})");
        }
    }
    let mut filled = 0u32;
    let now = nat_loader::monotonic_ns();
    let mut fill_to = |ebpf: &mut Ebpf, total: u32| -> Result<()> {
        let target = total - HOT_FLOWS as u32;
        let mut fwd = HashMap::<&mut MapData, CtKey, CtValue>::try_from(
            ebpf.map_mut(MAP_CT_FWD).context("CT_FWD missing")?,
        )?;
        while filled < target {
            let (k, r) = synthetic(filled);
            let v = CtValue::new(0, r.dst_port, nat_common::ticks(now), 0, 0);
            fwd.insert(k, v, 0)
                .with_context(|| format!("inserting session {filled}"))?;
            filled += 1;
        }
        Ok(())
    };
    for (slot, total) in [(0usize, small), (1, large)] {
        fill_to(&mut ebpf, total)?;
        for _ in 0..plan.ct_rounds {
            // Single runs: with a repeat count the program would see its
            // own output (rewritten in place) from the second run on.
            let mut runs = Vec::new();
            for _ in 0..plan.ct_hot_runs {
                for f in &hot {
                    let (verdict, ns) = run_once(&mut ebpf, f)?;
                    if verdict != XDP_REDIRECT {
                        bail!("a tracked flow's packet was not translated (verdict {verdict})");
                    }
                    runs.push(ns);
                }
            }
            res.hot_ns[slot].push(median(runs));
            // One run each over flows spread across the whole table.
            let mut single = Vec::new();
            let mut skipped = 0;
            let n = total - HOT_FLOWS as u32;
            let step = (n / samples.max(1)).max(1);
            let mut i = 7 % n.max(1);
            for _ in 0..samples.min(n) {
                let (src, dport) = synthetic_tuple(i);
                let data = frame(t, src, 40000, dport);
                let (verdict, ns) = run_once(&mut ebpf, &data)?;
                // One complete checksum in 65536 looks like a partial one
                // and is handed to TC (XDP_PASS): not a lookup to time.
                if verdict == XDP_REDIRECT {
                    single.push(ns);
                } else {
                    skipped += 1;
                }
                i = (i + step) % n;
            }
            if skipped > samples / 100 + 1 {
                bail!("{skipped} of {samples} tracked flows' packets were not translated");
            }
            res.spread_ns[slot].push(median(single));
        }
    }
    Ok(res)
}

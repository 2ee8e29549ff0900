//! Reading a running gateway from outside its loader, read-only: the
//! pinned maps of a `--bpffs-dir` opened with `BPF_F_RDONLY`, for
//! `nat-loader stats` and `nat-loader conntrack`. Nothing here can change
//! the dataplane.

use std::{
    io,
    net::Ipv4Addr,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::Path,
};

use anyhow::{Context, Result};
use nat_common::{
    BindKey, BindValue, CtKey, CtValue, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, MAP_BIND_REV,
    MAP_CT_FWD, MAP_POOL_ADDRS, MAP_STATS, MAP_TRAFFIC, PoolAddr, Traffic,
    stats::{COUNT, DIRECTIONS, HOOKS, TRAFFIC_PROTOS, slot, traffic_slot},
};
use serde_json::{Value, json};

use crate::{batch, conntrack::Flow, pins::PinDir, stats::Stats, sys};

#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Opens the pinned map `name` of `pins` read-only.
pub fn open_map(pins: &PinDir, name: &str) -> Result<OwnedFd> {
    let path = pins.pin(name);
    open_rdonly(&path).with_context(|| {
        format!(
            "opening {} (is a gateway running with --bpffs-dir {}?)",
            path.display(),
            pins.path().display()
        )
    })
}

fn open_rdonly(path: &Path) -> io::Result<OwnedFd> {
    sys::obj_get(path, sys::BPF_F_RDONLY)
}

/// The counters of the per-CPU stats array behind `fd`, summed over CPUs.
pub fn read_stats(fd: &OwnedFd) -> Result<Stats> {
    let cpus = aya::util::nr_cpus()
        .map_err(|(_, e)| e)
        .context("counting the possible CPUs")?;
    let mut totals = vec![vec![0u64; COUNT as usize]; HOOKS.len()];
    let mut per_cpu = vec![0u64; cpus];
    for ((hook, _), row) in HOOKS.iter().zip(totals.iter_mut()) {
        for (reason, total) in (0..COUNT).zip(row.iter_mut()) {
            let idx = slot(*hook, reason);
            let mut attr = ElemAttr {
                map_fd: fd.as_raw_fd() as u32,
                key: &idx as *const u32 as u64,
                value: per_cpu.as_mut_ptr() as u64,
                ..Default::default()
            };
            sys::bpf(sys::BPF_MAP_LOOKUP_ELEM, &mut attr)
                .with_context(|| format!("reading stats slot {idx}"))?;
            *total = per_cpu.iter().sum();
        }
    }
    Ok(Stats { totals })
}

/// Packets and bytes forwarded, by (direction, protocol), from the per-CPU
/// array behind `fd`.
pub fn read_traffic(fd: &OwnedFd) -> Result<Vec<(&'static str, &'static str, Traffic)>> {
    let cpus = aya::util::nr_cpus()
        .map_err(|(_, e)| e)
        .context("counting the possible CPUs")?;
    let mut out = Vec::new();
    let mut per_cpu = vec![Traffic::default(); cpus];
    for (dir, dir_label) in DIRECTIONS {
        for (proto, proto_label) in TRAFFIC_PROTOS {
            let idx = traffic_slot(dir, proto);
            let mut attr = ElemAttr {
                map_fd: fd.as_raw_fd() as u32,
                key: &idx as *const u32 as u64,
                value: per_cpu.as_mut_ptr() as u64,
                ..Default::default()
            };
            sys::bpf(sys::BPF_MAP_LOOKUP_ELEM, &mut attr)
                .with_context(|| format!("reading traffic slot {idx}"))?;
            let sum = Traffic::sum(per_cpu.iter());
            out.push((dir_label, proto_label, sum));
        }
    }
    Ok(out)
}

/// The traffic of a running gateway (none if its dataplane predates the
/// traffic counters).
pub fn traffic(pins: &PinDir) -> Result<Vec<(&'static str, &'static str, Traffic)>> {
    if !pins.pin(MAP_TRAFFIC).exists() {
        return Ok(Vec::new());
    }
    read_traffic(&open_map(pins, MAP_TRAFFIC)?)
}

/// `nat-loader stats -o json`: every counter of every hook, zeros
/// included, by the labels of `nat_common::stats`, and the traffic by
/// direction and protocol.
pub fn stats_json(s: &Stats, traffic: &[(&str, &str, Traffic)]) -> Value {
    let mut hooks = serde_json::Map::new();
    for (h, (_, hook)) in HOOKS.iter().enumerate() {
        let mut counters = serde_json::Map::new();
        for (r, label) in nat_common::stats::LABELS {
            counters.insert((*label).to_string(), json!(s.get(h, *r)));
        }
        hooks.insert((*hook).to_string(), Value::Object(counters));
    }
    let mut t = serde_json::Map::new();
    for (dir, proto, v) in traffic {
        let d = t
            .entry(dir.to_string())
            .or_insert_with(|| Value::Object(serde_json::Map::new()));
        if let Value::Object(d) = d {
            d.insert(
                proto.to_string(),
                json!({ "packets": v.packets, "bytes": v.bytes }),
            );
        }
    }
    json!({ "counters": hooks, "traffic": t })
}

/// The gateway's sessions, through batched reads.
pub fn sessions(pins: &PinDir) -> Result<Vec<(CtKey, CtValue)>> {
    let fd = open_map(pins, MAP_CT_FWD)?;
    batch::entries_of(fd.as_fd()).context("reading the sessions")
}

/// The gateway's SNAT pool, slot by slot (sessions name their external
/// address by its slot).
pub fn pool(pins: &PinDir) -> Result<Vec<PoolAddr>> {
    let fd = open_map(pins, MAP_POOL_ADDRS)?;
    let mut slots: Vec<(u32, PoolAddr)> =
        batch::entries_of(fd.as_fd()).context("reading the SNAT pool")?;
    slots.sort_by_key(|(i, _)| *i);
    Ok(slots.into_iter().map(|(_, a)| a).collect())
}

/// The gateway's bindings by external endpoint.
pub fn bindings(pins: &PinDir) -> Result<Vec<(BindKey, BindValue)>> {
    let fd = open_map(pins, MAP_BIND_REV)?;
    batch::entries_of(fd.as_fd()).context("reading the bindings")
}

/// The stats of a running gateway.
pub fn stats(pins: &PinDir) -> Result<Stats> {
    read_stats(&open_map(pins, MAP_STATS)?)
}

/// A protocol by name (`tcp`, `udp`, `icmp`).
pub fn proto_number(name: &str) -> Option<u8> {
    match name {
        "tcp" => Some(IPPROTO_TCP),
        "udp" => Some(IPPROTO_UDP),
        "icmp" => Some(IPPROTO_ICMP),
        _ => None,
    }
}

/// Which sessions `conntrack list`/`count` show; `None` matches all.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub proto: Option<u8>,
    /// The inside host's address.
    pub inside: Option<Ipv4Addr>,
    /// The remote (outside) host's address.
    pub outside: Option<Ipv4Addr>,
    /// A port at any end: inside, external or remote.
    pub port: Option<u16>,
    /// The external (translated) port.
    pub external_port: Option<u16>,
    /// [`Flow::state`].
    pub state: Option<String>,
}

impl Filter {
    pub fn matches(&self, f: &Flow) -> bool {
        self.proto.is_none_or(|p| p == f.proto)
            && self.inside.is_none_or(|a| a == *f.inside.ip())
            && self.outside.is_none_or(|a| a == *f.remote.ip())
            && self.port.is_none_or(|p| {
                p == f.inside.port() || p == f.external.port() || p == f.remote.port()
            })
            && self.external_port.is_none_or(|p| p == f.external.port())
            && self.state.as_deref().is_none_or(|s| s == f.state())
    }
}

/// One session as `conntrack list -o json` prints it.
pub fn flow_json(f: &Flow) -> Value {
    json!({
        "protocol": f.proto_name(),
        "inside": f.inside.to_string(),
        "external": f.external.to_string(),
        "remote": f.remote.to_string(),
        "state": f.state(),
        "opened_inbound": f.inbound,
        "idle_seconds": f.idle.as_secs(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn flow(proto: u8, inside: &str, external: &str, remote: &str, replied: bool) -> Flow {
        Flow {
            proto,
            inside: inside.parse().expect("inside"),
            external: external.parse().expect("external"),
            remote: remote.parse().expect("remote"),
            tcp_state: 0,
            inbound: false,
            replied,
            idle: Duration::ZERO,
        }
    }

    #[test]
    fn every_given_filter_must_match() {
        let f = flow(
            IPPROTO_UDP,
            "10.1.0.11:5000",
            "192.0.2.2:40000",
            "198.51.100.10:53",
            true,
        );
        assert!(Filter::default().matches(&f));
        let inside = Some(Ipv4Addr::new(10, 1, 0, 11));
        let yes = [
            Filter {
                proto: Some(IPPROTO_UDP),
                ..Filter::default()
            },
            Filter {
                inside,
                ..Filter::default()
            },
            Filter {
                outside: Some(Ipv4Addr::new(198, 51, 100, 10)),
                ..Filter::default()
            },
            Filter {
                port: Some(5000),
                ..Filter::default()
            },
            Filter {
                port: Some(40000),
                ..Filter::default()
            },
            Filter {
                port: Some(53),
                ..Filter::default()
            },
            Filter {
                external_port: Some(40000),
                ..Filter::default()
            },
            Filter {
                state: Some("answered".into()),
                ..Filter::default()
            },
        ];
        for y in yes {
            assert!(y.matches(&f), "{y:?}");
        }
        let no = [
            Filter {
                proto: Some(IPPROTO_TCP),
                ..Filter::default()
            },
            Filter {
                inside,
                port: Some(1),
                ..Filter::default()
            },
            Filter {
                outside: inside,
                ..Filter::default()
            },
            Filter {
                external_port: Some(5000),
                ..Filter::default()
            },
            Filter {
                state: Some("unanswered".into()),
                ..Filter::default()
            },
        ];
        for n in no {
            assert!(!n.matches(&f), "{n:?}");
        }
    }

    #[test]
    fn a_flow_prints_as_json_with_both_tuples() {
        let f = flow(
            IPPROTO_ICMP,
            "10.1.0.11:7",
            "192.0.2.2:40000",
            "198.51.100.10:0",
            false,
        );
        let v = flow_json(&f);
        assert_eq!(v["protocol"], "icmp");
        assert_eq!(v["inside"], "10.1.0.11:7");
        assert_eq!(v["external"], "192.0.2.2:40000");
        assert_eq!(v["remote"], "198.51.100.10:0");
        assert_eq!(v["state"], "unanswered");
    }

    #[test]
    fn stats_json_names_every_counter_of_every_hook() {
        let mut s = Stats {
            totals: vec![vec![0; COUNT as usize]; HOOKS.len()],
        };
        s.totals[2][nat_common::stats::TC_OUT_FWD as usize] = 7;
        let traffic = [(
            "outbound",
            "udp",
            Traffic {
                packets: 3,
                bytes: 300,
            },
        )];
        let v = stats_json(&s, &traffic);
        assert_eq!(v["counters"]["tc_int"]["tc_out_forwarded"], 7);
        assert_eq!(v["counters"]["xdp_ext"]["drop_unsolicited"], 0);
        assert_eq!(v["traffic"]["outbound"]["udp"]["bytes"], 300);
        for (_, hook) in HOOKS {
            assert_eq!(
                v["counters"][hook].as_object().map(|o| o.len()),
                Some(COUNT as usize)
            );
        }
    }
}

//! BPF_PROG_TEST_RUN: one run of a loaded program on a crafted frame, for
//! the fixtures (tests/prog_test_run.rs, tests/adversarial.rs) and the
//! benchmark's lookup costs; and what the fixtures read around a run (the
//! NICs, the counters, the maps).

use std::time::Duration;

use anyhow::{Context, Result};
use aya::{
    Ebpf, Pod,
    maps::{HashMap, MapData, PerCpuArray},
    programs::{Program, ProgramError, TestRun, TestRunOptions, TestRunResult},
};
use nat_common::{MAP_STATS, NatConfig, stats};

use crate::{
    CLIENT1_IP, EXT_IF, HOST_IF, Host, INT_IF, Lab, NAT_EXT_IP, NAT_INT_IP, ROUTER_NAT_IF,
    ROUTER_NAT_IP,
};

/// What one run returned.
#[derive(Clone, Debug)]
pub struct Run {
    /// The program's return value (XDP or TC verdict).
    pub verdict: u32,
    /// The frame as the program left it.
    pub out: Vec<u8>,
    /// The kernel's measure of the run.
    pub duration: Duration,
}

/// Runs program `prog` of `ebpf` (of type `P`: `Xdp` or
/// `SchedClassifier`, loaded) once on `frame`.
pub fn test_run<P>(ebpf: &mut Ebpf, prog: &str, frame: &[u8]) -> Result<Run>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
    for<'a> &'a mut P: TryFrom<&'a mut Program, Error = ProgramError>,
{
    let p: &mut P = nat_loader::program(ebpf, prog)?;
    // Room for programs that grow the frame (ICMP errors quote it).
    let mut out = vec![0u8; frame.len() + 256];
    let r = p
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .with_context(|| format!("BPF_PROG_TEST_RUN of {prog}"))?;
    out.truncate(r.data_size_out as usize);
    Ok(Run {
        verdict: r.return_value,
        out,
        duration: r.duration,
    })
}

/// The gateway's NICs in a lab's `nat`, and the MACs of the hosts next to
/// them: what a fixture needs to craft frames and expect outputs.
#[derive(Clone, Copy, Debug)]
pub struct Nics {
    pub int_index: u32,
    pub ext_index: u32,
    pub int_mac: [u8; 6],
    pub ext_mac: [u8; 6],
    pub router_mac: [u8; 6],
    pub client_mac: [u8; 6],
}

impl Nics {
    /// Reads them from `lab` and pins the neighbours of the router and
    /// client1 in `nat`, so the FIB answers (and so the output bytes) are
    /// deterministic.
    pub fn of(lab: &Lab) -> Result<Nics> {
        let n = Nics {
            int_index: lab.ifindex(Host::Nat, INT_IF)?,
            ext_index: lab.ifindex(Host::Nat, EXT_IF)?,
            int_mac: lab.mac(Host::Nat, INT_IF)?,
            ext_mac: lab.mac(Host::Nat, EXT_IF)?,
            router_mac: lab.mac(Host::Router, ROUTER_NAT_IF)?,
            client_mac: lab.mac(Host::Client1, HOST_IF)?,
        };
        lab.pin_neighbour(Host::Nat, ROUTER_NAT_IP, n.router_mac, EXT_IF)?;
        lab.pin_neighbour(Host::Nat, CLIENT1_IP, n.client_mac, INT_IF)?;
        Ok(n)
    }

    /// The gateway's configuration with external ports
    /// `port_min..=port_max`, no probe port, the NICs' MACs and `--int`'s
    /// address.
    pub fn config(&self, port_min: u16, port_max: u16) -> NatConfig {
        NatConfig::new(self.int_index, self.ext_index, NAT_EXT_IP)
            .with_ports(port_min, port_max)
            .with_probe_port(0)
            .with_macs(self.int_mac, self.ext_mac)
            .with_int_addr(Some(NAT_INT_IP))
    }
}

/// The counters, summed over CPUs, in the stats map's layout
/// (`nat_common::stats::slot`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counters(pub Vec<u64>);

impl Counters {
    /// Reads them from the object's stats map.
    pub fn of(ebpf: &Ebpf) -> Result<Counters> {
        let map =
            PerCpuArray::<&MapData, u64>::try_from(ebpf.map(MAP_STATS).context("the stats map")?)?;
        let slot = |i: u32| -> Result<u64> { Ok(map.get(&i, 0)?.iter().sum()) };
        Ok(Counters(
            (0..stats::SLOTS).map(slot).collect::<Result<_>>()?,
        ))
    }

    pub fn get(&self, hook: u32, reason: u32) -> u64 {
        self.0[stats::slot(hook, reason) as usize]
    }
}

/// Every entry of hash map `name` of the object.
pub fn entries<K: Pod, V: Pod>(ebpf: &Ebpf, name: &str) -> Result<Vec<(K, V)>> {
    let map =
        HashMap::<&MapData, K, V>::try_from(ebpf.map(name).with_context(|| format!("map {name}"))?)
            .with_context(|| format!("map {name}'s type"))?;
    map.iter()
        .map(|r| r.with_context(|| format!("an entry of {name}")))
        .collect()
}

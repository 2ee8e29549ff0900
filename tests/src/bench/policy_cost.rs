//! What the egress policy costs: `nat_xdp_int` on the first packet of new
//! flows (the verdict is taken and the session created) and on packets of
//! established flows (the policy is not consulted), with no rules, 100 and
//! 10,000 rules. The real programs under BPF_PROG_TEST_RUN, one run per
//! call, in a topology's gateway namespace (the FIB answers).
//!
//! The rules are a worst case of their kind for these flows: 32 rules for
//! any destination whose inside prefixes the generator is not in (every
//! new flow is checked against all of them), rules for other destinations
//! (never on the flows' list, but in the trie), and last the rule that
//! allows the sink; the default denies.

use std::net::Ipv4Addr;

use anyhow::{Context, Result, bail};
use aya::programs::Xdp;
use nat_common::{
    IPPROTO_UDP, NatConfig, PROG_XDP_INT,
    policy::{ANSWER_DROP, PROTO_ANY, Policy, Prefix, Rule, Verdict},
};
use nat_loader::{dataplane, policy::PolicyMaps};

use super::{
    Plan,
    topo::{GEN_IP, GW_EXT_IP, Role, SINK_IP, Topo},
};
use crate::{
    packet::{Csum, L4, Packet},
    test_run::test_run,
};

const XDP_REDIRECT: u32 = 4;
/// The rule counts measured (the goals compare the last with the first).
pub const RULES: [u32; 3] = [0, 100, 10_000];
/// Rules every new flow to the sink is checked against before its own.
const ANY_DESTINATION: u32 = 32;

/// Per rule count ([`RULES`]), the median ns per packet of each round.
#[derive(Clone, Debug, Default)]
pub struct PolicyCost {
    pub new_flow_ns: [Vec<f64>; 3],
    pub established_ns: [Vec<f64>; 3],
}

/// `n` rules as the module says (none: no policy at all).
fn policy(n: u32) -> Policy {
    if n == 0 {
        return Policy::default();
    }
    let rule = |name: String, inside: Prefix, dst: Prefix, proto, verdict| Rule {
        name,
        inside,
        dst,
        proto,
        ports: (0, u16::MAX),
        verdict,
    };
    let deny = Verdict::Deny(ANSWER_DROP);
    let any = ANY_DESTINATION.min(n - 1);
    let mut rules: Vec<Rule> = (0..any)
        .map(|i| {
            let inside = Prefix::new(Ipv4Addr::from(0xac10_0000 | (i << 8)), 24);
            rule(format!("any-{i}"), inside, Prefix::ANY, PROTO_ANY, deny)
        })
        .collect();
    rules.extend((0..n - 1 - any).map(|i| {
        let dst = Prefix::new(Ipv4Addr::from(0x0ac8_0000 + i), 32);
        rule(format!("other-{i}"), Prefix::ANY, dst, PROTO_ANY, deny)
    }));
    rules.push(rule(
        "sink".into(),
        Prefix::ANY,
        Prefix::new(SINK_IP, 24),
        IPPROTO_UDP,
        Verdict::Allow,
    ));
    Policy {
        rules,
        default: deny,
    }
}

fn frame(t: &Topo, sport: u16) -> Vec<u8> {
    Packet {
        dst_mac: t.gw_int.mac,
        src_mac: t.gen_if.mac,
        src: GEN_IP,
        dst: SINK_IP,
        ttl: 64,
        options: vec![],
        l4: L4::Udp { sport, dport: 9 },
        payload: vec![0; 18],
        csum: Csum::Full,
    }
    .build()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

/// Runs in the gateway namespace of `t`, `plan.ct_rounds` rounds of
/// `plan.ct_spread_samples` new flows per rule count.
pub fn run(t: &Topo, plan: &Plan) -> Result<PolicyCost> {
    t.pin_neighbour(Role::Gw, SINK_IP, t.sink_if.mac, &t.gw_ext.name)?;
    let cfg = NatConfig::new(t.gw_int.index, t.gw_ext.index, GW_EXT_IP).with_probe_port(0);
    t.in_ns(Role::Gw, || measure(t, cfg, plan))?
}

fn measure(t: &Topo, cfg: NatConfig, plan: &Plan) -> Result<PolicyCost> {
    let flows = plan.ct_spread_samples.clamp(1, 2_000) as usize;
    let rounds = plan.ct_rounds.max(1);
    let mut res = PolicyCost::default();
    for (slot, &n) in RULES.iter().enumerate() {
        let max_flows = (flows * rounds) as u32 + 1024;
        let mut ebpf = dataplane::load(&cfg, max_flows).context("loading the dataplane")?;
        let mut maps = PolicyMaps::take(&mut ebpf)?;
        maps.install(&policy(n))
            .with_context(|| format!("installing {n} rules"))?;
        for round in 0..rounds {
            let frames: Vec<Vec<u8>> = (0..flows)
                .map(|j| frame(t, 1024 + (round * flows + j) as u16))
                .collect();
            let mut new = Vec::with_capacity(flows);
            let mut established = Vec::with_capacity(flows);
            for f in &frames {
                let r = test_run::<Xdp>(&mut ebpf, PROG_XDP_INT, f)?;
                if r.verdict != XDP_REDIRECT {
                    bail!(
                        "{n} rules: a new flow was not translated (verdict {})",
                        r.verdict
                    );
                }
                new.push(r.duration.as_nanos() as f64);
            }
            for f in &frames {
                let r = test_run::<Xdp>(&mut ebpf, PROG_XDP_INT, f)?;
                if r.verdict != XDP_REDIRECT {
                    bail!("{n} rules: an established flow's packet was not translated");
                }
                established.push(r.duration.as_nanos() as f64);
            }
            res.new_flow_ns[slot].push(median(new));
            res.established_ns[slot].push(median(established));
        }
    }
    Ok(res)
}

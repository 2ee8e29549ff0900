//! The egress policy and the anti-spoofing prefixes in the dataplane's
//! maps (nat_common::policy explains the layout). A policy is compiled,
//! written into the generation the programs do not read, and made active
//! with one write of `POLICY_STATE`: a packet sees the old policy or the
//! new one, never a mix. The old generation's entries stay until the next
//! install overwrites them.

use std::{net::Ipv4Addr, path::Path};

use anyhow::{Context, Result, anyhow};
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray, lpm_trie::Key, lpm_trie::LpmTrie},
};
use nat_common::{
    CT_F_INBOUND, CtKey, CtValue, IPPROTO_ICMP, MAP_INSIDE_NETS, MAP_POLICY_DST, MAP_POLICY_HITS,
    MAP_POLICY_RULES, MAP_POLICY_STATE,
    policy::{
        self, Compiled, Policy, PolicyList, PolicyRule, RULE_STRIDE, STATE_NONE, dst_key,
        dst_key_len, state_for,
    },
};

use aya::programs::links::{FdLink, PinnedLink};

use crate::{
    pins::{LINK_TCX_INT, PinDir},
    take_map,
};

/// A rule of the active policy as the maps hold it.
pub struct Shown {
    /// `None`: on no destination's list (a rule before it matches every
    /// flow it could).
    pub dst: Option<policy::Prefix>,
    pub rule: PolicyRule,
    pub hits: u64,
}

/// The policy maps of a loaded object, and the policy they hold.
pub struct PolicyMaps {
    dst: LpmTrie<MapData, [u32; 2], PolicyList>,
    rules: Array<MapData, PolicyRule>,
    state: Array<MapData, u32>,
    hits: PerCpuArray<MapData, u64>,
    inside: LpmTrie<MapData, u32, u8>,
    /// The active policy (what the programs read), if any was installed.
    active: Option<Policy>,
}

impl PolicyMaps {
    /// Takes the maps out of a loaded object.
    pub fn take(ebpf: &mut Ebpf) -> Result<PolicyMaps> {
        Ok(PolicyMaps {
            dst: take_map(ebpf, MAP_POLICY_DST)?,
            rules: take_map(ebpf, MAP_POLICY_RULES)?,
            state: take_map(ebpf, MAP_POLICY_STATE)?,
            hits: take_map(ebpf, MAP_POLICY_HITS)?,
            inside: take_map(ebpf, MAP_INSIDE_NETS)?,
            active: None,
        })
    }

    /// Makes `p` the policy new flows are judged by, atomically. A policy
    /// that allows everything turns the lookup off. On an error the old
    /// policy stays in force.
    pub fn install(&mut self, p: &Policy) -> Result<()> {
        if p.allows_all() && p.rules.is_empty() {
            self.state
                .set(0, STATE_NONE, 0)
                .with_context(|| format!("writing {MAP_POLICY_STATE}"))?;
            self.active = Some(p.clone());
            return Ok(());
        }
        let compiled = policy::compile(p).map_err(|e| anyhow!("policy: {e}"))?;
        let current = self
            .state
            .get(&0, 0)
            .with_context(|| format!("reading {MAP_POLICY_STATE}"))?;
        // The generation the programs do not read.
        let generation = if current == state_for(0) { 1 } else { 0 };
        self.write(generation, &compiled)?;
        self.state
            .set(0, state_for(generation), 0)
            .with_context(|| format!("writing {MAP_POLICY_STATE}"))?;
        self.active = Some(p.clone());
        Ok(())
    }

    fn write(&mut self, generation: u32, c: &Compiled) -> Result<()> {
        let gen_be = generation.to_be();
        let stale: Vec<Key<[u32; 2]>> = self
            .dst
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.data()[0] == gen_be)
            .collect();
        for k in stale {
            self.dst
                .remove(&k)
                .with_context(|| format!("clearing {MAP_POLICY_DST}"))?;
        }
        let base = generation * RULE_STRIDE;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let zero = || aya::maps::PerCpuValues::try_from(vec![0u64; cpus]);
        for (i, r) in c.rules.iter().enumerate() {
            let idx = base + i as u32;
            self.rules
                .set(idx, *r, 0)
                .with_context(|| format!("writing {MAP_POLICY_RULES}[{idx}]"))?;
            self.hits
                .set(idx, zero().context("per-CPU zeros")?, 0)
                .with_context(|| format!("clearing {MAP_POLICY_HITS}[{idx}]"))?;
        }
        for (prefix, list) in &c.lists {
            let key = Key::new(dst_key_len(prefix.len), dst_key(generation, prefix.raw()));
            self.dst
                .insert(&key, *list, 0)
                .with_context(|| format!("writing {MAP_POLICY_DST} entry {prefix}"))?;
        }
        self.state
            .set(1 + generation, c.rules.len() as u32, 0)
            .with_context(|| format!("writing {MAP_POLICY_STATE}"))
    }

    /// The policy maps of the gateway whose links are pinned in `pins`
    /// (found through the program of its `--int` TCX link), for
    /// `nat-loader policy show`.
    pub fn of_running(pins: &PinDir) -> Result<PolicyMaps> {
        let path = pins.pin(LINK_TCX_INT);
        let link = PinnedLink::from_pin(&path)
            .with_context(|| format!("opening the pinned link {}", path.display()))?;
        let prog_id = FdLink::from(link)
            .info()
            .context("reading the pinned link")?
            .program_id();
        let prog = aya::programs::loaded_programs()
            .filter_map(|p| p.ok())
            .find(|p| p.id() == prog_id)
            .with_context(|| format!("program {prog_id} of the pinned link not found"))?;
        let mut found: std::collections::HashMap<String, MapData> = Default::default();
        for id in prog.map_ids()?.unwrap_or_default() {
            let data = MapData::from_id(id)?;
            if let Some(name) = data.info()?.name_as_str() {
                found.insert(name.to_string(), data);
            }
        }
        let mut take = |name: &str| -> Result<aya::maps::Map> {
            let data = found
                .remove(name)
                .with_context(|| format!("the running gateway's program has no map {name}"))?;
            Ok(aya::maps::Map::from_map_data(data)?)
        };
        Ok(PolicyMaps {
            dst: take(MAP_POLICY_DST)?.try_into()?,
            rules: take(MAP_POLICY_RULES)?.try_into()?,
            state: take(MAP_POLICY_STATE)?.try_into()?,
            hits: take(MAP_POLICY_HITS)?.try_into()?,
            inside: take(MAP_INSIDE_NETS)?.try_into()?,
            active: None,
        })
    }

    /// The active policy as the maps hold it, in order, the default last
    /// (`None`: no policy, everything allowed).
    pub fn show(&self) -> Result<Option<Vec<Shown>>> {
        let state = self
            .state
            .get(&0, 0)
            .with_context(|| format!("reading {MAP_POLICY_STATE}"))?;
        if state == STATE_NONE {
            return Ok(None);
        }
        let generation = (state - 1) & 1;
        let count = self.state.get(&(1 + generation), 0)?;
        let base = generation * RULE_STRIDE;
        let gen_be = generation.to_be();
        // A rule's destination is the shortest prefix whose list holds it
        // (it is on the lists of its own prefix and of those inside it).
        let mut dst: Vec<Option<policy::Prefix>> = vec![None; count as usize];
        for entry in self.dst.iter() {
            let (k, list) = entry.context("reading the destination trie")?;
            if k.data()[0] != gen_be {
                continue;
            }
            let len = (k.prefix_len() - 32) as u8;
            let prefix = policy::Prefix::new(Ipv4Addr::from(k.data()[1].to_ne_bytes()), len);
            for &i in &list.rules[..(list.len as usize).min(policy::MAX_CANDIDATES)] {
                if let Some(d) = dst.get_mut(i as usize)
                    && d.is_none_or(|d| d.len > prefix.len)
                {
                    *d = Some(prefix);
                }
            }
        }
        let mut out = Vec::with_capacity(count as usize);
        for (i, dst) in dst.into_iter().enumerate() {
            let idx = base + i as u32;
            let rule = self.rules.get(&idx, 0)?;
            let hits = self.hits.get(&idx, 0)?.iter().sum();
            out.push(Shown { dst, rule, hits });
        }
        Ok(Some(out))
    }

    /// The flows each rule of the active policy decided since it was
    /// installed: `(rule name, verdict, count)`, the default last.
    pub fn hits(&self) -> Result<Vec<(String, policy::Verdict, u64)>> {
        let Some(p) = &self.active else {
            return Ok(Vec::new());
        };
        let state = self
            .state
            .get(&0, 0)
            .with_context(|| format!("reading {MAP_POLICY_STATE}"))?;
        if state == STATE_NONE {
            return Ok(Vec::new());
        }
        let base = (state - 1) * RULE_STRIDE;
        let names = p
            .rules
            .iter()
            .map(|r| (r.name.clone(), r.verdict))
            .chain(std::iter::once(("default".to_string(), p.default)));
        let mut out = Vec::new();
        for (i, (name, verdict)) in names.enumerate() {
            let idx = base + i as u32;
            let n: u64 = self
                .hits
                .get(&idx, 0)
                .with_context(|| format!("reading {MAP_POLICY_HITS}[{idx}]"))?
                .iter()
                .sum();
            out.push((name, verdict, n));
        }
        Ok(out)
    }

    /// The prefixes new flows' sources must be in (anti-spoofing).
    pub fn set_inside_nets(&mut self, nets: &[(Ipv4Addr, u8)]) -> Result<()> {
        for (addr, len) in nets {
            let p = policy::Prefix::new(*addr, *len);
            self.inside
                .insert(&Key::new(p.len as u32, p.raw()), 1, 0)
                .with_context(|| format!("writing {MAP_INSIDE_NETS} entry {p}"))?;
        }
        Ok(())
    }
}

/// Ends the established flows `p` denies (`nat-loader policy apply
/// --recheck`): their sessions are removed, so their next packet is judged
/// as a new flow's (and answered as its rule says) and replies find no
/// session; the sweeper releases their bindings as usual. Flows opened
/// from outside (through the filtering policy) are not egress and are
/// left alone. Returns how many ended.
pub fn recheck(sessions: &mut HashMap<MapData, CtKey, CtValue>, p: &Policy) -> Result<usize> {
    let all: Vec<(CtKey, CtValue)> = sessions.iter().filter_map(|r| r.ok()).collect();
    let mut ended = 0;
    for (k, v) in all {
        if v.flags & CT_F_INBOUND != 0 {
            continue;
        }
        let src = Ipv4Addr::from(k.src_addr.to_ne_bytes());
        let dst = Ipv4Addr::from(k.dst_addr.to_ne_bytes());
        let port = if k.proto == IPPROTO_ICMP {
            0
        } else {
            u16::from_be(k.dst_port)
        };
        if let (_, policy::Verdict::Deny(_)) = p.decide(src, dst, k.proto, port) {
            // Gone already (expired meanwhile) is fine.
            if sessions.remove(&k).is_ok() {
                ended += 1;
            }
        }
    }
    Ok(ended)
}

/// The process holding the lock of pin directory `dir` (the running
/// loader: `PinDir::lock`), read from `/proc/locks`; `None` if nobody
/// holds it.
pub fn lock_holder(dir: &Path) -> Result<Option<u32>> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    let (major, minor) = (libc::major(m.dev()), libc::minor(m.dev()));
    let locks = std::fs::read_to_string("/proc/locks").context("reading /proc/locks")?;
    for line in locks.lines() {
        // "1: FLOCK  ADVISORY  WRITE 1234 00:1f:5678 0 EOF"
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 || f[1] != "FLOCK" {
            continue;
        }
        let mut id = f[5].split(':');
        let (Some(ma), Some(mi), Some(ino)) = (id.next(), id.next(), id.next()) else {
            continue;
        };
        let same = u32::from_str_radix(ma, 16).is_ok_and(|v| v == major)
            && u32::from_str_radix(mi, 16).is_ok_and(|v| v == minor)
            && ino.parse::<u64>().is_ok_and(|v| v == m.ino());
        if same && let Ok(pid) = f[4].parse() {
            return Ok(Some(pid));
        }
    }
    Ok(None)
}

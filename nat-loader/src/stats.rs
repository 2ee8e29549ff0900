//! Reading the per-CPU verdict counters.

use anyhow::{Context, Result};
use aya::maps::{MapData, PerCpuArray};
use nat_common::{
    Traffic,
    stats::{COUNT, DIRECTIONS, HOOKS, LABELS, TRAFFIC_PROTOS, slot, traffic_slot},
};

/// Counters summed over CPUs: `totals[hook][reason]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub totals: Vec<Vec<u64>>,
}

impl Stats {
    pub fn read<T: std::borrow::Borrow<MapData>>(map: &PerCpuArray<T, u64>) -> Result<Stats> {
        let mut totals = vec![vec![0u64; COUNT as usize]; HOOKS.len()];
        for ((hook, _), row) in HOOKS.iter().zip(totals.iter_mut()) {
            for (reason, total) in (0..COUNT).zip(row.iter_mut()) {
                let idx = slot(*hook, reason);
                let per_cpu = map
                    .get(&idx, 0)
                    .with_context(|| format!("reading stats slot {idx}"))?;
                *total = per_cpu.iter().sum();
            }
        }
        Ok(Stats { totals })
    }

    /// The sum, over every hook and CPU, of the counters of `reasons`
    /// (reads only those slots: cheap enough for every sweep).
    pub fn sum<T: std::borrow::Borrow<MapData>>(
        map: &PerCpuArray<T, u64>,
        reasons: &[u32],
    ) -> Result<u64> {
        let mut total = 0u64;
        for (hook, _) in HOOKS {
            for &r in reasons {
                let idx = slot(hook, r);
                let per_cpu = map
                    .get(&idx, 0)
                    .with_context(|| format!("reading stats slot {idx}"))?;
                total = total.wrapping_add(per_cpu.iter().sum::<u64>());
            }
        }
        Ok(total)
    }

    /// The count of `reason` at `hook`, summed over CPUs, read from the map
    /// (one slot).
    pub fn slot_total<T: std::borrow::Borrow<MapData>>(
        map: &PerCpuArray<T, u64>,
        hook: u32,
        reason: u32,
    ) -> Result<u64> {
        let idx = slot(hook, reason);
        let per_cpu = map
            .get(&idx, 0)
            .with_context(|| format!("reading stats slot {idx}"))?;
        Ok(per_cpu.iter().sum())
    }

    /// The count of `reason` at hook `hook` (an index of nat-common's
    /// `stats::HOOKS`).
    pub fn get(&self, hook: usize, reason: u32) -> u64 {
        self.totals
            .get(hook)
            .and_then(|r| r.get(reason as usize))
            .copied()
            .unwrap_or(0)
    }

    /// One line per hook with its non-zero counters.
    pub fn lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (h, (_, name)) in HOOKS.iter().enumerate() {
            let parts: Vec<String> = LABELS
                .iter()
                .filter(|(r, _)| self.get(h, *r) > 0)
                .map(|(r, label)| format!("{label}={}", self.get(h, *r)))
                .collect();
            if !parts.is_empty() {
                out.push(format!("{name}: {}", parts.join(" ")));
            }
        }
        out
    }
}

/// Packets and bytes forwarded by (direction, protocol), summed over
/// CPUs, in `DIRECTIONS` x `TRAFFIC_PROTOS` order.
pub fn read_traffic<T: std::borrow::Borrow<MapData>>(
    map: &PerCpuArray<T, Traffic>,
) -> Result<Vec<(&'static str, &'static str, Traffic)>> {
    let mut out = Vec::new();
    for (dir, dir_label) in DIRECTIONS {
        for (proto, proto_label) in TRAFFIC_PROTOS {
            let idx = traffic_slot(dir, proto);
            let per_cpu = map
                .get(&idx, 0)
                .with_context(|| format!("reading traffic slot {idx}"))?;
            let sum = Traffic::sum(per_cpu.iter());
            out.push((dir_label, proto_label, sum));
        }
    }
    Ok(out)
}

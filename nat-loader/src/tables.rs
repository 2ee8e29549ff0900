//! How much memory the gateway's maps take for a `--max-flows`, computed
//! from the layouts the way the kernel charges them (its `map_mem_usage`
//! of hash maps and arrays): said up front, and a size that does not fit
//! in the memory available is refused before anything is created.

use anyhow::{Context, Result, bail};
use nat_common::{
    BindExt, BindKey, BindValue, CtKey, CtValue, FILTER_ADDRESS, FragHeld, FragKey, FragSlot,
    FragValue, PAIR_BUCKETS, POOL_MAX, PoolAddr, PoolInfo, frag_held_slots, stats,
};

/// Largest `--max-flows`: 2^24 sessions (about 1.5 GiB of maps).
pub const MAX_FLOWS_LIMIT: u32 = 1 << 24;
/// Share of `MemAvailable` the maps may take (per cent).
pub const MEM_AVAILABLE_PCT: u64 = 90;

/// The kernel's `struct htab_elem` before the key (the hash list node,
/// the hash and the union of the free-list and LRU nodes).
const HTAB_ELEM: u64 = 48;
/// `struct bucket`: a list head and a spin lock.
const HTAB_BUCKET: u64 = 16;

const fn round8(n: usize) -> u64 {
    (n as u64).div_ceil(8) * 8
}

/// A preallocated hash map of `entries` (also LRU ones): buckets (the
/// entries rounded up to a power of two) and one element per entry, plus
/// one spare per CPU.
fn hash(key: usize, value: usize, entries: u32, cpus: u64) -> u64 {
    let elem = HTAB_ELEM + round8(key) + round8(value);
    let buckets = (entries as u64).next_power_of_two();
    buckets * HTAB_BUCKET + (entries as u64 + cpus) * elem
}

fn array(value: usize, entries: u32) -> u64 {
    round8(value) * entries as u64
}

/// The memory of the maps of a gateway, by group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Estimate {
    pub sessions: u64,
    pub bindings: u64,
    /// The address filter, the pool, the fragment tables, the counters.
    pub other: u64,
}

impl Estimate {
    pub fn total(&self) -> u64 {
        self.sessions + self.bindings + self.other
    }

    /// Bytes per session of `--max-flows`.
    pub fn per_flow(&self, max_flows: u32) -> f64 {
        self.total() as f64 / max_flows as f64
    }
}

/// What the maps take for `max_flows` sessions, `max_fragments` and
/// filtering mode `filtering` on a machine of `cpus` possible CPUs. The
/// address filter is counted full when it is on (it grows with use).
pub fn estimate(max_flows: u32, max_fragments: u32, filtering: u8, cpus: u64) -> Estimate {
    let sizes = crate::pins::map_sizes(max_flows, filtering);
    let size = |name: &str| {
        sizes
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, e)| *e)
            .unwrap_or(max_flows)
    };
    let bindings = size(nat_common::MAP_BIND);
    let adf = size(nat_common::MAP_ADF);
    let filter = if filtering == FILTER_ADDRESS {
        (adf as u64).next_power_of_two() * HTAB_BUCKET
            + adf as u64 * (HTAB_ELEM + round8(size_of::<CtKey>()) + 8 + 8)
    } else {
        (adf as u64).next_power_of_two() * HTAB_BUCKET
    };
    let other = filter
        + array(size_of::<PoolInfo>(), 1)
        + array(size_of::<PoolAddr>(), POOL_MAX)
        + array(size_of::<u32>(), PAIR_BUCKETS)
        + hash(
            size_of::<FragKey>(),
            size_of::<FragValue>(),
            max_fragments,
            cpus,
        )
        + hash(
            size_of::<FragSlot>(),
            size_of::<FragHeld>(),
            frag_held_slots(max_fragments),
            cpus,
        )
        + array(size_of::<FragHeld>(), 1) * cpus
        + array(size_of::<u64>(), stats::SLOTS) * cpus;
    Estimate {
        sessions: hash(size_of::<CtKey>(), size_of::<CtValue>(), max_flows, cpus),
        bindings: hash(size_of::<BindKey>(), size_of::<BindExt>(), bindings, cpus)
            + hash(size_of::<BindKey>(), size_of::<BindValue>(), bindings, cpus),
        other,
    }
}

/// `MemAvailable` of /proc/meminfo, in bytes.
pub fn mem_available() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .context("no MemAvailable in /proc/meminfo")
}

/// The number of possible CPUs (per-CPU maps have a copy for each).
pub fn possible_cpus() -> u64 {
    std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| {
            let last = s.trim().rsplit(['-', ',']).next()?.to_string();
            last.parse::<u64>().ok().map(|n| n + 1)
        })
        .unwrap_or(1)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Refuses a table that does not fit: `--max-flows` above
/// [`MAX_FLOWS_LIMIT`], or maps above [`MEM_AVAILABLE_PCT`] % of
/// `available` bytes. Returns the estimate otherwise.
pub fn check(e: &Estimate, max_flows: u32, available: u64) -> Result<()> {
    if max_flows > MAX_FLOWS_LIMIT {
        bail!("--max-flows {max_flows} is above the largest table, {MAX_FLOWS_LIMIT} flows");
    }
    let limit = available / 100 * MEM_AVAILABLE_PCT;
    if e.total() > limit {
        bail!(
            "--max-flows {max_flows} needs {:.0} MiB of map memory ({:.0} bytes per flow), more \
             than {MEM_AVAILABLE_PCT}% of the {:.0} MiB available (MemAvailable): choose a \
             smaller --max-flows",
            mib(e.total()),
            e.per_flow(max_flows),
            mib(available)
        );
    }
    Ok(())
}

/// A line for the log: the estimate by group.
pub fn describe(e: &Estimate, max_flows: u32) -> String {
    format!(
        "{:.1} MiB for {max_flows} flows ({:.0} bytes per flow): sessions {:.1} MiB, bindings \
         {:.1} MiB, the rest {:.1} MiB",
        mib(e.total()),
        e.per_flow(max_flows),
        mib(e.sessions),
        mib(e.bindings),
        mib(e.other)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use nat_common::{DEFAULT_MAX_FRAGMENTS, FILTER_ADDRESS_AND_PORT};

    #[test]
    fn a_million_flows_take_at_most_128_bytes_each() {
        let n = 1 << 20;
        let e = estimate(n, DEFAULT_MAX_FRAGMENTS, FILTER_ADDRESS_AND_PORT, 2);
        // Session: 48 + 16 + 8 bytes of element and a 16-byte bucket.
        assert_eq!(e.sessions, (1 << 20) * 16 + ((1 << 20) + 2) * 72);
        assert!(e.per_flow(n) <= 128.0, "{}", describe(&e, n));
        // Address-dependent filtering adds up to a filter entry per flow.
        let adf = estimate(n, DEFAULT_MAX_FRAGMENTS, FILTER_ADDRESS, 2);
        assert!(adf.total() > e.total() + 64 * (1 << 20));
    }

    #[test]
    fn a_table_larger_than_the_memory_or_the_limit_is_refused_with_the_numbers() {
        let n = 1 << 22;
        let e = estimate(n, DEFAULT_MAX_FRAGMENTS, FILTER_ADDRESS_AND_PORT, 2);
        assert!(check(&e, n, 4 * e.total()).is_ok());
        let err = check(&e, n, e.total()).expect_err("needs more than 90 %");
        let msg = err.to_string();
        assert!(
            msg.contains("--max-flows 4194304 needs") && msg.contains("MemAvailable"),
            "{msg}"
        );
        let big = MAX_FLOWS_LIMIT + 1;
        let e = estimate(big, DEFAULT_MAX_FRAGMENTS, FILTER_ADDRESS_AND_PORT, 2);
        assert!(check(&e, big, u64::MAX).is_err());
    }
}

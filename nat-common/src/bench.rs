//! The benchmark's traffic (`cargo xtask bench`): which 5-tuple the
//! generator (`bench_gen`) writes into its `i`-th packet, and which
//! destination ports the sink (`bench_sink`) counts. Both sides of the
//! kernel/user boundary use it: the eBPF generator to write the packet, the
//! benchmark to size its tables and to know how many distinct flows a run
//! touches.
//!
//! A flow is an inside endpoint (source address and port) talking to a
//! remote port: the endpoint varies fastest, so `n` consecutive packets use
//! `min(n, GEN_ENDPOINTS)` endpoints (the external ports a NAT must bind)
//! and `n / GEN_ENDPOINTS` remotes each (the sessions per binding).

/// Source addresses `10.1.0.16 ..= 10.1.0.31` (in the generator's /24).
pub const GEN_SRC_FIRST: u8 = 16;
pub const GEN_SRC_COUNT: u8 = 16;
/// Source ports `10000 ..`, 1024 per address.
pub const GEN_SPORT_FIRST: u16 = 10_000;
pub const GEN_SPORTS: u16 = 1024;
/// Inside endpoints: far below the 64 k external ports of one address, so
/// port exhaustion never limits a run; sessions grow by remotes instead.
pub const GEN_ENDPOINTS: u64 = GEN_SRC_COUNT as u64 * GEN_SPORTS as u64;
/// UDP destination ports the sink counts (and drops):
/// `SINK_PORT_FIRST .. SINK_PORT_FIRST + SINK_PORTS`.
pub const SINK_PORT_FIRST: u16 = 20_000;
pub const SINK_PORTS: u16 = 16_384;
/// Distinct 5-tuples the generator can write before it repeats.
pub const GEN_TUPLES: u64 = GEN_ENDPOINTS * SINK_PORTS as u64;

/// The generator's state (map `BENCH_GEN`, one entry): the benchmark sets
/// it before a run, `bench_gen` advances it by one per packet sent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct GenConfig {
    /// Index of the next packet's flow (before `flows` wraps it).
    pub next: u64,
    /// Flows to cycle through; 0: every packet a new flow (up to
    /// [`GEN_TUPLES`]).
    pub flows: u64,
    /// Packets sent in this run.
    pub sent: u64,
    /// Send no more than this many in this run (0: no limit).
    pub limit: u64,
    /// Packets per second (0: as fast as the CPU goes). A run paced below
    /// that drops the frames it is early for, so the pace is kept inside
    /// the kernel, one frame at a time, never in bursts.
    pub rate: u64,
    /// `bpf_ktime_get_ns` of the run's first frame (0: not started).
    pub start_ns: u64,
    /// Where the generated frames go (`bpf_redirect`).
    pub ifindex: u32,
    pub _pad: u32,
    /// The frame of flow 0 (the first [`GEN_FRAME_LEN`] bytes), written
    /// over every frame before it is made flow `next`'s: the kernel hands
    /// the generator pages the gateway's path already rewrote (MACs, TTL,
    /// translated addresses), never the pristine copy.
    pub frame: [u8; 64],
}

/// Length of the generated frames: 60 bytes, 64 on the wire with the FCS.
pub const GEN_FRAME_LEN: usize = 60;

impl Default for GenConfig {
    fn default() -> GenConfig {
        bytemuck::Zeroable::zeroed()
    }
}

/// Whether a run paced at `rate` that started at `start_ns` and `sent`
/// packets so far sends one more at `now_ns`; `limit` 0 is no limit.
#[inline(always)]
pub const fn gen_due(c: &GenConfig, now_ns: u64) -> bool {
    if c.limit != 0 && c.sent >= c.limit {
        return false;
    }
    if c.rate == 0 {
        return true;
    }
    // In µs, so that a long run at a high rate cannot overflow.
    let elapsed_us = now_ns.saturating_sub(c.start_ns) / 1000;
    c.sent < elapsed_us * c.rate / 1_000_000 + 1
}

/// The varying fields of one generated packet, host byte order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GenTuple {
    /// Last byte of the source address (`10.1.0.x`).
    pub src_last: u8,
    pub sport: u16,
    pub dport: u16,
}

/// The flow of packet `i` of a run cycling through `flows` (0: no cycle).
#[inline(always)]
pub const fn gen_tuple(i: u64, flows: u64) -> GenTuple {
    let f = if flows == 0 { i } else { i % flows };
    let f = f % GEN_TUPLES;
    let e = f % GEN_ENDPOINTS;
    let r = f / GEN_ENDPOINTS;
    GenTuple {
        src_last: GEN_SRC_FIRST + (e % GEN_SRC_COUNT as u64) as u8,
        sport: GEN_SPORT_FIRST + (e / GEN_SRC_COUNT as u64) as u16,
        dport: SINK_PORT_FIRST + r as u16,
    }
}

/// Whether the sink counts UDP to `dport`.
#[inline(always)]
pub const fn sink_counts(dport: u16) -> bool {
    dport >= SINK_PORT_FIRST && dport - SINK_PORT_FIRST < SINK_PORTS
}

// SAFETY: bytemuck::Pod above: no padding, every bit pattern valid.
#[cfg(feature = "user")]
unsafe impl aya::Pod for GenConfig {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_packets_are_distinct_flows_until_the_tuples_run_out() {
        let mut seen = std::collections::HashSet::new();
        for i in 0..3 * GEN_ENDPOINTS {
            let t = gen_tuple(i, 0);
            assert!(seen.insert(t), "packet {i} repeats {t:?}");
            assert!(sink_counts(t.dport));
            assert!((GEN_SRC_FIRST..GEN_SRC_FIRST + GEN_SRC_COUNT).contains(&t.src_last));
        }
        assert_eq!(gen_tuple(GEN_TUPLES, 0), gen_tuple(0, 0));
        assert!(sink_counts(gen_tuple(GEN_TUPLES - 1, 0).dport));
    }

    #[test]
    fn a_paced_run_sends_what_is_due_and_stops_at_its_limit() {
        let c = GenConfig {
            rate: 1_000_000,
            start_ns: 5_000_000_000,
            sent: 1000,
            ..GenConfig::default()
        };
        // 1 ms in at 1 Mpps: 1000 due, the next one after it.
        assert!(!gen_due(&c, 5_000_999_000));
        assert!(gen_due(&c, 5_001_000_000));
        assert!(gen_due(&GenConfig { rate: 0, ..c }, 0));
        assert!(!gen_due(
            &GenConfig {
                rate: 0,
                limit: 1000,
                ..c
            },
            0
        ));
        assert!(gen_due(
            &GenConfig {
                rate: 0,
                limit: 1001,
                ..c
            },
            0
        ));
    }

    #[test]
    fn a_cycle_of_n_flows_uses_n_tuples_and_few_endpoints() {
        let n = 100_000;
        let tuples: std::collections::HashSet<_> = (0..2 * n).map(|i| gen_tuple(i, n)).collect();
        assert_eq!(tuples.len() as u64, n);
        let endpoints: std::collections::HashSet<_> =
            tuples.iter().map(|t| (t.src_last, t.sport)).collect();
        assert_eq!(endpoints.len() as u64, GEN_ENDPOINTS);
        assert!(!sink_counts(SINK_PORT_FIRST - 1));
        assert!(!sink_counts(SINK_PORT_FIRST + SINK_PORTS));
    }
}

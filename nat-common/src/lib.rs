//! Everything that crosses the kernel/user boundary, defined once: map and
//! program names, map key/value layouts, the load-time configuration and the
//! stats reasons. Also the pure NAT decisions (checksum arithmetic, port
//! choice, TCP state, timeouts) so that the eBPF programs and host unit tests
//! run the very same code.
//!
//! Byte order: addresses and ports inside [`CtKey`] and [`NatConfig::snat_addr`]
//! are kept as they sit in the packet (network order), read and written as raw
//! native integers. That way the fast path never swaps bytes, and the one's
//! complement checksum arithmetic (which is byte-order independent) works on
//! the same raw words.
#![cfg_attr(not(test), no_std)]

pub mod csum;
pub mod layout;
pub mod ports;
pub mod stats;
pub mod tcp;
pub mod timeouts;

pub use layout::*;

/// Default TCP port of the load-balancer health probe listener.
pub const DEFAULT_PROBE_PORT: u16 = 9999;
/// Default external port range for SNAT (inclusive).
pub const DEFAULT_PORT_MIN: u16 = 1024;
pub const DEFAULT_PORT_MAX: u16 = 65535;
/// Default number of flows the conntrack table holds (each flow takes one
/// entry in [`MAP_CT_FWD`] and one in [`MAP_CT_REV`]).
pub const DEFAULT_MAX_FLOWS: u32 = 262_144;

/// Program names as they appear in the eBPF object (the Rust function names).
pub const PROG_XDP_INT: &str = "nat_xdp_int";
pub const PROG_XDP_EXT: &str = "nat_xdp_ext";
pub const PROG_TC_INT: &str = "nat_tc_int";
pub const PROG_TC_EXT: &str = "nat_tc_ext";
pub const PROGRAMS: [&str; 4] = [PROG_XDP_INT, PROG_XDP_EXT, PROG_TC_INT, PROG_TC_EXT];

/// Map names as they appear in the eBPF object.
pub const MAP_CT_FWD: &str = "CT_FWD";
pub const MAP_CT_REV: &str = "CT_REV";
pub const MAP_STATS: &str = "STATS";
pub const MAPS: [&str; 3] = [MAP_CT_FWD, MAP_CT_REV, MAP_STATS];
/// Name of the read-only global holding [`NatConfig`].
pub const GLOBAL_CONFIG: &str = "CONFIG";

/// IP protocol numbers the dataplane translates.
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Benchmark-only programs and maps (`cargo xtask bench`): the forward-only
/// XDP program (the ceiling of the topology), the sink's counter and the
/// generator's redirect. The loader never loads or attaches them.
pub const PROG_XDP_FWD_ONLY: &str = "xdp_fwd_only";
pub const PROG_BENCH_SINK: &str = "bench_sink";
pub const MAP_BENCH_SINK: &str = "BENCH_SINK";
pub const PROG_BENCH_REDIRECT: &str = "bench_redirect";
pub const PROG_BENCH_PASS: &str = "bench_pass";
pub const MAP_BENCH_REDIRECT: &str = "BENCH_REDIRECT";
/// UDP destination port of the benchmark's blast, counted and dropped by
/// [`PROG_BENCH_SINK`].
pub const BENCH_SINK_PORT: u16 = 9;

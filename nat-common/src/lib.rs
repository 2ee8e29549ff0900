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

pub mod addr;
pub mod bench;
pub mod binding;
pub mod csum;
pub mod icmp_rate;
pub mod layout;
pub mod mss;
pub mod policy;
pub mod ports;
pub mod rst;
pub mod stats;
pub mod tcp;
pub mod timeouts;
pub mod trace;

pub use layout::*;

/// Default TCP port of the load-balancer health probe listener.
pub const DEFAULT_PROBE_PORT: u16 = 9999;
/// Default external port range for SNAT (inclusive).
pub const DEFAULT_PORT_MIN: u16 = 1024;
pub const DEFAULT_PORT_MAX: u16 = 65535;
/// Default external range for inside ports below 1024 (RFC 4787 REQ-3a).
/// It starts above the well-known services a gateway runs itself (22, 53,
/// 123, 500, 514…), whose ports must stay the host's.
pub const DEFAULT_LOW_PORT_MIN: u16 = 600;
pub const DEFAULT_LOW_PORT_MAX: u16 = 1023;
/// Default number of sessions the conntrack table holds (one entry each in
/// [`MAP_CT_FWD`]).
pub const DEFAULT_MAX_FLOWS: u32 = 262_144;
/// Most bindings there can be: one per external port and protocol.
pub const MAX_BINDINGS: u32 = 3 * 65_536;
/// How long a released external port stays reserved for its old inside
/// endpoint (RFC 6888 REQ-8: 120 s).
pub const PORT_HOLD_NS: u64 = 120 * 1_000_000_000;

/// Program names as they appear in the eBPF object (the Rust function names).
pub const PROG_XDP_INT: &str = "nat_xdp_int";
pub const PROG_XDP_EXT: &str = "nat_xdp_ext";
pub const PROG_TC_INT: &str = "nat_tc_int";
pub const PROG_TC_EXT: &str = "nat_tc_ext";
/// Not attached: reached by tail call from [`PROG_TC_INT`] through
/// [`MAP_TAILS`].
pub const PROG_TC_HAIRPIN: &str = "nat_tc_hairpin";
pub const PROG_TC_ICMP_OUT: &str = "nat_tc_icmp_out";
/// Not attached: reached by tail call from [`PROG_TC_INT`] when a new flow
/// finds no free external port; answers ICMP Destination Unreachable code
/// 13 (RFC 5508 REQ-8).
pub const PROG_TC_NO_PORT: &str = "nat_tc_no_port";
/// Not attached: reached by tail call from [`PROG_TC_INT`] and
/// [`PROG_TC_EXT`] with a translated SYN to clamp its MSS (`--mss-clamp`)
/// and forward.
pub const PROG_TC_MSS: &str = "nat_tc_mss";
/// Not attached: IP fragments, tail-called from [`PROG_TC_INT`] and
/// [`PROG_TC_EXT`].
pub const PROG_TC_FRAG_INT: &str = "nat_tc_frag_int";
pub const PROG_TC_FRAG_EXT: &str = "nat_tc_frag_ext";
/// Not attached: tail-called from [`PROG_TC_INT`] with the packet of a
/// new TCP flow the egress policy denies with a reset: it goes back to the
/// sender as a RST from the destination.
pub const PROG_TC_POLICY_RST: &str = "nat_tc_policy_rst";
/// Not attached to a NIC: tracing programs on the kernel's XDP tracepoints
/// ([`trace::PROGRAMS`]) that count the redirects the kernel refused our
/// XDP programs (`drop_redirect_refused`).
pub const PROG_TRACE_REDIRECT_ERR: &str = "nat_trace_redirect_err";
pub const PROG_TRACE_DEVMAP_XMIT: &str = "nat_trace_devmap_xmit";
pub const PROG_TRACE_EXCEPTION: &str = "nat_trace_xdp_exception";
pub const PROGRAMS: [&str; 14] = [
    PROG_XDP_INT,
    PROG_XDP_EXT,
    PROG_TC_INT,
    PROG_TC_EXT,
    PROG_TC_HAIRPIN,
    PROG_TC_ICMP_OUT,
    PROG_TC_NO_PORT,
    PROG_TC_MSS,
    PROG_TC_FRAG_INT,
    PROG_TC_FRAG_EXT,
    PROG_TRACE_REDIRECT_ERR,
    PROG_TRACE_DEVMAP_XMIT,
    PROG_TRACE_EXCEPTION,
    PROG_TC_POLICY_RST,
];
/// The tail-call table and its slots.
pub const MAP_TAILS: &str = "TAILS";
pub const TAIL_HAIRPIN: u32 = 0;
pub const TAIL_ICMP_ERROR_OUT: u32 = 1;
pub const TAIL_NO_PORT: u32 = 2;
pub const TAIL_MSS: u32 = 3;
pub const TAIL_FRAG_INT: u32 = 4;
pub const TAIL_FRAG_EXT: u32 = 5;
pub const TAIL_POLICY_RST: u32 = 6;
pub const TAIL_COUNT: u32 = 7;
/// (slot, program) of every tail call.
pub const TAIL_PROGRAMS: [(u32, &str); 7] = [
    (TAIL_HAIRPIN, PROG_TC_HAIRPIN),
    (TAIL_ICMP_ERROR_OUT, PROG_TC_ICMP_OUT),
    (TAIL_NO_PORT, PROG_TC_NO_PORT),
    (TAIL_MSS, PROG_TC_MSS),
    (TAIL_FRAG_INT, PROG_TC_FRAG_INT),
    (TAIL_FRAG_EXT, PROG_TC_FRAG_EXT),
    (TAIL_POLICY_RST, PROG_TC_POLICY_RST),
];

/// Map names as they appear in the eBPF object.
pub const MAP_CT_FWD: &str = "CT_FWD";
pub const MAP_BIND: &str = "NAT_BIND";
pub const MAP_BIND_REV: &str = "NAT_BIND_REV";
/// Remotes each external port has sent to, for address-dependent filtering:
/// key = reply tuple with the remote port zeroed, value = unused.
pub const MAP_ADF: &str = "CT_ADF";
pub const MAP_STATS: &str = "STATS";
/// Per-CPU rate limiter of the out-of-ports ICMP errors (not pinned: a
/// new loader starts with a full bucket).
pub const MAP_ICMP_RATE: &str = "ICMP_RATE";
/// Fragmented datagrams coming in on `--ext` whose first fragment was
/// translated: key [`FragKey`], value [`FragValue`]. An LRU map, so its
/// size (`--max-fragments`) bounds the memory fragments can take.
pub const MAP_FRAG_TRACK: &str = "FRAG_TRACK";
/// Fragments from `--ext` that came before their datagram's first fragment,
/// held until it comes: key [`FragSlot`], value [`FragHeld`]. LRU, a
/// quarter of `--max-fragments` entries (at least [`FRAG_HELD_MAX`]).
pub const MAP_FRAG_HELD: &str = "FRAG_HELD";
/// Scratch room (per-CPU array, one entry) to copy a fragment into
/// before inserting it into [`MAP_FRAG_HELD`]: too big for the stack.
pub const MAP_FRAG_SCRATCH: &str = "FRAG_SCRATCH";
/// How each XDP program forwards (redirect, or hand to TC where the egress
/// NIC cannot take redirected frames) and its program id: an array of two
/// [`XdpEgress`], index the XDP hook. Not pinned: each loader writes its
/// own programs' entries.
pub const MAP_XDP_EGRESS: &str = "XDP_EGRESS";
/// Per CPU and XDP hook, how many frames the program redirected (native
/// mode) that the kernel has neither refused nor flushed from its bulk
/// queue yet: how the tracing programs tell a flush of our frames from
/// another namespace's with the same interface indexes. Not pinned.
pub const MAP_XDP_PENDING: &str = "XDP_PENDING";
/// Egress policy ([`policy`]): the destination trie (key
/// [`policy::dst_key`], value [`policy::PolicyList`]), the rules
/// ([`policy::PolicyRule`], by generation and index), which generation is
/// active (u32 at index 0, [`policy::STATE_NONE`]: no policy; at 1 + g,
/// generation g's rule count with the default) and the per-CPU hit
/// count of each rule (same index as the rules). Not pinned: every loader
/// writes its policy before its programs see a packet.
pub const MAP_POLICY_DST: &str = "POLICY_DST";
pub const MAP_POLICY_RULES: &str = "POLICY_RULES";
pub const MAP_POLICY_STATE: &str = "POLICY_STATE";
pub const MAP_POLICY_HITS: &str = "POLICY_HITS";
/// Anti-spoofing (BCP 38): the prefixes a new flow's inside source must be
/// in (`--int`'s subnets and `--internal-cidr`s), an LPM trie keyed by
/// the address (network order), value unused. Checked when [`CFG_F_ANTI_SPOOFING`] is set.
pub const MAP_INSIDE_NETS: &str = "INSIDE_NETS";
/// Packets and bytes forwarded, by direction and protocol: a per-CPU
/// array of [`stats::TRAFFIC_SLOTS`] [`Traffic`], index
/// [`stats::traffic_slot`]. Pinned, like the counters.
pub const MAP_TRAFFIC: &str = "TRAFFIC";
/// The translation log's ring buffer (`--translation-log`): a
/// [`TranslogEvent`] per binding created and per new flow refused for want
/// of a port. Not pinned: each loader reads its own programs' events.
pub const MAP_TRANSLOG: &str = "TRANSLOG";
/// Its size in bytes (a power of two, a multiple of the page size): room
/// for about 10 000 events between two reads.
pub const TRANSLOG_BYTES: u32 = 256 * 1024;
/// The SNAT address pool: one [`PoolInfo`] (how many addresses are
/// active, the range they span).
pub const MAP_POOL: &str = "NAT_POOL";
/// The pool's addresses: an array of [`POOL_MAX`] [`PoolAddr`] slots,
/// active or draining; sessions and bindings name their external address
/// by its slot.
pub const MAP_POOL_ADDRS: &str = "NAT_POOL_ADDRS";
/// Paired pooling (RFC 4787 REQ-2): [`PAIR_BUCKETS`] slots of the pool,
/// indexed by [`pair_bucket`] of the inside address; the loader spreads
/// the active addresses over them.
pub const MAP_POOL_PAIR: &str = "NAT_PAIR";
/// Default number of fragmented datagrams tracked at once.
pub const DEFAULT_MAX_FRAGMENTS: u32 = 4096;

/// How many fragments can be held for `max_fragments` tracked datagrams.
pub const fn frag_held_slots(max_fragments: u32) -> u32 {
    let q = max_fragments / 4;
    if q < FRAG_HELD_MAX { FRAG_HELD_MAX } else { q }
}
/// Every map of the gateway's object.
pub const MAPS: [&str; 22] = [
    MAP_CT_FWD,
    MAP_BIND,
    MAP_BIND_REV,
    MAP_ADF,
    MAP_STATS,
    MAP_TAILS,
    MAP_ICMP_RATE,
    MAP_FRAG_TRACK,
    MAP_FRAG_HELD,
    MAP_FRAG_SCRATCH,
    MAP_XDP_EGRESS,
    MAP_XDP_PENDING,
    MAP_POLICY_DST,
    MAP_POLICY_RULES,
    MAP_POLICY_STATE,
    MAP_POLICY_HITS,
    MAP_INSIDE_NETS,
    MAP_TRAFFIC,
    MAP_TRANSLOG,
    MAP_POOL,
    MAP_POOL_ADDRS,
    MAP_POOL_PAIR,
];
/// The maps a pin directory keeps, so that a new loader adopts the flows
/// and the counters. Not the tail-call table (each loader fills its own
/// with its own programs), the rate limiter (a new loader starts with a
/// full bucket) nor the fragment tables (datagrams in flight, which a
/// restart merely makes the receivers discard). The pool, since sessions
/// and bindings name their address by its slot.
pub const PINNED_MAPS: [&str; 9] = [
    MAP_CT_FWD,
    MAP_BIND,
    MAP_BIND_REV,
    MAP_ADF,
    MAP_STATS,
    MAP_TRAFFIC,
    MAP_POOL,
    MAP_POOL_ADDRS,
    MAP_POOL_PAIR,
];
/// The programs the loader attaches, one XDP and one TC program per NIC.
pub const ATTACHED_PROGRAMS: [&str; 4] = [PROG_XDP_INT, PROG_XDP_EXT, PROG_TC_INT, PROG_TC_EXT];
/// Name of the read-only global holding [`NatConfig`].
pub const GLOBAL_CONFIG: &str = "CONFIG";

/// IP protocol numbers the dataplane translates.
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Benchmark-only programs and maps (`cargo xtask bench`): the forward-only
/// XDP program (the ceiling of the topology), the sink's counter and the
/// generator (run through BPF_PROG_RUN's live frames; its traffic: [`bench`]).
/// The loader never loads or attaches them.
pub const PROG_XDP_FWD_ONLY: &str = "xdp_fwd_only";
pub const PROG_BENCH_SINK: &str = "bench_sink";
pub const MAP_BENCH_SINK: &str = "BENCH_SINK";
pub const PROG_BENCH_GEN: &str = "bench_gen";
pub const PROG_BENCH_PASS: &str = "bench_pass";
pub const MAP_BENCH_GEN: &str = "BENCH_GEN";

//! Maps and the load-time configuration. Names, key and value types come from
//! nat-common; the sizes here are placeholders the loader overrides.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
};
use nat_common::{
    BindExt, BindKey, BindValue, CtKey, CtValue, DEFAULT_MAX_FLOWS, DEFAULT_MAX_FRAGMENTS,
    FragHeld, FragKey, FragSlot, FragValue, MAX_BINDINGS, NatConfig, PAIR_BUCKETS, POOL_MAX,
    PoolAddr, PoolInfo, Traffic, XdpEgress, frag_held_slots,
    policy::{self, PolicyList, PolicyRule},
};

/// Sessions, keyed by the inside tuple as it arrives on `--int`.
#[map(name = "CT_FWD")]
pub static CT_FWD: HashMap<CtKey, CtValue> = HashMap::with_max_entries(DEFAULT_MAX_FLOWS, 0);

/// Bindings by inside endpoint: which external port it has.
#[map(name = "NAT_BIND")]
pub static NAT_BIND: HashMap<BindKey, BindExt> = HashMap::with_max_entries(MAX_BINDINGS, 0);

/// Bindings by external endpoint: which inside endpoint owns the port.
#[map(name = "NAT_BIND_REV")]
pub static NAT_BIND_REV: HashMap<BindKey, BindValue> = HashMap::with_max_entries(MAX_BINDINGS, 0);

/// The SNAT pool as a whole (one entry): written by the loader.
#[map(name = "NAT_POOL")]
pub static NAT_POOL: Array<PoolInfo> = Array::with_max_entries(1, 0);

/// The pool's addresses, by slot: active or draining.
#[map(name = "NAT_POOL_ADDRS")]
pub static NAT_POOL_ADDRS: Array<PoolAddr> = Array::with_max_entries(POOL_MAX, 0);

/// Paired pooling: the slot of each bucket of inside addresses.
#[map(name = "NAT_PAIR")]
pub static NAT_PAIR: Array<u32> = Array::with_max_entries(PAIR_BUCKETS, 0);

/// Address-dependent filtering: remotes each external port has sent to.
/// Not preallocated: only `--filtering address-dependent` fills it, so in
/// the other modes it costs no memory.
#[map(name = "CT_ADF")]
pub static CT_ADF: HashMap<CtKey, u8> =
    HashMap::with_max_entries(DEFAULT_MAX_FLOWS, BPF_F_NO_PREALLOC);

/// Fragmented datagrams from `--ext` whose first fragment was translated,
/// so that the following ones (no L4 header) find their inside address.
/// LRU: a full table forgets the oldest datagram rather than refusing a
/// new one; its size (`--max-fragments`) is the fragment budget.
#[map(name = "FRAG_TRACK")]
pub static FRAG_TRACK: LruHashMap<FragKey, FragValue> =
    LruHashMap::with_max_entries(DEFAULT_MAX_FRAGMENTS, 0);

/// Fragments from `--ext` that came before their first fragment, until it
/// comes (frag.rs). LRU: a full table forgets the oldest.
#[map(name = "FRAG_HELD")]
pub static FRAG_HELD: LruHashMap<FragSlot, FragHeld> =
    LruHashMap::with_max_entries(frag_held_slots(DEFAULT_MAX_FRAGMENTS), 0);

/// Where a fragment is copied before it goes into `FRAG_HELD`: too big
/// for the stack.
#[map(name = "FRAG_SCRATCH")]
pub static FRAG_SCRATCH: PerCpuArray<FragHeld> = PerCpuArray::with_max_entries(1, 0);

/// Programs the TC path tail-calls into (each gets a stack of its own):
/// indexes `nat_common::TAIL_*`. Filled by the loader.
#[map(name = "TAILS")]
pub static TAILS: ProgramArray = ProgramArray::with_max_entries(nat_common::TAIL_COUNT, 0);

/// Packet counters: index `nat_common::stats::slot(hook, reason)`.
#[map(name = "STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(nat_common::stats::SLOTS, 0);

/// State of the per-CPU rate limit of out-of-ports ICMP errors
/// ([`nat_common::icmp_rate`]).
#[map(name = "ICMP_RATE")]
pub static ICMP_RATE: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Packets and bytes forwarded, by direction and protocol: index
/// `nat_common::stats::traffic_slot(dir, proto)`.
#[map(name = "TRAFFIC")]
pub static TRAFFIC: PerCpuArray<Traffic> =
    PerCpuArray::with_max_entries(nat_common::stats::TRAFFIC_SLOTS, 0);

/// The translation log (`--translation-log`): bindings created and new
/// flows refused for want of a port (translog.rs).
#[map(name = "TRANSLOG")]
pub static TRANSLOG: RingBuf = RingBuf::with_byte_size(nat_common::TRANSLOG_BYTES, 0);

/// How each XDP program forwards, and its id (index: its hook). Written by
/// the loader, at start and whenever a NIC changes what it can take.
#[map(name = "XDP_EGRESS")]
pub static XDP_EGRESS: Array<XdpEgress> = Array::with_max_entries(2, 0);

/// Per CPU and XDP hook: frames redirected in native mode and not yet
/// refused or flushed from the kernel's bulk queue (refused.rs).
#[map(name = "XDP_PENDING")]
pub static XDP_PENDING: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

/// Egress policy (nat_common::policy): destination trie of both
/// generations (key data: `policy::dst_key`). LPM tries are never
/// preallocated.
#[map(name = "POLICY_DST")]
pub static POLICY_DST: LpmTrie<[u32; 2], PolicyList> =
    LpmTrie::with_max_entries(policy::DST_ENTRIES, BPF_F_NO_PREALLOC);

/// The rules of both generations (index: generation * RULE_STRIDE + rule).
#[map(name = "POLICY_RULES")]
pub static POLICY_RULES: Array<PolicyRule> = Array::with_max_entries(2 * policy::RULE_STRIDE, 0);

/// Which generation is active (nat_common::policy::state_for), or none;
/// then each generation's rule count (for `nat-loader policy show`).
#[map(name = "POLICY_STATE")]
pub static POLICY_STATE: Array<u32> = Array::with_max_entries(3, 0);

/// Flows each rule decided, per CPU (same index as POLICY_RULES).
#[map(name = "POLICY_HITS")]
pub static POLICY_HITS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(2 * policy::RULE_STRIDE, 0);

/// Anti-spoofing: the inside prefixes (key: the address, network order).
#[map(name = "INSIDE_NETS")]
pub static INSIDE_NETS: LpmTrie<u32, u8> = LpmTrie::with_max_entries(256, BPF_F_NO_PREALLOC);

/// Written by the loader at load time (`EbpfLoader::set_global`).
#[unsafe(no_mangle)]
static CONFIG: NatConfig = NatConfig {
    int_ifindex: 0,
    ext_ifindex: 0,
    snat_addr: 0,
    port_min: 0,
    port_max: 0,
    low_port_min: 0,
    low_port_max: 0,
    filtering: 0,
    flags: 0,
    probe_port: 0,
    int_mac: [0; 6],
    ext_mac: [0; 6],
    int_addr: 0,
    mss_clamp: 0,
    _pad: [0; 2],
};

#[inline(always)]
pub fn config() -> &'static NatConfig {
    // Through an opaque pointer: the value is patched into the object after
    // compilation, so the compiler must not fold the zeros above into the
    // code; and reading the fields in place keeps the whole struct off the
    // programs' 512-byte stacks.
    unsafe { &*core::hint::black_box(&raw const CONFIG) }
}

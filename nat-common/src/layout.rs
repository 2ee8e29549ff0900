//! `#[repr(C)]` layouts of the maps and the configuration. Every struct
//! derives `bytemuck::Pod`, so implicit padding is a compile error; padding
//! is explicit and always zeroed, because hash map keys are compared bytewise.

use core::net::Ipv4Addr;

use bytemuck::{Pod, Zeroable};

/// One direction of a flow, as the packet carries it on the wire.
///
/// Sessions ([`crate::MAP_CT_FWD`]) are keyed by the inside tuple as it
/// arrives on `--int`; a session's `peer` is the reply tuple expected on
/// `--ext` (source = remote, destination = SNAT address and port). For ICMP
/// echo the identifier stands in the port of the inside end and the remote
/// "port" is 0. Addresses and ports are in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct CtKey {
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl CtKey {
    pub const fn new(
        proto: u8,
        src_addr: u32,
        src_port: u16,
        dst_addr: u32,
        dst_port: u16,
    ) -> Self {
        CtKey {
            src_addr,
            dst_addr,
            src_port,
            dst_port,
            proto,
            _pad: [0; 3],
        }
    }
}

/// Version of the layouts of the pinned maps (keys, values, what their
/// fields mean). Recorded in the pin directory; a loader finding pins of
/// another version refuses to adopt them (`nat-loader check-adoption`
/// tells beforehand). Raise it with every change of a pinned map's layout
/// or encoding.
///
/// 2: 8-byte sessions (coarse time, pool index), 12-byte external binding
/// halves and 4-byte inside halves, the SNAT address pool.
pub const LAYOUT_VERSION: u32 = 2;

/// Time in the maps: CLOCK_MONOTONIC in ticks of 2^[`TICK_SHIFT`] ns
/// (16.8 ms), as a wrapping `u32` (wraps every 2.3 years of uptime; ages
/// are computed with wrapping arithmetic, so a wrap is harmless while
/// entries live less than half that). Coarse on purpose: it halves a
/// session's value, and no timeout needs finer.
pub const TICK_SHIFT: u32 = 24;
/// One tick, in ns.
pub const TICK_NS: u64 = 1 << TICK_SHIFT;

/// The tick of CLOCK_MONOTONIC time `ns`.
#[inline(always)]
pub const fn ticks(ns: u64) -> u32 {
    (ns >> TICK_SHIFT) as u32
}

/// How long ago (ns) tick `then` was at `now_ns`, or `None` if it is after
/// it (a packet stamped the entry after the caller read its clock).
#[inline(always)]
pub const fn age_ns(then: u32, now_ns: u64) -> Option<u64> {
    let d = ticks(now_ns).wrapping_sub(then) as i32;
    if d < 0 {
        None
    } else {
        Some((d as u64) << TICK_SHIFT)
    }
}

/// `CtValue::flags`: the session was opened from outside (endpoint- or
/// address-dependent filtering let an inbound packet in).
pub const CT_F_INBOUND: u8 = 1;
/// `CtValue::flags`: the session was answered: a packet went the other way
/// than the one that opened it (for an outbound session, a reply came in).
/// Set once by the dataplane. Sessions without it are the first the
/// sweeper evicts under table pressure, and the bindings they alone used
/// are freed without the RFC 6888 hold (nobody outside ever talked to them).
pub const CT_F_REPLIED: u8 = 2;
/// `CtValue::flags` above these bits: the index of the session's external
/// address in the pool ([`crate::MAP_POOL_ADDRS`]).
pub const CT_POOL_SHIFT: u32 = 2;
/// The flag bits of `CtValue::flags` (the rest is the pool index).
pub const CT_F_MASK: u8 = (1 << CT_POOL_SHIFT) - 1;

/// A session (one inside endpoint talking to one remote endpoint), keyed by
/// the inside tuple ([`CtKey`]); the reply tuple expected on `--ext` is
/// that key's remote with the external address and port. 8 bytes: at
/// millions of flows the session table is most of the gateway's memory.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct CtValue {
    /// Tick ([`ticks`]) of the last packet that refreshed the session.
    pub last_seen: u32,
    /// External port (or ICMP identifier), network order.
    pub ext_port: u16,
    /// TCP state bits ([`crate::tcp`]).
    pub tcp_state: u8,
    /// `CT_F_*` bits, and the pool index above [`CT_POOL_SHIFT`].
    pub flags: u8,
}

impl CtValue {
    /// A session translated to pool address `pool` and port `ext_port`
    /// (network order), last seen at tick `last_seen`.
    pub const fn new(pool: u32, ext_port: u16, last_seen: u32, tcp_state: u8, flags: u8) -> Self {
        CtValue {
            last_seen,
            ext_port,
            tcp_state,
            flags: (flags & CT_F_MASK) | ((pool as u8) << CT_POOL_SHIFT),
        }
    }

    /// Index of the external address in the pool.
    pub const fn pool(&self) -> u32 {
        (self.flags >> CT_POOL_SHIFT) as u32
    }

    // Readers outside the dataplane (the conntrack CLI, the sweeper's
    // summary) decode a session through these, so that the value's layout
    // can change without them.

    /// How long (ns, to a tick) the session has been idle at
    /// CLOCK_MONOTONIC time `now_ns` (0 if a packet came after `now_ns`).
    pub const fn idle_ns(&self, now_ns: u64) -> u64 {
        match age_ns(self.last_seen, now_ns) {
            Some(ns) => ns,
            None => 0,
        }
    }

    /// TCP state bits ([`crate::tcp`]); 0 for other protocols.
    pub const fn tcp_bits(&self) -> u8 {
        self.tcp_state
    }

    /// Opened by an inbound packet ([`CT_F_INBOUND`]).
    pub const fn inbound(&self) -> bool {
        self.flags & CT_F_INBOUND != 0
    }

    /// Answered ([`CT_F_REPLIED`]).
    pub const fn replied(&self) -> bool {
        self.flags & CT_F_REPLIED != 0
    }
}

/// An endpoint: the key of both binding maps. In [`crate::MAP_BIND`] it is
/// the inside endpoint (address, port or ICMP identifier); in
/// [`crate::MAP_BIND_REV`] the external one (SNAT address, external port).
/// Network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct BindKey {
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

impl BindKey {
    pub const fn new(proto: u8, addr: u32, port: u16) -> Self {
        BindKey {
            addr,
            port,
            proto,
            _pad: 0,
        }
    }
}

/// `BindValue::flags`: no session uses this binding any more; it is held
/// (RFC 6888: a freed external port is not reused by another endpoint for
/// 2 minutes) and lets nothing in. An outbound packet of the same inside
/// endpoint takes it back.
pub const BIND_F_RELEASED: u8 = 1;
/// `BindValue::flags`, with [`BIND_F_RELEASED`]: the binding's sessions were
/// all unanswered (or evicted under pressure after a reset), so nobody
/// outside can still be talking to the port: the sweeper frees it at its
/// next pass instead of holding it. Cleared with `BIND_F_RELEASED` when the
/// endpoint takes the binding back.
pub const BIND_F_NO_HOLD: u8 = 2;

/// The external half of a binding, value of [`crate::MAP_BIND_REV`] (key:
/// the external endpoint): the inside endpoint that owns the port, and the
/// binding's state.
///
/// A binding (RFC 4787's "mapping") is endpoint-independent: one inside
/// endpoint has one external port whatever the remote, so every session of
/// that endpoint shares it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BindValue {
    /// The inside endpoint, network order.
    pub addr: u32,
    pub port: u16,
    pub flags: u8,
    pub _pad: u8,
    /// Tick ([`ticks`]): with [`BIND_F_RELEASED`], when the sweeper
    /// released it; without, when a session last claimed it (the sweeper
    /// does not release a binding claimed during its pass; see
    /// [`crate::binding`]).
    pub stamp: u32,
}

/// The inside half of a binding, value of [`crate::MAP_BIND`] (key: the
/// inside endpoint): its external port and address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BindExt {
    /// External port, network order.
    pub port: u16,
    /// Index of the external address in the pool.
    pub pool: u8,
    pub _pad: u8,
}

/// Most addresses in the SNAT pool: the pool index has 6 bits in a
/// session ([`CT_POOL_SHIFT`]).
pub const POOL_MAX: u32 = 64;
/// [`PoolAddr::state`]: the slot is unused.
pub const POOL_FREE: u32 = 0;
/// [`PoolAddr::state`]: new flows may get this address.
pub const POOL_ACTIVE: u32 = 1;
/// [`PoolAddr::state`]: removed from the pool; the flows that have it keep
/// it until they end, no new flow gets it.
pub const POOL_DRAINING: u32 = 2;

/// One slot of the SNAT address pool ([`crate::MAP_POOL_ADDRS`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct PoolAddr {
    /// Network order.
    pub addr: u32,
    /// `POOL_FREE`, `POOL_ACTIVE` or `POOL_DRAINING`.
    pub state: u32,
}

impl PoolAddr {
    pub const fn new(addr: Ipv4Addr, state: u32) -> PoolAddr {
        PoolAddr {
            addr: u32::from_ne_bytes(addr.octets()),
            state,
        }
    }

    pub const fn ip(&self) -> Ipv4Addr {
        let o = self.addr.to_ne_bytes();
        Ipv4Addr::new(o[0], o[1], o[2], o[3])
    }
}

/// The pool as a whole ([`crate::MAP_POOL`], one entry), written by the
/// loader after the slots.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct PoolInfo {
    /// Active addresses (0: new flows are dropped, `drop_no_snat_address`).
    pub active: u32,
    /// Lowest and highest address of any used slot, host order: a packet
    /// to an address outside that range is to none of ours, decided
    /// without a lookup.
    pub lo: u32,
    pub hi: u32,
    /// Raised at each change, for the logs.
    pub generation: u32,
}

impl PoolInfo {
    /// Whether `addr` (network order) may be one of the pool's.
    #[inline(always)]
    pub const fn may_own(&self, addr: u32) -> bool {
        let h = u32::from_be(addr);
        h >= self.lo && h <= self.hi && self.hi != 0
    }
}

/// How many buckets inside addresses are hashed into to pick their
/// external address ([`crate::MAP_POOL_PAIR`]).
pub const PAIR_BUCKETS: u32 = 65_536;

/// The bucket of inside address `addr` (network order) in
/// [`crate::MAP_POOL_PAIR`]: every endpoint of one inside host lands in
/// the same bucket, so all its bindings get one external address (paired
/// pooling, RFC 4787 REQ-2).
#[inline(always)]
pub const fn pair_bucket(addr: u32) -> u32 {
    // Fibonacci hashing: neighbouring addresses spread over the buckets.
    u32::from_be(addr).wrapping_mul(0x9E37_79B9) >> 16
}

impl BindValue {
    /// The other end: (address, port), network order.
    pub const fn addr_port(&self) -> (u32, u16) {
        (self.addr, self.port)
    }

    /// Released: no session uses it, held for its endpoint
    /// ([`BIND_F_RELEASED`]).
    pub const fn released(&self) -> bool {
        self.flags & BIND_F_RELEASED != 0
    }
}

/// [`TranslogEvent::kind`]: an inside endpoint got an external port.
pub const TRANSLOG_CREATED: u8 = 1;
/// [`TranslogEvent::kind`]: a new flow found no free external port
/// (`ext_*` are 0).
pub const TRANSLOG_NO_PORT: u8 = 2;

/// One record of [`crate::MAP_TRANSLOG`]. Addresses and ports in network
/// order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TranslogEvent {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    pub inside_addr: u32,
    pub ext_addr: u32,
    pub inside_port: u16,
    pub ext_port: u16,
    /// `TRANSLOG_*`.
    pub kind: u8,
    pub proto: u8,
    pub _pad: [u8; 2],
}

/// One entry of [`crate::MAP_TRAFFIC`]: packets forwarded and their bytes
/// (whole frames as they left).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
}

impl Traffic {
    /// The sum of per-CPU entries (counters wrap, as the kernel's do).
    pub fn sum<'a>(per_cpu: impl IntoIterator<Item = &'a Traffic>) -> Traffic {
        per_cpu
            .into_iter()
            .fold(Traffic::default(), |a, t| Traffic {
                packets: a.packets.wrapping_add(t.packets),
                bytes: a.bytes.wrapping_add(t.bytes),
            })
    }
}

/// A fragmented datagram as its fragments carry it on `--ext`: the IP
/// identification is the same in every fragment (RFC 791). Network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FragKey {
    pub src_addr: u32,
    pub dst_addr: u32,
    pub id: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// Where the following fragments of a tracked datagram go: the inside
/// address its first fragment was translated to; the datagram's own
/// destination if it is the gateway's (they go to the kernel); 0 while the
/// first fragment has not come, `held` fragments waiting for it in
/// [`crate::MAP_FRAG_HELD`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FragValue {
    pub inside_addr: u32,
    pub held: u32,
    /// `bpf_ktime_get_ns()` of the first fragment that came.
    pub first_seen_ns: u64,
}

/// A fragment held for its first fragment: the `index`th of its datagram.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FragSlot {
    pub key: FragKey,
    pub index: u32,
}

/// Room for one held fragment: a whole frame of a 1500-byte MTU link. A
/// power of two, so that a mask proves the length to the verifier.
pub const FRAG_HELD_LEN: usize = 2048;
/// Most fragments of one datagram held for its first fragment.
pub const FRAG_HELD_MAX: u32 = 8;

/// A fragment held for its first fragment, the frame as it came.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct FragHeld {
    pub len: u32,
    /// `FRAG_HELD_LEN` bytes (nested: bytemuck is Pod for these sizes).
    pub data: [[u8; 512]; 4],
}

/// How an XDP program sends what it translated out of the other NIC, and
/// the kernel's id of that program: [`crate::MAP_XDP_EGRESS`], indexed by
/// the program's hook (`stats::HOOK_XDP_INT`, `stats::HOOK_XDP_EXT`).
/// Written by the loader before it attaches the program and whenever a NIC
/// changes; read by the XDP program for each packet it forwards and by the
/// tracing programs, which recognise the program's refused redirects by its
/// id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct XdpEgress {
    /// One of the `XDP_EGRESS_*` modes.
    pub mode: u32,
    /// The XDP program's id (0: not known yet; no refusal is counted).
    pub prog_id: u32,
}

/// [`XdpEgress::mode`]: redirect, native XDP. The egress NIC takes the
/// frame through its `ndo_xdp_xmit`; frames wait in a per-CPU bulk queue
/// until the end of the NAPI poll, where the NIC may still refuse them (the
/// tracing programs count those from the queue's flush).
pub const XDP_EGRESS_REDIRECT: u32 = 0;
/// Redirect, XDP in generic (skb) mode: the kernel sends the packet as an
/// skb, which every NIC takes; no `ndo_xdp_xmit`, no bulk queue.
pub const XDP_EGRESS_REDIRECT_SKB: u32 = 1;
/// The egress NIC cannot take redirected XDP frames: hand the packet,
/// untouched, to TC (`XDP_PASS`, `xdp_to_tc_no_xdp_xmit`).
pub const XDP_EGRESS_TO_TC: u32 = 2;
/// `(mode, label)` of every mode, as the loader logs them.
pub const XDP_EGRESS_MODES: [(u32, &str); 3] = [
    (XDP_EGRESS_REDIRECT, "redirect"),
    (XDP_EGRESS_REDIRECT_SKB, "redirect_skb"),
    (XDP_EGRESS_TO_TC, "to_tc"),
];

/// Label of an [`XdpEgress::mode`].
pub fn xdp_egress_label(mode: u32) -> &'static str {
    XDP_EGRESS_MODES
        .iter()
        .find(|(m, _)| *m == mode)
        .map(|(_, l)| *l)
        .unwrap_or("unknown")
}

/// How inbound packets that match a binding but no session are treated
/// (RFC 4787 section 5, `--filtering`).
pub const FILTER_ADDRESS_AND_PORT: u8 = 0;
pub const FILTER_ADDRESS: u8 = 1;
pub const FILTER_ENDPOINT_INDEPENDENT: u8 = 2;

/// `NatConfig::flags`: inbound UDP packets refresh the session's timer too
/// (RFC 4787 REQ-6 allows it; outbound refresh is always on).
pub const CFG_F_UDP_INBOUND_REFRESH: u8 = 1;
/// `NatConfig::flags`: anti-spoofing (BCP 38): a new outbound flow whose
/// source is in none of [`crate::MAP_INSIDE_NETS`]'s prefixes is dropped
/// (`drop_spoofed_source`).
pub const CFG_F_ANTI_SPOOFING: u8 = 2;
/// `NatConfig::flags`: emit translation-log events into
/// [`crate::MAP_TRANSLOG`] (`--translation-log`). The top bit, so that
/// flags added elsewhere in the meantime stay clear of it.
pub const CFG_F_TRANSLOG: u8 = 0x80;

/// Load-time configuration, written by the loader into the read-only global
/// [`crate::GLOBAL_CONFIG`] of the eBPF object.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct NatConfig {
    pub int_ifindex: u32,
    pub ext_ifindex: u32,
    /// SNAT address, network byte order.
    pub snat_addr: u32,
    /// External port range for inside ports >= 1024, inclusive, host byte
    /// order.
    pub port_min: u16,
    pub port_max: u16,
    /// External port range for inside ports < 1024 (RFC 4787 REQ-3a).
    pub low_port_min: u16,
    pub low_port_max: u16,
    /// One of the `FILTER_*` constants.
    pub filtering: u8,
    /// `CFG_F_*` bits.
    pub flags: u8,
    /// The health-probe port (network order, 0 = none): never handed out
    /// as an external port, so probes always reach the gateway itself.
    pub probe_port: u16,
    /// The NICs' MAC addresses: XDP leaves frames addressed to another
    /// machine to the kernel (which drops them), as a NIC outside
    /// promiscuous mode would never have delivered them. All zero: no check.
    pub int_mac: [u8; 6],
    pub ext_mac: [u8; 6],
    /// Primary IPv4 address of `--int` (network order, 0 = none): source of
    /// the ICMP errors the gateway itself sends inside (out of ports).
    pub int_addr: u32,
    /// Largest TCP MSS option a SYN or SYN-ACK may carry through the
    /// gateway (host order, 0 = no clamping).
    pub mss_clamp: u16,
    pub _pad: [u8; 2],
}

impl NatConfig {
    /// The configuration of a gateway translating from NIC `int_ifindex`
    /// out of NIC `ext_ifindex` to `snat`, with every other setting at its
    /// default (the loader's flags' defaults): change them with the
    /// `with_*` methods. The one way the loader, the test fixtures and the
    /// benchmark build it, so that each field's encoding (byte order, 0 for
    /// "none") is decided here only.
    pub const fn new(int_ifindex: u32, ext_ifindex: u32, snat: Ipv4Addr) -> NatConfig {
        NatConfig {
            int_ifindex,
            ext_ifindex,
            snat_addr: u32::from_ne_bytes(snat.octets()),
            port_min: crate::DEFAULT_PORT_MIN,
            port_max: crate::DEFAULT_PORT_MAX,
            low_port_min: crate::DEFAULT_LOW_PORT_MIN,
            low_port_max: crate::DEFAULT_LOW_PORT_MAX,
            filtering: FILTER_ADDRESS_AND_PORT,
            flags: 0,
            probe_port: crate::DEFAULT_PROBE_PORT.to_be(),
            int_mac: [0; 6],
            ext_mac: [0; 6],
            int_addr: 0,
            mss_clamp: 0,
            _pad: [0; 2],
        }
    }

    /// External ports for inside ports >= 1024 (inclusive, host order).
    pub const fn with_ports(mut self, min: u16, max: u16) -> NatConfig {
        self.port_min = min;
        self.port_max = max;
        self
    }

    /// External ports for inside ports < 1024 (inclusive, host order).
    pub const fn with_low_ports(mut self, min: u16, max: u16) -> NatConfig {
        self.low_port_min = min;
        self.low_port_max = max;
        self
    }

    /// One of the `FILTER_*` constants.
    pub const fn with_filtering(mut self, filtering: u8) -> NatConfig {
        self.filtering = filtering;
        self
    }

    /// `CFG_F_*` bits.
    pub const fn with_flags(mut self, flags: u8) -> NatConfig {
        self.flags = flags;
        self
    }

    /// The health-probe port (host order; 0: none), never handed out as an
    /// external port.
    pub const fn with_probe_port(mut self, port: u16) -> NatConfig {
        self.probe_port = port.to_be();
        self
    }

    /// The NICs' MAC addresses (all zero: frames are not checked).
    pub const fn with_macs(mut self, int_mac: [u8; 6], ext_mac: [u8; 6]) -> NatConfig {
        self.int_mac = int_mac;
        self.ext_mac = ext_mac;
        self
    }

    /// `--int`'s address, source of the out-of-ports ICMP errors (`None`:
    /// such packets are only dropped).
    pub const fn with_int_addr(mut self, addr: Option<Ipv4Addr>) -> NatConfig {
        self.int_addr = match addr {
            Some(a) => u32::from_ne_bytes(a.octets()),
            None => 0,
        };
        self
    }

    /// Largest TCP MSS a SYN may carry through (0: no clamping).
    pub const fn with_mss_clamp(mut self, mss: u16) -> NatConfig {
        self.mss_clamp = mss;
        self
    }

    /// The SNAT address.
    pub const fn snat(&self) -> Ipv4Addr {
        let o = self.snat_addr.to_ne_bytes();
        Ipv4Addr::new(o[0], o[1], o[2], o[3])
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: each type is Pod (checked by bytemuck's derive: no padding, no
    // invalid bit patterns).
    unsafe impl aya::Pod for super::CtKey {}
    unsafe impl aya::Pod for super::CtValue {}
    unsafe impl aya::Pod for super::NatConfig {}
    unsafe impl aya::Pod for super::BindKey {}
    unsafe impl aya::Pod for super::BindValue {}
    unsafe impl aya::Pod for super::BindExt {}
    unsafe impl aya::Pod for super::PoolAddr {}
    unsafe impl aya::Pod for super::PoolInfo {}
    unsafe impl aya::Pod for super::FragKey {}
    unsafe impl aya::Pod for super::FragValue {}
    unsafe impl aya::Pod for super::FragSlot {}
    unsafe impl aya::Pod for super::FragHeld {}
    unsafe impl aya::Pod for super::XdpEgress {}
    unsafe impl aya::Pod for super::Traffic {}
    unsafe impl aya::Pod for super::TranslogEvent {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, offset_of, size_of};

    #[test]
    fn ct_key_layout_is_16_bytes_with_explicit_padding() {
        assert_eq!(size_of::<CtKey>(), 16);
        assert_eq!(align_of::<CtKey>(), 4);
        assert_eq!(offset_of!(CtKey, src_addr), 0);
        assert_eq!(offset_of!(CtKey, dst_addr), 4);
        assert_eq!(offset_of!(CtKey, src_port), 8);
        assert_eq!(offset_of!(CtKey, dst_port), 10);
        assert_eq!(offset_of!(CtKey, proto), 12);
        assert_eq!(offset_of!(CtKey, _pad), 13);
    }

    #[test]
    fn ct_value_is_8_bytes_with_the_pool_index_above_the_flags() {
        assert_eq!(size_of::<CtValue>(), 8);
        assert_eq!(align_of::<CtValue>(), 4);
        assert_eq!(offset_of!(CtValue, last_seen), 0);
        assert_eq!(offset_of!(CtValue, ext_port), 4);
        assert_eq!(offset_of!(CtValue, tcp_state), 6);
        assert_eq!(offset_of!(CtValue, flags), 7);
        let v = CtValue::new(POOL_MAX - 1, 4000u16.to_be(), 77, 3, CT_F_REPLIED);
        assert_eq!(v.pool(), POOL_MAX - 1);
        assert_eq!(v.flags & CT_F_MASK, CT_F_REPLIED);
        assert_eq!(
            (v.ext_port, v.last_seen, v.tcp_state),
            (4000u16.to_be(), 77, 3)
        );
        // Setting a flag keeps the index.
        let w = CtValue {
            flags: v.flags | CT_F_INBOUND,
            ..v
        };
        assert_eq!(w.pool(), POOL_MAX - 1);
        assert_eq!(
            CtValue::new(5, 0, 0, 0, 0xff).pool(),
            5,
            "flags cannot spill"
        );
    }

    #[test]
    fn ticks_are_16ms_and_ages_survive_the_wrap() {
        assert_eq!(TICK_NS, 16_777_216);
        assert_eq!(ticks(3 * TICK_NS + 5), 3);
        assert_eq!(age_ns(3, 10 * TICK_NS), Some(7 * TICK_NS));
        assert_eq!(
            age_ns(11, 10 * TICK_NS),
            None,
            "stamped after the clock read"
        );
        // The tick counter wraps after 2^32 ticks: an entry stamped just
        // before the wrap is still 2 ticks old just after it.
        let after_wrap = (1u64 << 32) * TICK_NS + TICK_NS;
        assert_eq!(age_ns(u32::MAX, after_wrap), Some(2 * TICK_NS));
    }

    #[test]
    fn nat_config_layout_is_44_bytes() {
        assert_eq!(size_of::<NatConfig>(), 44);
        assert_eq!(offset_of!(NatConfig, int_mac), 24);
        assert_eq!(offset_of!(NatConfig, ext_mac), 30);
        assert_eq!(offset_of!(NatConfig, int_addr), 36);
        assert_eq!(offset_of!(NatConfig, mss_clamp), 40);
        assert_eq!(offset_of!(NatConfig, _pad), 42);
        assert_eq!(offset_of!(NatConfig, snat_addr), 8);
        assert_eq!(offset_of!(NatConfig, port_min), 12);
        assert_eq!(offset_of!(NatConfig, port_max), 14);
        assert_eq!(offset_of!(NatConfig, low_port_min), 16);
        assert_eq!(offset_of!(NatConfig, filtering), 20);
        assert_eq!(offset_of!(NatConfig, probe_port), 22);
    }

    #[test]
    fn binding_layouts_are_8_12_and_4_bytes() {
        assert_eq!(size_of::<BindKey>(), 8);
        assert_eq!(offset_of!(BindKey, proto), 6);
        assert_eq!(size_of::<BindValue>(), 12);
        assert_eq!(offset_of!(BindValue, stamp), 8);
        assert_eq!(size_of::<BindExt>(), 4);
        assert_eq!(offset_of!(BindExt, pool), 2);
        assert_eq!(bytemuck::bytes_of(&BindKey::new(17, 1, 2))[7], 0);
    }

    #[test]
    fn pool_layouts_and_the_range_test() {
        assert_eq!(size_of::<PoolAddr>(), 8);
        assert_eq!(size_of::<PoolInfo>(), 16);
        let a = PoolAddr::new(Ipv4Addr::new(192, 0, 2, 7), POOL_ACTIVE);
        assert_eq!(a.addr.to_ne_bytes(), [192, 0, 2, 7]);
        assert_eq!(a.ip(), Ipv4Addr::new(192, 0, 2, 7));
        let info = PoolInfo {
            active: 1,
            lo: u32::from(Ipv4Addr::new(192, 0, 2, 5)),
            hi: u32::from(Ipv4Addr::new(192, 0, 2, 8)),
            generation: 1,
        };
        let raw = |a: Ipv4Addr| u32::from_ne_bytes(a.octets());
        assert!(info.may_own(raw(Ipv4Addr::new(192, 0, 2, 5))));
        assert!(info.may_own(raw(Ipv4Addr::new(192, 0, 2, 8))));
        assert!(!info.may_own(raw(Ipv4Addr::new(192, 0, 2, 9))));
        assert!(!info.may_own(raw(Ipv4Addr::new(10, 0, 2, 6))));
        assert!(
            !PoolInfo::default().may_own(0),
            "an empty pool owns nothing"
        );
    }

    #[test]
    fn pair_buckets_spread_neighbouring_hosts_and_stay_in_range() {
        let raw = |a: Ipv4Addr| u32::from_ne_bytes(a.octets());
        let mut seen = std::collections::HashSet::new();
        for i in 0..=255u8 {
            let b = pair_bucket(raw(Ipv4Addr::new(10, 1, 0, i)));
            assert!(b < PAIR_BUCKETS);
            seen.insert(b % 4);
        }
        assert_eq!(seen.len(), 4, "256 hosts reach every one of 4 addresses");
    }

    #[test]
    fn frag_layouts_are_12_and_16_bytes() {
        assert_eq!(size_of::<FragKey>(), 12);
        assert_eq!(offset_of!(FragKey, id), 8);
        assert_eq!(offset_of!(FragKey, proto), 10);
        assert_eq!(size_of::<FragValue>(), 16);
        assert_eq!(offset_of!(FragValue, first_seen_ns), 8);
    }

    #[test]
    fn frag_held_holds_a_1500_mtu_frame() {
        assert_eq!(size_of::<FragHeld>(), 4 + FRAG_HELD_LEN);
        assert_eq!(offset_of!(FragHeld, data), 4);
        assert_eq!(size_of::<FragSlot>(), 16);
    }

    #[test]
    fn nat_config_new_encodes_addresses_and_ports_as_the_dataplane_reads_them() {
        let snat = Ipv4Addr::new(192, 0, 2, 2);
        let c = NatConfig::new(3, 4, snat)
            .with_ports(2000, 3000)
            .with_probe_port(9999)
            .with_int_addr(Some(Ipv4Addr::new(10, 1, 0, 1)));
        // Network order in memory: the bytes as they sit in a packet.
        assert_eq!(c.snat_addr.to_ne_bytes(), [192, 0, 2, 2]);
        assert_eq!(c.int_addr.to_ne_bytes(), [10, 1, 0, 1]);
        assert_eq!(c.probe_port.to_ne_bytes(), 9999u16.to_be_bytes());
        assert_eq!((c.port_min, c.port_max), (2000, 3000));
        assert_eq!(c.snat(), snat);
        assert_eq!((c.int_ifindex, c.ext_ifindex), (3, 4));
        let d = NatConfig::new(1, 2, snat);
        assert_eq!(
            (
                d.low_port_min,
                d.low_port_max,
                d.filtering,
                d.mss_clamp,
                d.int_addr
            ),
            (600, 1023, FILTER_ADDRESS_AND_PORT, 0, 0)
        );
    }

    #[test]
    fn translog_event_is_24_bytes_with_explicit_padding() {
        assert_eq!(size_of::<TranslogEvent>(), 24);
        assert_eq!(offset_of!(TranslogEvent, inside_port), 16);
        assert_eq!(offset_of!(TranslogEvent, kind), 20);
        assert_eq!(offset_of!(TranslogEvent, _pad), 22);
    }

    #[test]
    fn xdp_egress_is_8_bytes_and_zero_means_redirect() {
        assert_eq!(size_of::<XdpEgress>(), 8);
        assert_eq!(offset_of!(XdpEgress, prog_id), 4);
        // A map entry the loader has not written yet redirects, as the
        // programs did before the map existed.
        assert_eq!(XdpEgress::default().mode, XDP_EGRESS_REDIRECT);
        assert_eq!(xdp_egress_label(XDP_EGRESS_TO_TC), "to_tc");
        assert_eq!(xdp_egress_label(7), "unknown");
    }

    #[test]
    fn ct_key_new_zeroes_padding() {
        let k = CtKey::new(6, 1, 2, 3, 4);
        assert_eq!(bytemuck::bytes_of(&k)[13..16], [0, 0, 0]);
    }
}

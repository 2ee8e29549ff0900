//! Adversarial input, generated: a property test over BPF_PROG_TEST_RUN.
//! The real programs, loaded with a `NatConfig`, run in the lab's `nat`
//! namespace (so `bpf_fib_lookup` answers from real routes) on frames
//! built from a few random flows and then mutated: truncated at any offset,
//! IHL and IP options, flags and fragment offsets, TTL, total length,
//! MACs and ethertype, any byte, with and without the checksums fixed
//! afterwards; replies, hairpins, fragments in any order, ICMP errors
//! quoting any part of a translated packet, and random bytes. Each case
//! starts from empty tables and runs up to a dozen frames; every frame goes
//! in at one NIC, through XDP and then TC when XDP passes it on (as on a
//! real NIC), or through TC alone. The tail-called programs run too: the
//! loader's `dataplane::load` fills the program array.
//!
//! Checked on every run (see [`check`]):
//!
//! - **Counted once:** the program counts exactly one verdict at its own
//!   hook (`nat_common::stats::Kind`; events any number), nothing at the
//!   other hooks, and the verdict names what the program did (a
//!   `*_forwarded` reason redirects, a `drop_*` one drops, ...).
//! - **XDP hands over untouched:** a frame XDP passes on is unchanged.
//! - **Nothing inside leaves by `--ext`:** every frame sent out of `ext`
//!   (redirected, or rewritten and passed to the kernel to forward) has
//!   the SNAT address as its source; and no frame passed to the kernel
//!   untranslated is one the kernel would forward out of `ext` (a model of
//!   the lab's routes: [`Routes`]).
//! - **Nothing gets in without a binding:** every frame sent into `int` by
//!   the `--ext` programs is the reply of a session whose binding (both
//!   halves, read from the maps after the run) maps the external endpoint
//!   it came to onto the inside endpoint it goes to; an ICMP error the same
//!   for the packet it quotes; a following fragment has the tracking entry
//!   of its first fragment. From `int` back into `int` only hairpins (by a
//!   binding) and the out-of-ports errors (to the sender) go.
//! - **Checksums:** translation keeps every checksum exactly as valid as
//!   it came (the one's complement residual of the IP header and of the
//!   L4 segment with its pseudo-header is unchanged, UDP's "no checksum"
//!   stays so and a real one never becomes 0); a valid frame leaves valid,
//!   a corrupt one is not laundered. An ICMP error the gateway builds
//!   verifies. XDP never translates a TCP or UDP checksum that may be
//!   partial. At TC, "valid" is the same residual rule: a BPF_PROG_TEST_RUN
//!   skb is never CHECKSUM_PARTIAL (the kernel builds it without offload
//!   state), so the helpers treat every field as a complete checksum, and
//!   a partial field keeps its difference to the right checksum; the
//!   CHECKSUM_PARTIAL path itself is tested end to end (gateway.rs).
//! - **Tables:** after every run each session has its binding both ways
//!   and the two halves of every binding point at each other
//!   ([`Tables::inconsistencies`]).
//!
//! CI runs a fixed seed and [`DEFAULT_CASES`] cases per configuration;
//! `NAT_PROPTEST_CASES=N` runs more, `NAT_PROPTEST_SEED=N` another seed.
//! A failure prints the shrunk case, the frames and what was violated.

use std::{collections::HashSet, fmt::Write as _, net::Ipv4Addr};

use nat_common::{
    CFG_F_ANTI_SPOOFING,
    policy::{ANSWER_DROP, Policy, Prefix, Rule, Verdict},
};
use nat_loader::policy::PolicyMaps;

use aya::{
    Ebpf,
    maps::{HashMap, MapData},
    programs::{SchedClassifier, Xdp},
};
use nat_common::{
    BindExt, BindKey, CtKey, CtValue, FILTER_ADDRESS, FILTER_ENDPOINT_INDEPENDENT, FragKey,
    FragValue, MAP_ADF, MAP_BIND, MAP_BIND_REV, MAP_CT_FWD, MAP_FRAG_HELD, MAP_FRAG_TRACK,
    NatConfig, PROG_TC_EXT, PROG_TC_INT, PROG_XDP_EXT, PROG_XDP_INT,
    stats::{self, HOOK_TC_EXT, HOOK_TC_INT, HOOK_XDP_EXT, HOOK_XDP_INT, Kind},
};
use nat_lab::{
    CLIENT1_IP, CLIENT2_IP, Host, INT_IF, Lab, NAT_EXT_IP, NAT_INT_IP, PREFIX_LEN, PRIVATE_NET,
    ROUTER_NAT_IP, SERVER_IP, lab,
    packet::{
        Csum, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, L4, Packet, fragments, internet_checksum,
        l4_checksum, set_ip_checksum,
    },
    tables::Tables,
    test_run::{Counters, Nics, entries, test_run},
};
use nat_loader::dataplane;
use proptest::{
    collection::vec,
    prelude::*,
    sample::Index,
    test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner},
};

/// Cases per configuration in CI.
const DEFAULT_CASES: u32 = 256;
/// The seed CI runs (any 32 bytes; changed only on purpose).
const DEFAULT_SEED: u64 = 0x6e61_7467_7731_3462;

/// The shortest frame BPF_PROG_TEST_RUN takes for a TC program: an
/// Ethernet header and one byte (no NIC delivers less).
const MIN_FRAME: usize = 15;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

/// Inside hosts: client1 (its real MAC pinned by [`Nics::of`]), hosts with
/// pinned made-up MACs, and one whose neighbour is never resolved (the
/// `bpf_redirect_neigh` path).
const INSIDE: [Ipv4Addr; 5] = [
    CLIENT1_IP,
    CLIENT2_IP,
    Ipv4Addr::new(10, 1, 0, 20),
    Ipv4Addr::new(10, 1, 0, 21),
    Ipv4Addr::new(10, 1, 0, 30),
];
const UNRESOLVED_INSIDE: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 30);
/// Remotes: behind the router, the router itself, an unresolved neighbour
/// on ext's link, the gateway's own addresses, an inside address,
/// multicast, broadcast, "this network", loopback.
const REMOTES: [Ipv4Addr; 12] = [
    SERVER_IP,
    Ipv4Addr::new(198, 51, 100, 77),
    Ipv4Addr::new(203, 0, 113, 9),
    ROUTER_NAT_IP,
    Ipv4Addr::new(192, 0, 2, 50),
    NAT_EXT_IP,
    NAT_INT_IP,
    Ipv4Addr::new(10, 1, 0, 12),
    Ipv4Addr::new(224, 0, 0, 5),
    Ipv4Addr::new(255, 255, 255, 255),
    Ipv4Addr::new(0, 0, 0, 0),
    Ipv4Addr::new(127, 0, 0, 1),
];
const PORTS: [u16; 10] = [0, 53, 80, 443, 1023, 1024, 40000, 40001, 50000, 65535];

fn raw(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

fn ip_of(raw: u32) -> Ipv4Addr {
    Ipv4Addr::from(raw.to_ne_bytes())
}

fn made_up_mac(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x02, 0xaa, o[0], o[1], o[2], o[3]]
}

// ---------------------------------------------------------------------------
// The generated cases.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proto {
    Tcp,
    Udp,
    Icmp,
}

impl Proto {
    fn number(self) -> u8 {
        match self {
            Proto::Tcp => IPPROTO_TCP,
            Proto::Udp => IPPROTO_UDP,
            Proto::Icmp => IPPROTO_ICMP,
        }
    }
}

/// One inside endpoint talking to one remote endpoint (for ICMP, `iport`
/// is the echo identifier).
#[derive(Clone, Debug)]
struct Flow {
    proto: Proto,
    inside: Ipv4Addr,
    iport: u16,
    remote: Ipv4Addr,
    rport: u16,
}

/// What varies in a TCP, UDP or echo packet of a flow.
#[derive(Clone, Debug)]
struct Body {
    tcp_flags: u8,
    payload: usize,
    csum: Csum,
    ttl: u8,
    df: bool,
    /// IP options, in 4-byte words.
    options: Vec<[u8; 4]>,
    /// TCP options (in 4-byte words) ahead of the payload, e.g. an MSS.
    tcp_options: Vec<[u8; 4]>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Int,
    Ext,
}

#[derive(Clone, Debug)]
enum What {
    /// The flow's packet from inside.
    Out(Body),
    /// A packet from the remote to the flow's external endpoint.
    /// A packet to the flow's external endpoint from the remote: from its
    /// port, or from another (which only open filtering lets in).
    Reply { body: Body, from: Option<u16> },
    /// An ICMP error from outside (the remote, or the router on the way)
    /// quoting the flow's translated packet (all, or its first `quote`
    /// bytes);
    /// `corrupt`: 1 the ICMP checksum, 2 the quoted IP header checksum.
    ErrIn {
        kind: (u8, u8),
        quote: Option<Index>,
        corrupt: u8,
        from_router: bool,
    },
    /// An ICMP error from the inside host about a packet of the remote.
    ErrOut {
        kind: (u8, u8),
        quote: Option<Index>,
        corrupt: u8,
    },
    /// The flow's inside endpoint to the external endpoint of flow `to`.
    Hairpin { to: usize, body: Body },
    /// Fragment `piece` of the flow's outbound datagram cut in `chunk`
    /// 8-byte units.
    FragOut {
        size: usize,
        chunk: usize,
        piece: Index,
    },
    /// The same of a reply datagram from the remote.
    FragIn {
        size: usize,
        chunk: usize,
        piece: Index,
    },
    /// Random bytes after an Ethernet header addressed to the NIC.
    Raw {
        side: Side,
        ipv4: bool,
        bytes: Vec<u8>,
    },
}

impl What {
    fn side(&self) -> Side {
        match self {
            What::Out(_) | What::ErrOut { .. } | What::Hairpin { .. } | What::FragOut { .. } => {
                Side::Int
            }
            What::Reply { .. } | What::ErrIn { .. } | What::FragIn { .. } => Side::Ext,
            What::Raw { side, .. } => *side,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Entry {
    /// XDP, then TC if XDP passes it on: a real NIC's path.
    Pipeline,
    /// TC alone (generic XDP, or whatever XDP may have passed).
    TcOnly,
}

/// A change to a built frame; `fix`: recompute the IP header checksum
/// afterwards (and the L4 one for [`Mutation::Byte`]), as a deliberate
/// sender would.
#[derive(Clone, Debug)]
enum Mutation {
    /// Cut the frame at an offset (never below [`MIN_FRAME`]).
    Truncate(Index),
    /// Overwrite a byte after the Ethernet header.
    Byte {
        at: Index,
        value: u8,
        fix: bool,
    },
    Ihl {
        ihl: u8,
        fix: bool,
    },
    Version(u8),
    /// The flags and fragment offset word.
    FragWord {
        word: u16,
        fix: bool,
    },
    TotLen {
        len: u16,
        fix: bool,
    },
    Ttl(u8),
    /// 0: another host's MAC, 1: broadcast, 2: multicast.
    DstMac(u8),
    Ethertype(u16),
    /// Bytes after the IP datagram (Ethernet padding, or garbage).
    Pad(Vec<u8>),
}

#[derive(Clone, Debug)]
struct Step {
    /// Which flow (modulo their number).
    flow: usize,
    what: What,
    entry: Entry,
    mutations: Vec<Mutation>,
}

#[derive(Clone, Debug)]
struct Case {
    flows: Vec<Flow>,
    /// Whether each flow first sends a plain packet out (a SYN for TCP),
    /// so that replies, errors and hairpins find its session.
    opened: bool,
    steps: Vec<Step>,
}

fn flow() -> impl Strategy<Value = Flow> {
    (
        prop_oneof![Just(Proto::Tcp), Just(Proto::Udp), Just(Proto::Icmp)],
        0..INSIDE.len(),
        0..PORTS.len(),
        prop_oneof![4 => 0..3usize, 1 => 0..REMOTES.len()],
        0..PORTS.len(),
    )
        .prop_map(|(proto, i, ip, r, rp)| Flow {
            proto,
            inside: INSIDE[i],
            iport: PORTS[ip],
            remote: REMOTES[r],
            rport: if proto == Proto::Icmp { 0 } else { PORTS[rp] },
        })
}

fn body() -> impl Strategy<Value = Body> {
    (
        prop_oneof![
            Just(0x02u8),
            Just(0x10),
            Just(0x12),
            Just(0x11),
            Just(0x04),
            any::<u8>()
        ],
        prop_oneof![8 => 0..64usize, 1 => 1400..2900usize],
        prop_oneof![
            4 => Just(Csum::Full),
            2 => Just(Csum::Partial),
            1 => Just(Csum::Zero)
        ],
        prop_oneof![6 => Just(64u8), 1 => Just(2), 1 => Just(1), 1 => Just(0), 1 => any::<u8>()],
        any::<bool>(),
        prop_oneof![4 => Just(vec![]), 1 => vec(any::<[u8; 4]>(), 0..=10)],
        prop_oneof![
            2 => Just(vec![]),
            2 => any::<u16>().prop_map(|m| vec![[2, 4, (m >> 8) as u8, m as u8]]),
            1 => vec(any::<[u8; 4]>(), 0..=10)
        ],
    )
        .prop_map(
            |(tcp_flags, payload, csum, ttl, df, options, tcp_options)| Body {
                tcp_flags,
                payload,
                csum,
                ttl,
                df,
                options,
                tcp_options,
            },
        )
}

fn icmp_error_kind() -> impl Strategy<Value = (u8, u8)> {
    prop_oneof![
        (Just(3u8), 0..16u8),
        Just((11u8, 0u8)),
        Just((12u8, 0u8)),
        (any::<u8>(), any::<u8>())
    ]
}

/// The whole quoted packet, or a random part of it.
fn quote() -> impl Strategy<Value = Option<Index>> {
    prop_oneof![2 => Just(None), 1 => any::<Index>().prop_map(Some)]
}

fn what() -> impl Strategy<Value = What> {
    prop_oneof![
        6 => body().prop_map(What::Out),
        5 => (body(), prop_oneof![3 => Just(None), 1 => (0..PORTS.len()).prop_map(|p| Some(PORTS[p]))])
            .prop_map(|(body, from)| What::Reply { body, from }),
        2 => (icmp_error_kind(), quote(), 0..3u8, any::<bool>()).prop_map(
            |(kind, quote, corrupt, from_router)| What::ErrIn { kind, quote, corrupt, from_router }
        ),
        1 => (icmp_error_kind(), quote(), 0..3u8)
            .prop_map(|(kind, quote, corrupt)| What::ErrOut { kind, quote, corrupt }),
        1 => (0..6usize, body()).prop_map(|(to, body)| What::Hairpin { to, body }),
        2 => (16..1200usize, 1..40usize, any::<Index>())
            .prop_map(|(size, chunk, piece)| What::FragOut { size, chunk, piece }),
        2 => (16..1200usize, 1..40usize, any::<Index>())
            .prop_map(|(size, chunk, piece)| What::FragIn { size, chunk, piece }),
        1 => (
            prop_oneof![Just(Side::Int), Just(Side::Ext)],
            any::<bool>(),
            vec(any::<u8>(), 1..120)
        )
            .prop_map(|(side, ipv4, bytes)| What::Raw { side, ipv4, bytes }),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => any::<Index>().prop_map(Mutation::Truncate),
        3 => (any::<Index>(), any::<u8>(), any::<bool>())
            .prop_map(|(at, value, fix)| Mutation::Byte { at, value, fix }),
        2 => (0..16u8, any::<bool>()).prop_map(|(ihl, fix)| Mutation::Ihl { ihl, fix }),
        1 => (0..16u8).prop_map(Mutation::Version),
        2 => (
            prop_oneof![
                Just(0x2000u16),
                Just(0x0001),
                Just(0x2001),
                Just(0x8000),
                any::<u16>()
            ],
            any::<bool>()
        )
            .prop_map(|(word, fix)| Mutation::FragWord { word, fix }),
        2 => (any::<u16>(), any::<bool>()).prop_map(|(len, fix)| Mutation::TotLen { len, fix }),
        1 => any::<u8>().prop_map(Mutation::Ttl),
        1 => (0..3u8).prop_map(Mutation::DstMac),
        1 => prop_oneof![Just(0x86ddu16), Just(0x8100), Just(0x0806), any::<u16>()]
            .prop_map(Mutation::Ethertype),
        1 => vec(any::<u8>(), 1..40).prop_map(Mutation::Pad),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    (
        0..6usize,
        what(),
        prop_oneof![3 => Just(Entry::Pipeline), 1 => Just(Entry::TcOnly)],
        prop_oneof![3 => Just(vec![]), 2 => vec(mutation(), 1..3)],
    )
        .prop_map(|(flow, what, entry, mutations)| Step {
            flow,
            what,
            entry,
            mutations,
        })
}

fn case() -> impl Strategy<Value = Case> {
    (vec(flow(), 1..6), any::<bool>(), vec(step(), 1..12)).prop_map(|(flows, opened, steps)| Case {
        flows,
        opened,
        steps,
    })
}

// ---------------------------------------------------------------------------
// Frames.

/// A parsed view of an IPv4 frame, lenient: `None` if the Ethernet and
/// IPv4 headers are not all there.
#[derive(Clone, Debug)]
struct View<'a> {
    frame: &'a [u8],
    ihl: usize,
    tot_len: usize,
    ttl: u8,
    proto: u8,
    src: u32,
    dst: u32,
    id: u16,
    /// Flags and offset.
    frag: u16,
    /// The L4 bytes inside the datagram (and the frame).
    l4: &'a [u8],
}

impl<'a> View<'a> {
    fn of(frame: &'a [u8]) -> Option<View<'a>> {
        if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
            return None;
        }
        View::ip(frame, 14)
    }

    /// An IPv4 header at `at` of `frame` (also a quoted one).
    fn ip(frame: &'a [u8], at: usize) -> Option<View<'a>> {
        let ip = frame.get(at..)?;
        if ip.len() < 20 || ip[0] >> 4 != 4 {
            return None;
        }
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let tot_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        if ihl < 20 || ihl > ip.len() {
            return None;
        }
        let end = tot_len.clamp(ihl, ip.len());
        let word = |i: usize| u32::from_ne_bytes([ip[i], ip[i + 1], ip[i + 2], ip[i + 3]]);
        Some(View {
            frame,
            ihl,
            tot_len,
            ttl: ip[8],
            proto: ip[9],
            src: word(12),
            dst: word(16),
            id: u16::from_be_bytes([ip[4], ip[5]]),
            frag: u16::from_be_bytes([ip[6], ip[7]]),
            l4: &ip[ihl..end],
        })
    }

    fn header(&self) -> &[u8] {
        let start = self.l4.as_ptr() as usize - self.frame.as_ptr() as usize - self.ihl;
        &self.frame[start..start + self.ihl]
    }

    fn offset(&self) -> u16 {
        self.frag & 0x1fff
    }

    fn is_fragment(&self) -> bool {
        self.frag & 0x3fff != 0
    }

    fn port(&self, at: usize) -> Option<u16> {
        self.l4
            .get(at..at + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    fn sport(&self) -> Option<u16> {
        self.port(0)
    }

    fn dport(&self) -> Option<u16> {
        self.port(2)
    }

    fn icmp_type(&self) -> Option<(u8, u8)> {
        (self.proto == IPPROTO_ICMP && self.l4.len() >= 2).then(|| (self.l4[0], self.l4[1]))
    }

    fn is_icmp_error(&self) -> bool {
        matches!(self.icmp_type(), Some((3 | 11 | 12, _)))
    }

    /// The packet an ICMP error quotes.
    fn quote(&self) -> Option<View<'a>> {
        let start = self.l4.as_ptr() as usize - self.frame.as_ptr() as usize + 8;
        let end = start + self.l4.len().checked_sub(8)?;
        View::ip(&self.frame[..end], start)
    }
}

/// Recomputes the L4 checksum of a whole (unfragmented) datagram.
fn fix_l4(frame: &mut [u8]) {
    let Some(v) = View::of(frame) else { return };
    if v.is_fragment() || 14 + v.tot_len > frame.len() || v.tot_len < v.ihl {
        return;
    }
    let (src, dst, proto) = (ip_of(v.src), ip_of(v.dst), v.proto);
    let l4 = 14 + v.ihl;
    let end = 14 + v.tot_len;
    let at = match proto {
        IPPROTO_TCP => 16,
        IPPROTO_UDP => 6,
        IPPROTO_ICMP => 2,
        _ => return,
    };
    if end < l4 + at + 2 {
        return;
    }
    frame[l4 + at..l4 + at + 2].copy_from_slice(&[0, 0]);
    let c = if proto == IPPROTO_ICMP {
        internet_checksum(&frame[l4..end])
    } else {
        l4_checksum(src, dst, proto, &frame[l4..end])
    };
    frame[l4 + at..l4 + at + 2].copy_from_slice(&c.to_be_bytes());
}

fn mutate(frame: &mut Vec<u8>, m: &Mutation) {
    let n = frame.len();
    match m {
        Mutation::Truncate(at) if n > MIN_FRAME => {
            frame.truncate(MIN_FRAME + at.index(n - MIN_FRAME + 1))
        }
        Mutation::Truncate(_) => {}
        Mutation::Byte { at, value, fix } => {
            if n > 14 {
                frame[14 + at.index(n - 14)] = *value;
                if *fix {
                    fix_l4(frame);
                    set_ip_checksum(frame);
                }
            }
        }
        Mutation::Ihl { ihl, fix } => {
            if n > 14 {
                frame[14] = (frame[14] & 0xf0) | ihl;
                if *fix {
                    set_ip_checksum(frame);
                }
            }
        }
        Mutation::Version(v) => {
            if n > 14 {
                frame[14] = (frame[14] & 0x0f) | (v << 4);
            }
        }
        Mutation::FragWord { word, fix } => {
            if n >= 22 {
                frame[20..22].copy_from_slice(&word.to_be_bytes());
                if *fix {
                    set_ip_checksum(frame);
                }
            }
        }
        Mutation::TotLen { len, fix } => {
            if n >= 18 {
                frame[16..18].copy_from_slice(&len.to_be_bytes());
                if *fix {
                    set_ip_checksum(frame);
                }
            }
        }
        Mutation::Ttl(ttl) => {
            if n >= 23 {
                frame[22] = *ttl;
                set_ip_checksum(frame);
            }
        }
        Mutation::DstMac(kind) => {
            let mac = match kind {
                0 => [0x02, 0xbb, 0, 0, 0, 1],
                1 => [0xff; 6],
                _ => [0x01, 0x00, 0x5e, 0, 0, 5],
            };
            frame[..6].copy_from_slice(&mac);
        }
        Mutation::Ethertype(t) => frame[12..14].copy_from_slice(&t.to_be_bytes()),
        Mutation::Pad(bytes) => frame.extend_from_slice(bytes),
    }
}

/// `payload` bytes of a pattern (not all zero: checksums mean something).
fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + 3) as u8).collect()
}

/// Makes the first `b.tcp_options` words of a TCP packet's payload its
/// header's options (the data offset covers them), the checksum kept as
/// `b.csum` made it: recomputed if complete, a partial one (which covers
/// the pseudo-header only) as it is.
fn with_tcp_options(mut frame: Vec<u8>, b: &Body) -> Vec<u8> {
    let n = b.tcp_options.len();
    if n == 0 || frame[23] != IPPROTO_TCP {
        return frame;
    }
    let tcp = 14 + usize::from(frame[14] & 0x0f) * 4;
    frame[tcp + 12] = ((5 + n as u8) << 4) | (frame[tcp + 12] & 0x0f);
    if b.csum == Csum::Full {
        fix_l4(&mut frame);
    }
    frame
}

/// Sets the DF bit as `df` says (the builder always sets it).
fn with_df(mut frame: Vec<u8>, df: bool) -> Vec<u8> {
    if !df {
        frame[20] &= !0x40;
        set_ip_checksum(&mut frame);
    }
    frame
}

/// What an ICMP error quotes of `frame`: its IP packet, whole or cut at
/// `quote`, with its IP header checksum broken when `corrupt` is 2.
fn quoted(frame: &[u8], quote: Option<Index>, corrupt: u8) -> Vec<u8> {
    let mut q = frame[14..].to_vec();
    if corrupt == 2 {
        q[10] ^= 0x40;
    }
    if let Some(at) = quote {
        q.truncate(at.index(q.len() + 1));
    }
    q
}

/// An ICMP error frame from `src` to `dst` quoting `quote`.
fn icmp_error(
    macs: ([u8; 6], [u8; 6]),
    (src, dst): (Ipv4Addr, Ipv4Addr),
    (t, code): (u8, u8),
    quote: &[u8],
    corrupt_icmp: bool,
) -> Vec<u8> {
    let mut msg = vec![t, code, 0, 0, 0, 0, 0x05, 0xdc];
    msg.extend_from_slice(quote);
    let c = internet_checksum(&msg) ^ if corrupt_icmp { 0x0101 } else { 0 };
    msg[2..4].copy_from_slice(&c.to_be_bytes());
    Packet {
        dst_mac: macs.0,
        src_mac: macs.1,
        src,
        dst,
        ttl: 60,
        options: vec![],
        l4: L4::Raw {
            proto: IPPROTO_ICMP,
        },
        payload: msg,
        csum: Csum::Full,
    }
    .build()
}

// ---------------------------------------------------------------------------
// The kernel around the programs: the lab's routes.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Nic {
    Int,
    Ext,
}

/// What the kernel of the lab's `nat` does with a packet the programs
/// leave to it: the local table (read from the namespace) and two routes,
/// `int`'s subnet and the default route out of `ext`.
struct Routes {
    local: HashSet<Ipv4Addr>,
}

impl Routes {
    fn read(lab: &Lab) -> Routes {
        let out = lab
            .exec(Host::Nat, &["ip", "-4", "route", "show", "table", "local"])
            .expect("ip route show table local");
        let local = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                matches!(w.next(), Some("local" | "broadcast"))
                    .then(|| w.next())
                    .flatten()
                    .and_then(|a| a.parse().ok())
            })
            .collect();
        Routes { local }
    }

    /// Addresses the kernel never forwards to: its own and broadcast ones,
    /// loopback, "this network", multicast (no multicast routing here).
    fn not_forwarded(&self, a: Ipv4Addr) -> bool {
        self.local.contains(&a)
            || a.is_loopback()
            || a.octets()[0] == 0
            || a.is_multicast()
            || a.is_broadcast()
    }

    /// The NIC a packet to `a` leaves by.
    fn egress(a: Ipv4Addr) -> Nic {
        let mask = u32::MAX << (32 - PREFIX_LEN);
        if u32::from(a) & mask == u32::from(PRIVATE_NET) {
            Nic::Int
        } else {
            Nic::Ext
        }
    }

    /// Where the kernel forwards `frame`, received on a NIC with MAC
    /// `mac`, if it does: addressed to that MAC (it forwards nothing it got
    /// as broadcast or multicast, nor for another host), a valid IPv4
    /// header, a TTL left, a routable destination, and not too big with DF
    /// (MTU 1500).
    fn kernel_forwards(&self, frame: &[u8], mac: [u8; 6]) -> Option<Nic> {
        let v = View::of(frame)?;
        let sane = frame[..6] == mac
            && internet_checksum(v.header()) == 0
            && v.tot_len >= v.ihl
            && 14 + v.tot_len <= frame.len()
            && v.ttl > 1
            && !(v.tot_len > 1500 && v.frag & 0x4000 != 0);
        let dst = ip_of(v.dst);
        (sane && !self.not_forwarded(dst)).then(|| Routes::egress(dst))
    }
}

// ---------------------------------------------------------------------------
// The rig: the programs loaded in the lab's `nat`.

struct Rig<'a> {
    ebpf: Ebpf,
    nics: Nics,
    cfg: NatConfig,
    routes: &'a Routes,
    counters: Counters,
}

/// What one program run did.
struct Run {
    verdict: u32,
    out: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hook {
    Xdp,
    Tc,
}

fn clear<K: aya::Pod, V: aya::Pod>(ebpf: &mut Ebpf, name: &str) -> Result<(), String> {
    let mut map = HashMap::<&mut MapData, K, V>::try_from(ebpf.map_mut(name).ok_or(name)?)
        .map_err(|e| format!("{name}: {e}"))?;
    let keys: Vec<K> = map.keys().filter_map(Result::ok).collect();
    for k in keys {
        map.remove(&k).map_err(|e| format!("{name}: {e}"))?;
    }
    Ok(())
}

impl Rig<'_> {
    /// Empties every table: each case starts afresh, so that a failure
    /// shrinks and replays.
    fn clear(&mut self) -> Result<(), String> {
        clear::<CtKey, CtValue>(&mut self.ebpf, MAP_CT_FWD)?;
        clear::<BindKey, BindExt>(&mut self.ebpf, MAP_BIND)?;
        clear::<BindKey, nat_common::BindValue>(&mut self.ebpf, MAP_BIND_REV)?;
        clear::<CtKey, u8>(&mut self.ebpf, MAP_ADF)?;
        clear::<FragKey, FragValue>(&mut self.ebpf, MAP_FRAG_TRACK)?;
        clear::<nat_common::FragSlot, nat_common::FragHeld>(&mut self.ebpf, MAP_FRAG_HELD)
    }

    /// The external port (or identifier) of a flow's inside endpoint: its
    /// binding's, or the inside one's if it has none (yet).
    fn ext_port(&self, proto: u8, inside: Ipv4Addr, iport: u16) -> u16 {
        let bind: Vec<(BindKey, BindExt)> = entries(&self.ebpf, MAP_BIND).unwrap_or_default();
        let key = BindKey::new(proto, raw(inside), iport.to_be());
        bind.iter()
            .find(|(k, _)| *k == key)
            .map_or(iport, |(_, v)| u16::from_be(v.port))
    }

    fn inside_mac(&self, ip: Ipv4Addr) -> [u8; 6] {
        if ip == CLIENT1_IP {
            self.nics.client_mac
        } else {
            made_up_mac(ip)
        }
    }

    /// The L4 header of a flow's packet; for ICMP an echo of type `echo`
    /// with identifier `sport`.
    fn l4(proto: Proto, sport: u16, dport: u16, flags: u8, echo: u8) -> L4 {
        match proto {
            Proto::Tcp => L4::Tcp {
                sport,
                dport,
                flags,
            },
            Proto::Udp => L4::Udp { sport, dport },
            // The identifier stands in the port of the inside end.
            Proto::Icmp => L4::Echo {
                kind: echo,
                id: sport,
                seq: 1,
            },
        }
    }

    fn outbound(&self, f: &Flow, b: &Body, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
        let sport = f.iport;
        let l4 = match f.proto {
            Proto::Icmp => Self::l4(f.proto, sport, 0, 0, 8),
            p => Self::l4(p, sport, dport, b.tcp_flags, 8),
        };
        let p = Packet {
            dst_mac: self.nics.int_mac,
            src_mac: self.inside_mac(f.inside),
            src: f.inside,
            dst,
            ttl: b.ttl,
            options: b.options.concat(),
            l4,
            payload: [b.tcp_options.concat(), pattern(b.payload)].concat(),
            csum: b.csum,
        };
        with_df(with_tcp_options(p.build(), b), b.df)
    }

    fn reply(&self, f: &Flow, b: &Body, rport: u16) -> Vec<u8> {
        let ext = self.ext_port(f.proto.number(), f.inside, f.iport);
        let l4 = match f.proto {
            Proto::Icmp => Self::l4(f.proto, ext, 0, 0, 0),
            p => Self::l4(p, rport, ext, b.tcp_flags, 0),
        };
        let p = Packet {
            dst_mac: self.nics.ext_mac,
            src_mac: self.nics.router_mac,
            src: f.remote,
            dst: NAT_EXT_IP,
            ttl: b.ttl,
            options: b.options.concat(),
            l4,
            payload: [b.tcp_options.concat(), pattern(b.payload)].concat(),
            csum: b.csum,
        };
        with_df(with_tcp_options(p.build(), b), b.df)
    }

    fn plain() -> Body {
        Body {
            tcp_options: vec![],
            tcp_flags: 0x10,
            payload: 24,
            csum: Csum::Full,
            ttl: 64,
            df: false,
            options: vec![],
        }
    }

    fn build(&self, case: &Case, step: &Step) -> Vec<u8> {
        let f = &case.flows[step.flow % case.flows.len()];
        let mut frame = match &step.what {
            What::Out(b) => self.outbound(f, b, f.remote, f.rport),
            What::Reply { body, from } => self.reply(f, body, from.unwrap_or(f.rport)),
            What::ErrIn {
                kind,
                quote,
                corrupt,
                from_router,
            } => {
                // What the gateway sent: the flow from its external endpoint.
                let ext = self.ext_port(f.proto.number(), f.inside, f.iport);
                let sent = Packet {
                    dst_mac: [0; 6],
                    src_mac: [0; 6],
                    src: NAT_EXT_IP,
                    dst: f.remote,
                    ttl: 63,
                    options: vec![],
                    l4: match f.proto {
                        Proto::Icmp => Self::l4(f.proto, ext, 0, 0, 8),
                        p => Self::l4(p, ext, f.rport, 0x02, 8),
                    },
                    payload: pattern(32),
                    csum: Csum::Full,
                }
                .build();
                let q = quoted(&sent, *quote, *corrupt);
                let src = if *from_router {
                    ROUTER_NAT_IP
                } else {
                    f.remote
                };
                icmp_error(
                    (self.nics.ext_mac, self.nics.router_mac),
                    (src, NAT_EXT_IP),
                    *kind,
                    &q,
                    *corrupt == 1,
                )
            }
            What::ErrOut {
                kind,
                quote,
                corrupt,
            } => {
                // What the inside host got: the remote's packet to it.
                let got = Packet {
                    dst_mac: [0; 6],
                    src_mac: [0; 6],
                    src: f.remote,
                    dst: f.inside,
                    ttl: 59,
                    options: vec![],
                    l4: match f.proto {
                        Proto::Icmp => Self::l4(f.proto, f.iport, 0, 0, 0),
                        p => Self::l4(p, f.rport, f.iport, 0x12, 0),
                    },
                    payload: pattern(32),
                    csum: Csum::Full,
                }
                .build();
                let q = quoted(&got, *quote, *corrupt);
                icmp_error(
                    (self.nics.int_mac, self.inside_mac(f.inside)),
                    (f.inside, f.remote),
                    *kind,
                    &q,
                    *corrupt == 1,
                )
            }
            What::Hairpin { to, body } => {
                let t = &case.flows[to % case.flows.len()];
                let ext = self.ext_port(f.proto.number(), t.inside, t.iport);
                self.outbound(f, body, NAT_EXT_IP, ext)
            }
            What::FragOut { size, chunk, piece } => {
                let b = Body {
                    payload: *size,
                    ..Self::plain()
                };
                let whole = self.outbound(f, &b, f.remote, f.rport);
                let pieces = fragments(&whole, *chunk, 0x4000 | f.iport);
                pieces[piece.index(pieces.len())].clone()
            }
            What::FragIn { size, chunk, piece } => {
                let b = Body {
                    payload: *size,
                    ..Self::plain()
                };
                let whole = self.reply(f, &b, f.rport);
                let pieces = fragments(&whole, *chunk, 0x5000 | f.iport);
                pieces[piece.index(pieces.len())].clone()
            }
            What::Raw { side, ipv4, bytes } => {
                let (dst, src) = match side {
                    Side::Int => (self.nics.int_mac, self.nics.client_mac),
                    Side::Ext => (self.nics.ext_mac, self.nics.router_mac),
                };
                let mut f = [dst, src].concat();
                let mut b = bytes.clone();
                if *ipv4 {
                    f.extend_from_slice(&[0x08, 0x00]);
                    if let Some(first) = b.first_mut() {
                        *first = 0x40 | (*first & 0x0f);
                    }
                } else {
                    f.extend_from_slice(&[0x88, 0xb5]);
                }
                f.extend_from_slice(&b);
                f
            }
        };
        for m in &step.mutations {
            mutate(&mut frame, m);
        }
        frame
    }

    /// Runs `frame` in at `side` as `entry` says and checks every run.
    fn exec(&mut self, side: Side, entry: Entry, frame: &[u8]) -> Result<(), String> {
        let (xdp, tc, xdp_hook, tc_hook) = match side {
            Side::Int => (PROG_XDP_INT, PROG_TC_INT, HOOK_XDP_INT, HOOK_TC_INT),
            Side::Ext => (PROG_XDP_EXT, PROG_TC_EXT, HOOK_XDP_EXT, HOOK_TC_EXT),
        };
        if entry == Entry::Pipeline {
            let r = self.one(Hook::Xdp, xdp, xdp_hook, side, frame)?;
            if r.verdict != XDP_PASS {
                return Ok(());
            }
        }
        match self.one(Hook::Tc, tc, tc_hook, side, frame) {
            // BPF_PROG_TEST_RUN refuses (EINVAL) an skb whose ethertype
            // promises a network header it does not hold (IPv4, IPv6);
            // XDP, which takes them, ran above unless TC-only.
            Err(e) if frame.len() < 14 + 40 && e.contains("(os error 22)") => Ok(()),
            r => r.map(drop),
        }
    }

    fn one(
        &mut self,
        hook: Hook,
        prog: &str,
        hook_id: u32,
        side: Side,
        input: &[u8],
    ) -> Result<Run, String> {
        let r = match hook {
            Hook::Xdp => test_run::<Xdp>(&mut self.ebpf, prog, input),
            Hook::Tc => test_run::<SchedClassifier>(&mut self.ebpf, prog, input),
        }
        .map_err(|e| format!("{prog}: {e:#}"))?;
        let run = Run {
            verdict: r.verdict,
            out: r.out,
        };
        let after = Counters::of(&self.ebpf).map_err(|e| format!("{e:#}"))?;
        let tables = Tables::of(&self.ebpf).map_err(|e| format!("{e:#}"))?;
        let frags: Vec<(FragKey, FragValue)> =
            entries(&self.ebpf, MAP_FRAG_TRACK).map_err(|e| format!("{e:#}"))?;
        let world = check::World {
            nics: &self.nics,
            cfg: &self.cfg,
            routes: self.routes,
            tables: &tables,
            frags: &frags,
        };
        let result = check::run(
            &world,
            hook,
            hook_id,
            side,
            input,
            &run,
            &self.counters,
            &after,
        )
        .and_then(|()| check::tables(&tables));
        self.counters = after;
        result
            .map(|()| run)
            .map_err(|e| format!("{prog} (verdict {}): {e}", r.verdict))
    }
}

// ---------------------------------------------------------------------------
// The invariants.

mod check {
    use super::*;

    /// What the checks read besides the run itself.
    pub struct World<'a> {
        pub nics: &'a Nics,
        pub cfg: &'a NatConfig,
        pub routes: &'a Routes,
        pub tables: &'a Tables,
        pub frags: &'a [(FragKey, FragValue)],
    }

    /// Every check of one run of a program at `hook_id`.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        w: &World,
        hook: Hook,
        hook_id: u32,
        side: Side,
        input: &[u8],
        run: &Run,
        before: &Counters,
        after: &Counters,
    ) -> Result<(), String> {
        let reason = counted_once(hook_id, before, after)?;
        let sent_error = after.get(hook_id, stats::EV_ICMP_NO_PORT_SENT)
            > before.get(hook_id, stats::EV_ICMP_NO_PORT_SENT);
        verdict_matches(hook, reason, run.verdict, sent_error)?;
        let redirect = match hook {
            Hook::Xdp => run.verdict == XDP_REDIRECT,
            Hook::Tc => run.verdict == TC_ACT_REDIRECT,
        };
        if hook == Hook::Xdp && run.verdict == XDP_PASS && run.out != input {
            return Err("XDP changed a frame it passed on".into());
        }
        let to_kernel = hook == Hook::Tc && run.verdict == TC_ACT_OK;
        if redirect || (to_kernel && run.out != input) {
            return emitted(w, hook, side, input, &run.out);
        }
        if to_kernel {
            return untranslated_to_kernel(w, side, input);
        }
        Ok(())
    }

    /// The one verdict counted at `hook_id` (and nothing anywhere else).
    fn counted_once(hook_id: u32, before: &Counters, after: &Counters) -> Result<u32, String> {
        let mut verdicts = Vec::new();
        for (h, hl) in stats::HOOKS {
            for (r, l) in stats::LABELS {
                let d = after.get(h, *r) - before.get(h, *r);
                if d == 0 {
                    continue;
                }
                if h != hook_id {
                    return Err(format!("counted {l} at {hl}, another hook"));
                }
                if stats::kind(*r) == Some(Kind::Verdict) {
                    verdicts.push((*r, *l, d));
                }
            }
        }
        match verdicts[..] {
            [(r, _, 1)] => Ok(r),
            _ => Err(format!(
                "counted {verdicts:?} as verdicts (label, count): not exactly one"
            )),
        }
    }

    /// A verdict's reason says what the program did.
    fn verdict_matches(
        hook: Hook,
        reason: u32,
        verdict: u32,
        sent_error: bool,
    ) -> Result<(), String> {
        let l = stats::label(reason);
        let (pass, drop, redirect) = match hook {
            Hook::Xdp => (XDP_PASS, XDP_DROP, XDP_REDIRECT),
            Hook::Tc => (TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT),
        };
        let want: &[u32] = if l.ends_with("_forwarded") {
            &[redirect]
        } else if reason == stats::DROP_NO_PORT && hook == Hook::Tc && sent_error {
            // The packet itself became the ICMP error to its sender.
            &[redirect]
        } else if l.starts_with("drop_")
            || reason == stats::TC_FRAG_HELD
            || reason == stats::TC_FRAG_REINJECTED
        {
            &[drop]
        } else if l.starts_with("pass_")
            || l.starts_with("xdp_to_tc_")
            || reason == stats::TC_TO_KERNEL_FRAGMENT
        {
            &[pass]
        } else {
            return Err(format!("verdict {l}: no rule says what it does"));
        };
        if want.contains(&verdict) {
            Ok(())
        } else {
            Err(format!("counted {l}, but the program returned {verdict}"))
        }
    }

    /// Nothing the kernel gets untranslated is a packet it forwards out of
    /// `ext` with a source other than the SNAT address, or into `int` from
    /// outside.
    fn untranslated_to_kernel(w: &World, side: Side, input: &[u8]) -> Result<(), String> {
        let (mac, leak) = match side {
            Side::Int => (w.nics.int_mac, Nic::Ext),
            Side::Ext => (w.nics.ext_mac, Nic::Int),
        };
        let Some(v) = View::of(input) else {
            return Ok(());
        };
        if w.routes.kernel_forwards(input, mac) == Some(leak)
            && !(leak == Nic::Ext && v.src == w.cfg.snat_addr)
        {
            return Err(format!(
                "passed untranslated to the kernel, which forwards it out of {leak:?}: {} -> {}",
                ip_of(v.src),
                ip_of(v.dst)
            ));
        }
        Ok(())
    }

    /// A frame the program sent on (redirected, or rewritten for the
    /// kernel to forward).
    fn emitted(w: &World, hook: Hook, side: Side, input: &[u8], out: &[u8]) -> Result<(), String> {
        let i = View::of(input).ok_or("sent on a frame that came in as no IPv4")?;
        let o = View::of(out).ok_or("sent on a frame that is no IPv4")?;
        let dst = ip_of(o.dst);
        if w.routes.not_forwarded(dst) {
            return Err(format!("sent on a frame to {dst}, which is not forwarded"));
        }
        // Rewritten MACs say which NIC the program sent it out of (its
        // own MAC as the source); untouched ones (bpf_redirect_neigh fills
        // them in on the way out) leave it to the route.
        let egress = if out[..12] == input[..12] {
            Routes::egress(dst)
        } else if out[6..12] == w.nics.int_mac && out[0] & 1 == 0 {
            Nic::Int
        } else if out[6..12] == w.nics.ext_mac && out[0] & 1 == 0 {
            Nic::Ext
        } else {
            return Err(format!(
                "sent from MAC {:02x?} to {:02x?}",
                &out[6..12],
                &out[..6]
            ));
        };
        if o.ttl == 0 {
            return Err("sent on with TTL 0".into());
        }
        match (egress, side) {
            (Nic::Ext, Side::Int) if o.src != w.cfg.snat_addr => {
                return Err(format!("left ext with source {}", ip_of(o.src)));
            }
            (Nic::Ext, Side::Ext) => return Err("sent back out of ext".into()),
            (Nic::Int, Side::Ext) => permitted_in(w, &i, &o)?,
            (Nic::Int, Side::Int) => back_inside(w, &i, &o)?,
            _ => {}
        }
        checksums(hook, &i, &o)
    }

    fn rev(w: &World, proto: u8, port: u16) -> Option<(u32, u16)> {
        let key = BindKey::new(proto, w.cfg.snat_addr, port.to_be());
        w.tables
            .bind_rev
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| (v.addr, u16::from_be(v.port)))
    }

    fn session(w: &World, key: CtKey) -> Option<CtValue> {
        w.tables
            .sessions
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
    }

    /// A frame from `ext` into `int`: the binding of the external endpoint
    /// it came to names where it goes, and a session lets it in.
    fn permitted_in(w: &World, i: &View, o: &View) -> Result<(), String> {
        let snat = w.cfg.snat_addr;
        if i.dst != snat {
            return Err(format!("let in a frame sent to {}", ip_of(i.dst)));
        }
        if o.offset() > 0 {
            let key = FragKey {
                src_addr: i.src,
                dst_addr: i.dst,
                id: i.id.to_be(),
                proto: i.proto,
                _pad: 0,
            };
            return match w.frags.iter().find(|(k, _)| *k == key) {
                Some((_, v)) if v.inside_addr == o.dst => Ok(()),
                other => Err(format!("let in a following fragment, tracked as {other:?}")),
            };
        }
        if o.is_icmp_error() {
            let (iq, oq) = (
                i.quote().ok_or("no quote in")?,
                o.quote().ok_or("no quote out")?,
            );
            if iq.src != snat {
                return Err("let in an error about a packet not from the SNAT address".into());
            }
            let (ext, inside_port, rport) = if iq.proto == IPPROTO_ICMP {
                (iq.port(4), oq.port(4), Some(0))
            } else {
                (iq.sport(), oq.sport(), iq.dport())
            };
            let ports = (ext, inside_port, rport);
            return bound_session(w, iq.proto, ports, o.dst, iq.dst, "an error").map(drop);
        }
        let (ext, iport, rport) = match i.proto {
            IPPROTO_ICMP => (i.port(4), o.port(4), Some(0)),
            _ => (i.dport(), o.dport(), i.sport()),
        };
        let (ext, v) = bound_session(w, i.proto, (ext, iport, rport), o.dst, i.src, "a frame")?;
        // The fixture's pool is one address, slot 0.
        if (v.pool(), v.ext_port) == (0, ext.to_be()) && i.dst == snat {
            Ok(())
        } else {
            Err(format!("let in a frame of session {v:?}"))
        }
    }

    /// The session that lets in `what` (a frame, or an error about one)
    /// of protocol `proto` from `remote`, sent to external port `ext` and
    /// let in to `inside`:`iport` (`ports`: ext, iport, the remote's port):
    /// the binding of the external port must name that inside endpoint.
    /// Returns the external port and the session.
    fn bound_session(
        w: &World,
        proto: u8,
        ports: (Option<u16>, Option<u16>, Option<u16>),
        inside: u32,
        remote: u32,
        what: &str,
    ) -> Result<(u16, CtValue), String> {
        let (Some(ext), Some(iport), Some(rport)) = ports else {
            return Err(format!("let in {what} without ports"));
        };
        if rev(w, proto, ext) != Some((inside, iport)) {
            return Err(format!(
                "let in {what} for {}:{iport} at external port {ext}, bound to {:?}",
                ip_of(inside),
                rev(w, proto, ext)
            ));
        }
        let key = CtKey::new(proto, inside, iport.to_be(), remote, rport.to_be());
        session(w, key)
            .map(|v| (ext, v))
            .ok_or_else(|| format!("let in {what} of no session"))
    }

    /// A frame from `int` sent back into `int`: a hairpin to the inside
    /// endpoint its binding names, or the out-of-ports error to its sender.
    fn back_inside(w: &World, i: &View, o: &View) -> Result<(), String> {
        if o.icmp_type() == Some((3, 13)) && o.src == raw(NAT_INT_IP) && o.dst == i.src {
            return Ok(());
        }
        let snat = w.cfg.snat_addr;
        if i.dst != snat || o.src != snat {
            return Err(format!(
                "sent {} -> {} back inside",
                ip_of(o.src),
                ip_of(o.dst)
            ));
        }
        if o.is_icmp_error() {
            let iq = i.quote().ok_or("no quote")?;
            let sender = iq.sport().and_then(|p| rev(w, iq.proto, p));
            return match sender {
                Some((addr, _)) if addr == o.dst => Ok(()),
                _ => Err(format!("hairpinned an error to {}", ip_of(o.dst))),
            };
        }
        let (Some(ext), Some(iport)) = (i.dport(), o.dport()) else {
            return Err("hairpinned a frame without ports".into());
        };
        if rev(w, i.proto, ext) != Some((o.dst, iport)) {
            return Err(format!("hairpinned to {}:{iport}", ip_of(o.dst)));
        }
        let key = CtKey::new(
            i.proto,
            o.dst,
            iport.to_be(),
            snat,
            o.sport().unwrap_or(0).to_be(),
        );
        session(w, key)
            .map(drop)
            .ok_or_else(|| "hairpinned a frame of no session".into())
    }

    /// One's complement equality: 0x0000 and 0xffff are the same value.
    fn same(a: u16, b: u16) -> bool {
        a == b || (a == 0 && b == 0xffff) || (a == 0xffff && b == 0)
    }

    /// What the checksum of the L4 segment of `v` (pseudo-header included
    /// for TCP and UDP) computes to: 0 when it verifies.
    fn l4_residual(v: &View) -> u16 {
        match v.proto {
            IPPROTO_TCP | IPPROTO_UDP => l4_checksum(ip_of(v.src), ip_of(v.dst), v.proto, v.l4),
            _ => internet_checksum(v.l4),
        }
    }

    fn checksums(hook: Hook, i: &View, o: &View) -> Result<(), String> {
        let built = o.icmp_type() == Some((3, 13)) && i.icmp_type() != Some((3, 13));
        if built {
            // The gateway's own error: everything computed afresh.
            if internet_checksum(o.header()) != 0 || internet_checksum(o.l4) != 0 {
                return Err("the out-of-ports error does not verify".into());
            }
            return Ok(());
        }
        if !same(internet_checksum(o.header()), internet_checksum(i.header())) {
            return Err(format!(
                "IP header checksum residual {:#06x} -> {:#06x}",
                internet_checksum(i.header()),
                internet_checksum(o.header())
            ));
        }
        if o.offset() > 0 || o.l4.len() != i.l4.len() {
            return Ok(());
        }
        let field = |v: &View| v.port(if v.proto == IPPROTO_TCP { 16 } else { 6 });
        if matches!(o.proto, IPPROTO_TCP | IPPROTO_UDP) {
            if o.proto == IPPROTO_UDP {
                let (fi, fo) = (field(i), field(o));
                if fi.is_some() && (fi == Some(0)) != (fo == Some(0)) {
                    return Err(format!("UDP checksum field {fi:?} -> {fo:?}"));
                }
            }
            if hook == Hook::Xdp
                && let Some(f) = field(i)
            {
                let l4_len = i.tot_len.saturating_sub(i.ihl);
                let partial = !l4_checksum(ip_of(i.src), ip_of(i.dst), i.proto, &vec![0; l4_len]);
                if !(i.proto == IPPROTO_UDP && f == 0) && same(f, partial) {
                    return Err("XDP translated a checksum that may be partial".into());
                }
            }
        }
        let no_checksum = i.proto == IPPROTO_UDP && field(i) == Some(0);
        let (ri, ro) = (l4_residual(i), l4_residual(o));
        if !no_checksum && !same(ri, ro) {
            return Err(format!("L4 checksum residual {ri:#06x} -> {ro:#06x}"));
        }
        if o.is_icmp_error()
            && let (Some(iq), Some(oq)) = (i.quote(), o.quote())
        {
            let (ci, co) = (
                internet_checksum(iq.header()),
                internet_checksum(oq.header()),
            );
            if !same(ci, co) {
                return Err(format!("quoted IP header residual {ci:#06x} -> {co:#06x}"));
            }
        }
        Ok(())
    }

    /// Each session has its binding both ways; both halves of each binding
    /// point at each other.
    pub fn tables(t: &Tables) -> Result<(), String> {
        let bad = t.inconsistencies();
        if bad.is_empty() {
            return Ok(());
        }
        let mut s = String::from("the tables are inconsistent:");
        for b in bad {
            let _ = write!(s, "\n  {b}");
        }
        Err(s)
    }
}

// ---------------------------------------------------------------------------
// The tests.

fn hex(frame: &[u8]) -> String {
    frame.iter().map(|b| format!("{b:02x}")).collect()
}

fn cases() -> u32 {
    std::env::var("NAT_PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

fn seed() -> [u8; 32] {
    let s: u64 = std::env::var("NAT_PROPTEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SEED);
    let mut out = [0u8; 32];
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&(s.rotate_left(i as u32 * 16) ^ i as u64).to_le_bytes());
    }
    out
}

/// The first packet of flow `i`, out: a SYN with an MSS option (1460,
/// as Linux sends) for TCP.
fn opening(i: usize) -> Step {
    Step {
        flow: i,
        what: What::Out(Body {
            tcp_flags: 0x02,
            tcp_options: vec![[2, 4, 0x05, 0xb4]],
            ..Rig::plain()
        }),
        entry: Entry::Pipeline,
        mutations: vec![],
    }
}

/// Runs `f` with the programs loaded with `cfg` in a new lab's `nat`.
fn with_rig<R: Send>(
    cfg_of: impl Fn(&Nics) -> NatConfig,
    max_flows: u32,
    f: impl FnOnce(&mut Rig) -> R + Send,
) -> R {
    with_rig_policy(cfg_of, max_flows, None, f)
}

/// The egress policy and the inside prefixes (anti-spoofing) a rig's
/// programs are given.
type RigPolicy = (Policy, Vec<(Ipv4Addr, u8)>);

/// [`with_rig`], the programs given `policy` before the first frame.
fn with_rig_policy<R: Send>(
    cfg_of: impl Fn(&Nics) -> NatConfig,
    max_flows: u32,
    policy: Option<RigPolicy>,
    f: impl FnOnce(&mut Rig) -> R + Send,
) -> R {
    let (lab, nics, routes) = rig_lab();
    let cfg = cfg_of(&nics);
    let routes = &routes;
    lab.in_ns(Host::Nat, move || {
        let mut ebpf = dataplane::load(&cfg, max_flows).expect("loading the eBPF object");
        if let Some((policy, nets)) = policy {
            let mut maps = PolicyMaps::take(&mut ebpf).expect("the policy maps");
            maps.set_inside_nets(&nets).expect("the inside prefixes");
            maps.install(&policy).expect("installing the policy");
        }
        let counters = Counters::of(&ebpf).expect("counters");
        let mut rig = Rig {
            ebpf,
            nics,
            cfg,
            routes,
            counters,
        };
        f(&mut rig)
    })
    .expect("running in the nat namespace")
}

/// A lab with neighbours pinned for the inside hosts (but one), and its
/// local table.
fn rig_lab() -> (Lab, Nics, Routes) {
    let lab = lab();
    let nics = Nics::of(&lab).expect("the lab's NICs");
    for ip in INSIDE {
        if ip != CLIENT1_IP && ip != UNRESOLVED_INSIDE {
            lab.pin_neighbour(Host::Nat, ip, made_up_mac(ip), INT_IF)
                .expect("pinning a neighbour");
        }
    }
    let routes = Routes::read(&lab);
    (lab, nics, routes)
}

/// Runs the generated cases against the programs loaded with `cfg`, and
/// fails unless every `hook/reason` of `reached` was counted at least once.
fn property(cfg_of: impl Fn(&Nics) -> NatConfig, max_flows: u32, reached: &[&str]) {
    property_with(cfg_of, max_flows, None, reached)
}

/// [`property`] with an egress policy and anti-spoofing prefixes.
fn property_with(
    cfg_of: impl Fn(&Nics) -> NatConfig,
    max_flows: u32,
    policy: Option<RigPolicy>,
    reached: &[&str],
) {
    let counters = with_rig_policy(cfg_of, max_flows, policy, |rig| {
        let rig = std::cell::RefCell::new(rig);
        let config = Config {
            cases: cases(),
            failure_persistence: None,
            max_shrink_iters: 2000,
            ..Config::default()
        };
        let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &seed());
        let mut runner = TestRunner::new_with_rng(config, rng);
        runner
            .run(&case(), |case| {
                let mut rig = rig.borrow_mut();
                rig.clear().map_err(TestCaseError::fail)?;
                let opening: Vec<Step> = if case.opened {
                    (0..case.flows.len()).map(opening).collect()
                } else {
                    vec![]
                };
                for (n, step) in opening.iter().chain(&case.steps).enumerate() {
                    let frame = rig.build(&case, step);
                    let side = step.what.side();
                    rig.exec(side, step.entry, &frame).map_err(|e| {
                        TestCaseError::fail(format!(
                            "step {n} ({side:?}, {:?}): {e}\n  frame {}",
                            step.entry,
                            hex(&frame)
                        ))
                    })?;
                }
                Ok(())
            })
            .map_err(|e| e.to_string())?;
        Ok(rig.into_inner().counters.clone())
    })
    .unwrap_or_else(|e: String| panic!("{e}"));
    // What the cases reached, so a generator that stopped reaching the
    // translations would fail here rather than pass on nothing.
    let mut seen = Vec::new();
    for (h, hl) in stats::HOOKS {
        for (r, l) in stats::LABELS {
            let n = counters.get(h, *r);
            if n > 0 {
                seen.push(format!("{hl}/{l}={n}"));
            }
        }
    }
    eprintln!("counted over {} cases: {}", cases(), seen.join(" "));
    let missing: Vec<&&str> = reached
        .iter()
        .filter(|want| !seen.iter().any(|s| s.starts_with(&format!("{want}="))))
        .collect();
    assert!(missing.is_empty(), "never counted: {missing:?}");
}

/// What every configuration's cases must reach: each program's
/// translations, hairpins, ICMP errors both ways, fragments (held and
/// re-injected too), the kernel's fragmentation, malformed frames and bad
/// checksums.
const REACHED: [&str; 14] = [
    "xdp_int/xdp_out_forwarded",
    "xdp_ext/xdp_in_forwarded",
    "tc_int/tc_out_forwarded",
    "tc_ext/tc_in_forwarded",
    "tc_int/tc_hairpin_forwarded",
    "tc_int/tc_out_icmp_error_forwarded",
    "tc_ext/tc_in_icmp_error_forwarded",
    "tc_int/tc_fragment_forwarded",
    "tc_ext/tc_fragment_first_forwarded",
    "tc_ext/tc_fragment_held",
    "tc_ext/tc_fragment_reinjected",
    "tc_int/tc_translated_for_kernel_fragmentation",
    "xdp_int/drop_malformed",
    "tc_ext/drop_bad_checksum",
];

#[test]
fn generated_frames_keep_every_invariant_with_default_settings() {
    property(|n| n.config(1024, 65535), 1024, &REACHED);
}

/// Two external ports and four sessions: exhaustion, the out-of-ports
/// error, a full table, on almost every case.
#[test]
fn generated_frames_keep_every_invariant_with_ports_and_table_exhausted() {
    property(
        |n| n.config(40000, 40001).with_low_ports(600, 601),
        4,
        &[
            &REACHED[..],
            &[
                "tc_int/drop_no_free_port",
                "tc_int/icmp_out_of_ports_sent",
                "xdp_int/drop_table_full",
            ],
        ]
        .concat(),
    );
}

/// The other filtering modes let inbound packets open sessions; MSS
/// clamping sends SYNs through its own tail-called program.
#[test]
fn generated_frames_keep_every_invariant_with_open_filtering_and_mss_clamping() {
    property(
        |n| {
            n.config(1024, 65535)
                .with_filtering(FILTER_ENDPOINT_INDEPENDENT)
                .with_mss_clamp(1200)
        },
        1024,
        &[
            &REACHED[..],
            &[
                "tc_int/event_mss_clamped",
                "tc_ext/event_mss_clamped",
                "xdp_ext/event_inbound_session",
            ],
        ]
        .concat(),
    );
    property(
        |n| n.config(1024, 65535).with_filtering(FILTER_ADDRESS),
        1024,
        &[&REACHED[..], &["xdp_ext/event_inbound_session"]].concat(),
    );
}

/// An egress policy whose denials drop (its answers leave `int` as new
/// packets: the fixtures and lab tests check those) and anti-spoofing
/// with a prefix that leaves three of the inside hosts out; open filtering,
/// so that sessions opened from outside are judged too.
#[test]
fn generated_frames_keep_every_invariant_with_an_egress_policy_and_anti_spoofing() {
    let rule = |dst: Ipv4Addr, proto, ports| Rule {
        name: String::new(),
        inside: Prefix::ANY,
        dst: Prefix::new(dst, 32),
        proto,
        ports,
        verdict: Verdict::Deny(ANSWER_DROP),
    };
    let policy = Policy {
        rules: vec![
            rule(Ipv4Addr::new(203, 0, 113, 9), IPPROTO_TCP, (0, 65535)),
            rule(SERVER_IP, IPPROTO_UDP, (40000, 40001)),
            rule(SERVER_IP, IPPROTO_UDP, (53, 53)),
        ],
        default: Verdict::Allow,
    };
    // 10.1.0.0/28: client1 and client2 (.11, .12) in, .20, .21, .30 out.
    let nets = vec![(Ipv4Addr::new(10, 1, 0, 0), 28)];
    property_with(
        |n| {
            n.config(1024, 65535)
                .with_filtering(FILTER_ENDPOINT_INDEPENDENT)
                .with_flags(CFG_F_ANTI_SPOOFING)
        },
        1024,
        Some((policy, nets)),
        &[
            &REACHED[..],
            &["xdp_int/drop_spoofed_source", "xdp_int/drop_policy_denied"],
        ]
        .concat(),
    );
}

/// Every kind of frame the generator makes, cut at every offset from the
/// shortest test frame to its whole length, through both hooks (XDP then
/// TC, and TC alone) of its NIC, with the sessions open: every invariant
/// holds for every prefix.
#[test]
fn every_truncation_of_every_kind_of_frame_keeps_every_invariant() {
    let flow = |proto, iport, rport| Flow {
        proto,
        inside: CLIENT1_IP,
        iport,
        remote: SERVER_IP,
        rport,
    };
    let case = Case {
        flows: vec![
            flow(Proto::Tcp, 40000, 80),
            flow(Proto::Udp, 40001, 53),
            flow(Proto::Icmp, 40002, 0),
        ],
        opened: true,
        steps: vec![],
    };
    let body = || Body {
        tcp_flags: 0x12,
        payload: 40,
        options: vec![[1, 1, 1, 0]],
        tcp_options: vec![[2, 4, 0x05, 0xb4]],
        ..Rig::plain()
    };
    let mut kinds: Vec<(usize, What)> = Vec::new();
    for f in 0..3 {
        kinds.push((f, What::Out(body())));
        kinds.push((
            f,
            What::Reply {
                body: body(),
                from: None,
            },
        ));
        kinds.push((
            f,
            What::ErrIn {
                kind: (3, 3),
                quote: None,
                corrupt: 0,
                from_router: true,
            },
        ));
        kinds.push((
            f,
            What::ErrOut {
                kind: (3, 3),
                quote: None,
                corrupt: 0,
            },
        ));
    }
    kinds.push((
        1,
        What::Hairpin {
            to: 0,
            body: body(),
        },
    ));
    let runs = with_rig(
        |n| n.config(1024, 65535),
        1024,
        |rig| -> Result<usize, String> {
            let mut runs = 0;
            for i in 0..case.flows.len() {
                let step = opening(i);
                let frame = rig.build(&case, &step);
                rig.exec(Side::Int, Entry::Pipeline, &frame)?;
            }
            for (flow, what) in &kinds {
                let step = Step {
                    flow: *flow,
                    what: what.clone(),
                    entry: Entry::Pipeline,
                    mutations: vec![],
                };
                let whole = rig.build(&case, &step);
                let side = what.side();
                for cut in MIN_FRAME..=whole.len() {
                    for entry in [Entry::Pipeline, Entry::TcOnly] {
                        rig.exec(side, entry, &whole[..cut]).map_err(|e| {
                            format!(
                                "{what:?} cut at {cut} ({entry:?}): {e}\n  frame {}",
                                hex(&whole)
                            )
                        })?;
                        runs += 1;
                    }
                }
            }
            Ok(runs)
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{runs} truncated frames run");
}

//! Egress policy: which new outbound flows may be translated. An ordered
//! list of rules (inside prefix, destination prefix, protocol, destination
//! port range, allow or deny with an answer), first match wins, and a
//! default. The verdict is taken once per flow, when its session would be
//! created; established flows never consult it.
//!
//! The dataplane cannot walk thousands of rules per new flow, so the rules
//! are compiled ([`compile`]) into what it looks up:
//! - [`crate::MAP_POLICY_DST`], an LPM trie keyed by (generation,
//!   destination): every distinct destination prefix of the rules (and
//!   0.0.0.0/0) maps to the ordered list of the rules whose destination
//!   prefix contains it ([`PolicyList`], at most [`MAX_CANDIDATES`]). A
//!   destination's longest matching prefix is the most specific one, and
//!   the rules whose prefix holds the destination are exactly the rules
//!   whose prefix holds that one (prefixes nest or are disjoint).
//! - [`crate::MAP_POLICY_RULES`]: the rules' other fields ([`PolicyRule`]),
//!   checked in list order ([`PolicyRule::matches`]); the first that
//!   matches decides. Every list ends with a rule matching everything (the
//!   default at the latest), so the walk always decides.
//!
//! Two generations live side by side; [`crate::MAP_POLICY_STATE`] says
//! which one the dataplane reads. A new policy is written into the idle one
//! and then made active with one 4-byte write, so no packet sees half a
//! policy.

/// Most rules whose destination prefixes all contain one address and that
/// a flow may have to be checked against (the bounded walk). The compiler
/// refuses a policy with a longer list.
pub const MAX_CANDIDATES: usize = 64;
/// Most rules a policy may have (the default is one more).
pub const MAX_RULES: u32 = 16_384;
/// Entries per generation in the rule and hit-counter arrays: the rules
/// and the default.
pub const RULE_STRIDE: u32 = MAX_RULES + 1;
/// Entries of the destination trie: every rule's prefix and 0.0.0.0/0, per
/// generation.
pub const DST_ENTRIES: u32 = 2 * RULE_STRIDE;

/// [`crate::MAP_POLICY_STATE`]'s only entry: no policy (everything is
/// allowed, nothing is looked up).
pub const STATE_NONE: u32 = 0;
/// ... generation 0 (1) or 1 (2) is active.
pub const fn state_for(generation: u32) -> u32 {
    generation + 1
}

/// What a matching rule does with the flow.
pub const ACTION_ALLOW: u8 = 0;
pub const ACTION_DENY: u8 = 1;
/// How a denied flow's packet is answered.
pub const ANSWER_DROP: u8 = 0;
/// ICMP Destination Unreachable, code 13 (administratively prohibited),
/// from `--int`'s address, rate-limited.
pub const ANSWER_ICMP: u8 = 1;
/// A TCP RST from the destination (other protocols: dropped).
pub const ANSWER_RST: u8 = 2;

/// Protocol match: any protocol the gateway translates.
pub const PROTO_ANY: u8 = 0;

/// Data of a destination trie key (the key is `(prefix length, data)`):
/// the generation, big-endian (any fixed encoding: it is always matched
/// whole), then the destination address (network order). Both
/// generations share one trie.
pub const fn dst_key(generation: u32, dst: u32) -> [u32; 2] {
    [generation.to_be(), dst]
}

/// Prefix length of a destination trie key: the generation's 32 bits and
/// the destination prefix's.
pub const fn dst_key_len(len: u8) -> u32 {
    32 + len as u32
}

/// Value of the destination trie: the rules (indexes into the
/// generation's block of [`crate::MAP_POLICY_RULES`]) to check, in order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct PolicyList {
    pub len: u32,
    pub rules: [u16; MAX_CANDIDATES],
}

/// A rule as the dataplane checks it (its destination is the trie's).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct PolicyRule {
    /// Inside prefix: address and mask, network order.
    pub src: u32,
    pub src_mask: u32,
    /// Destination ports, inclusive, host order; only TCP and UDP flows
    /// have ports: a rule with a range other than 0-65535 never matches
    /// ICMP.
    pub port_min: u16,
    pub port_max: u16,
    /// IP protocol, or [`PROTO_ANY`].
    pub proto: u8,
    pub action: u8,
    pub answer: u8,
    pub _pad: u8,
}

impl PolicyRule {
    /// Whether a flow from `src` (network order) of `proto` to port `port`
    /// (host order; 0 for ICMP) matches, its destination already matched.
    #[inline(always)]
    pub const fn matches(&self, src: u32, proto: u8, port: u16) -> bool {
        if src & self.src_mask != self.src {
            return false;
        }
        if self.proto != PROTO_ANY && self.proto != proto {
            return false;
        }
        if self.port_min == 0 && self.port_max == u16::MAX {
            return true;
        }
        (proto == crate::IPPROTO_TCP || proto == crate::IPPROTO_UDP)
            && port >= self.port_min
            && port <= self.port_max
    }

    /// Whether it matches every flow (with its destination).
    pub const fn catch_all(&self) -> bool {
        self.src_mask == 0
            && self.proto == PROTO_ANY
            && self.port_min == 0
            && self.port_max == u16::MAX
    }
}

/// The network-order mask of a prefix length.
pub const fn mask(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        (u32::MAX << (32 - len as u32)).to_be()
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: Pod (checked by bytemuck's derive: no padding).
    unsafe impl aya::Pod for super::PolicyList {}
    unsafe impl aya::Pod for super::PolicyRule {}
}

#[cfg(any(test, feature = "user"))]
pub use model::*;

/// The host side: rules as the operator writes them, the first-match
/// reference walk, and the compiler.
#[cfg(any(test, feature = "user"))]
mod model {
    extern crate alloc;
    use alloc::{collections::BTreeSet, format, string::String, vec::Vec};
    use core::net::Ipv4Addr;

    use super::*;

    /// An IPv4 prefix, normalized (no bits set past its length).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
    pub struct Prefix {
        pub addr: Ipv4Addr,
        pub len: u8,
    }

    impl Prefix {
        pub const ANY: Prefix = Prefix {
            addr: Ipv4Addr::UNSPECIFIED,
            len: 0,
        };

        /// The prefix of `addr` of length `len` (≤ 32), host bits cleared.
        pub fn new(addr: Ipv4Addr, len: u8) -> Prefix {
            let len = len.min(32);
            let m = u32::from_be(mask(len));
            Prefix {
                addr: Ipv4Addr::from(u32::from(addr) & m),
                len,
            }
        }

        pub fn contains(&self, a: Ipv4Addr) -> bool {
            u32::from(a) & u32::from_be(mask(self.len)) == u32::from(self.addr)
        }

        /// Whether every address of `other` is in this prefix.
        pub fn covers(&self, other: &Prefix) -> bool {
            self.len <= other.len && self.contains(other.addr)
        }

        /// The address in network order, as the maps hold it.
        pub fn raw(&self) -> u32 {
            u32::from_ne_bytes(self.addr.octets())
        }
    }

    impl core::fmt::Display for Prefix {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            write!(f, "{}/{}", self.addr, self.len)
        }
    }

    /// What a rule (or the default) does.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Verdict {
        Allow,
        /// Deny, answered with one of the `ANSWER_*` constants.
        Deny(u8),
    }

    impl Verdict {
        fn encode(self) -> (u8, u8) {
            match self {
                Verdict::Allow => (ACTION_ALLOW, ANSWER_DROP),
                Verdict::Deny(a) => (ACTION_DENY, a),
            }
        }

        pub fn decode(action: u8, answer: u8) -> Verdict {
            if action == ACTION_ALLOW {
                Verdict::Allow
            } else {
                Verdict::Deny(answer)
            }
        }
    }

    impl core::fmt::Display for Verdict {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            match self {
                Verdict::Allow => f.write_str("allow"),
                Verdict::Deny(ANSWER_ICMP) => f.write_str("deny (icmp-prohibited)"),
                Verdict::Deny(ANSWER_RST) => f.write_str("deny (tcp-reset)"),
                Verdict::Deny(_) => f.write_str("deny (drop)"),
            }
        }
    }

    /// A rule as configured.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct Rule {
        pub name: String,
        pub inside: Prefix,
        pub dst: Prefix,
        /// IP protocol or [`PROTO_ANY`].
        pub proto: u8,
        /// Destination ports, inclusive (0-65535: any).
        pub ports: (u16, u16),
        pub verdict: Verdict,
    }

    impl Rule {
        /// The reference semantics: whether this rule matches the flow.
        pub fn matches(&self, src: Ipv4Addr, dst: Ipv4Addr, proto: u8, port: u16) -> bool {
            self.dst.contains(dst)
                && self
                    .compiled()
                    .matches(u32::from_ne_bytes(src.octets()), proto, port)
        }

        fn compiled(&self) -> PolicyRule {
            let (action, answer) = self.verdict.encode();
            PolicyRule {
                src: self.inside.raw(),
                src_mask: mask(self.inside.len),
                port_min: self.ports.0,
                port_max: self.ports.1,
                proto: self.proto,
                action,
                answer,
                _pad: 0,
            }
        }
    }

    /// A whole policy: rules in order, and what applies when none matches.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct Policy {
        pub rules: Vec<Rule>,
        pub default: Verdict,
    }

    impl Default for Policy {
        /// Today's behaviour: everything allowed.
        fn default() -> Self {
            Policy {
                rules: Vec::new(),
                default: Verdict::Allow,
            }
        }
    }

    /// Which rule decides a flow: its index, or `None` for the default.
    pub type Decision = (Option<usize>, Verdict);

    impl Policy {
        /// The reference semantics: first match wins, in order.
        pub fn decide(&self, src: Ipv4Addr, dst: Ipv4Addr, proto: u8, port: u16) -> Decision {
            for (i, r) in self.rules.iter().enumerate() {
                if r.matches(src, dst, proto, port) {
                    return (Some(i), r.verdict);
                }
            }
            (None, self.default)
        }

        /// Whether the policy lets everything through (no lookup needed).
        pub fn allows_all(&self) -> bool {
            self.default == Verdict::Allow && self.rules.iter().all(|r| r.verdict == Verdict::Allow)
        }
    }

    /// What the dataplane's maps hold for one generation of a policy.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct Compiled {
        /// Destination trie entries: prefix and the rules to check.
        pub lists: Vec<(Prefix, PolicyList)>,
        /// Rules by index; the last one is the default.
        pub rules: Vec<PolicyRule>,
    }

    /// Compiles a policy, or says why it cannot be (too many rules, or
    /// too many rules overlapping one destination).
    pub fn compile(p: &Policy) -> Result<Compiled, String> {
        if p.rules.len() > MAX_RULES as usize {
            return Err(format!(
                "{} rules; at most {MAX_RULES} are supported",
                p.rules.len()
            ));
        }
        let mut rules: Vec<PolicyRule> = p.rules.iter().map(Rule::compiled).collect();
        let (action, answer) = p.default.encode();
        rules.push(PolicyRule {
            src: 0,
            src_mask: 0,
            port_min: 0,
            port_max: u16::MAX,
            proto: PROTO_ANY,
            action,
            answer,
            _pad: 0,
        });
        let default_idx = p.rules.len();
        let dsts: BTreeSet<Prefix> = core::iter::once(Prefix::ANY)
            .chain(p.rules.iter().map(|r| r.dst))
            .collect();
        let mut lists = Vec::with_capacity(dsts.len());
        for d in dsts {
            let mut list = PolicyList {
                len: 0,
                rules: [0; MAX_CANDIDATES],
            };
            let candidates = p
                .rules
                .iter()
                .enumerate()
                .filter(|(_, r)| r.dst.covers(&d))
                .map(|(i, _)| i)
                .chain(core::iter::once(default_idx));
            for i in candidates {
                if list.len as usize == MAX_CANDIDATES {
                    return Err(format!(
                        "more than {MAX_CANDIDATES} rules apply to destination {d} before one \
                         that matches every flow to it; at most {MAX_CANDIDATES} may overlap"
                    ));
                }
                list.rules[list.len as usize] = i as u16;
                list.len += 1;
                // Nothing after a rule that matches every flow to this
                // destination can decide.
                if rules[i].catch_all() {
                    break;
                }
            }
            lists.push((d, list));
        }
        Ok(Compiled { lists, rules })
    }

    impl Compiled {
        /// What the dataplane decides: the longest destination prefix's
        /// list walked in order. Returns the rule index (the default is
        /// the last) and its verdict.
        pub fn lookup(
            &self,
            src: Ipv4Addr,
            dst: Ipv4Addr,
            proto: u8,
            port: u16,
        ) -> Option<(usize, Verdict)> {
            let (_, list) = self
                .lists
                .iter()
                .filter(|(d, _)| d.contains(dst))
                .max_by_key(|(d, _)| d.len)?;
            let src = u32::from_ne_bytes(src.octets());
            for &i in &list.rules[..list.len as usize] {
                let r = &self.rules[i as usize];
                if r.matches(src, proto, port) {
                    return Some((i as usize, Verdict::decode(r.action, r.answer)));
                }
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};
    use core::net::Ipv4Addr;

    fn rule(name: &str, inside: &str, dst: &str, proto: u8, ports: (u16, u16), v: Verdict) -> Rule {
        let p = |s: &str| {
            let (a, l) = s.split_once('/').unwrap();
            Prefix::new(a.parse().unwrap(), l.parse().unwrap())
        };
        Rule {
            name: name.into(),
            inside: p(inside),
            dst: p(dst),
            proto,
            ports,
            verdict: v,
        }
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn example() -> Policy {
        Policy {
            rules: vec![
                rule(
                    "https-a",
                    "10.0.0.0/8",
                    "198.51.100.0/24",
                    IPPROTO_TCP,
                    (443, 443),
                    Verdict::Allow,
                ),
                rule(
                    "https-b",
                    "10.0.0.0/8",
                    "203.0.113.0/24",
                    IPPROTO_TCP,
                    (443, 443),
                    Verdict::Allow,
                ),
                rule(
                    "dns",
                    "10.0.0.0/8",
                    "192.0.2.53/32",
                    IPPROTO_UDP,
                    (53, 53),
                    Verdict::Allow,
                ),
                rule(
                    "no-smtp",
                    "0.0.0.0/0",
                    "0.0.0.0/0",
                    IPPROTO_TCP,
                    (25, 25),
                    Verdict::Deny(ANSWER_ICMP),
                ),
            ],
            default: Verdict::Deny(ANSWER_RST),
        }
    }

    #[test]
    fn first_match_wins_in_file_order() {
        let p = example();
        let c = compile(&p).unwrap();
        for (src, dst, proto, port, want) in [
            (
                "10.1.2.3",
                "198.51.100.7",
                IPPROTO_TCP,
                443,
                (Some(0), Verdict::Allow),
            ),
            (
                "10.1.2.3",
                "198.51.100.7",
                IPPROTO_TCP,
                80,
                (None, Verdict::Deny(ANSWER_RST)),
            ),
            (
                "10.1.2.3",
                "198.51.100.7",
                IPPROTO_UDP,
                443,
                (None, Verdict::Deny(ANSWER_RST)),
            ),
            (
                "10.1.2.3",
                "203.0.113.9",
                IPPROTO_TCP,
                443,
                (Some(1), Verdict::Allow),
            ),
            (
                "10.1.2.3",
                "192.0.2.53",
                IPPROTO_UDP,
                53,
                (Some(2), Verdict::Allow),
            ),
            (
                "10.1.2.3",
                "192.0.2.54",
                IPPROTO_UDP,
                53,
                (None, Verdict::Deny(ANSWER_RST)),
            ),
            (
                "172.16.0.1",
                "198.51.100.7",
                IPPROTO_TCP,
                443,
                (None, Verdict::Deny(ANSWER_RST)),
            ),
            (
                "10.1.2.3",
                "192.0.2.53",
                IPPROTO_TCP,
                25,
                (Some(3), Verdict::Deny(ANSWER_ICMP)),
            ),
            (
                "10.1.2.3",
                "192.0.2.53",
                IPPROTO_ICMP,
                0,
                (None, Verdict::Deny(ANSWER_RST)),
            ),
        ] {
            let d = p.decide(ip(src), ip(dst), proto, port);
            assert_eq!(d, want, "{src} -> {dst} {proto}/{port}");
            let idx = c.lookup(ip(src), ip(dst), proto, port).unwrap();
            assert_eq!((Some(idx.0).filter(|i| *i < p.rules.len()), idx.1), want);
        }
    }

    #[test]
    fn a_port_range_never_matches_icmp_and_any_port_does() {
        let ranged = rule(
            "r",
            "0.0.0.0/0",
            "0.0.0.0/0",
            PROTO_ANY,
            (1, 65535),
            Verdict::Allow,
        );
        assert!(!ranged.matches(ip("1.1.1.1"), ip("2.2.2.2"), IPPROTO_ICMP, 0));
        assert!(ranged.matches(ip("1.1.1.1"), ip("2.2.2.2"), IPPROTO_UDP, 1));
        let any = rule(
            "a",
            "0.0.0.0/0",
            "0.0.0.0/0",
            PROTO_ANY,
            (0, 65535),
            Verdict::Allow,
        );
        assert!(any.matches(ip("1.1.1.1"), ip("2.2.2.2"), IPPROTO_ICMP, 0));
    }

    #[test]
    fn lists_stop_at_a_rule_matching_everything() {
        let mut p = example();
        p.rules.insert(
            0,
            rule(
                "all",
                "0.0.0.0/0",
                "0.0.0.0/0",
                PROTO_ANY,
                (0, 65535),
                Verdict::Allow,
            ),
        );
        let c = compile(&p).unwrap();
        for (_, l) in &c.lists {
            assert_eq!(l.len, 1);
            assert_eq!(l.rules[0], 0);
        }
    }

    #[test]
    fn too_many_overlapping_rules_are_refused_with_the_destination() {
        let rules = (0..=MAX_CANDIDATES)
            .map(|i| {
                rule(
                    "r",
                    &format!("10.0.{i}.0/24"),
                    "0.0.0.0/0",
                    PROTO_ANY,
                    (0, 65535),
                    Verdict::Allow,
                )
            })
            .collect();
        let e = compile(&Policy {
            rules,
            default: Verdict::Allow,
        })
        .unwrap_err();
        assert!(e.contains("0.0.0.0/0"), "{e}");
    }

    #[test]
    fn thousands_of_distinct_destinations_compile_to_short_lists() {
        let rules: Vec<Rule> = (0..10_000u32)
            .map(|i| {
                let a = Ipv4Addr::from(0x0a00_0000 | (i << 8));
                rule(
                    &format!("r{i}"),
                    "0.0.0.0/0",
                    &format!("{a}/24"),
                    IPPROTO_TCP,
                    (443, 443),
                    Verdict::Allow,
                )
            })
            .collect();
        let p = Policy {
            rules,
            default: Verdict::Deny(ANSWER_DROP),
        };
        let c = compile(&p).unwrap();
        assert_eq!(c.lists.len(), 10_001);
        assert!(c.lists.iter().all(|(_, l)| l.len <= 2));
        let a = ip("10.0.77.5");
        assert_eq!(
            c.lookup(ip("10.9.9.9"), a, IPPROTO_TCP, 443),
            Some((77, Verdict::Allow))
        );
        assert_eq!(
            c.lookup(ip("10.9.9.9"), a, IPPROTO_TCP, 80),
            Some((10_000, Verdict::Deny(ANSWER_DROP)))
        );
    }

    mod property {
        use super::*;
        use proptest::prelude::*;

        // Few distinct values per field so that rules overlap and nest.
        fn prefix() -> impl Strategy<Value = Prefix> {
            (
                prop::sample::select(vec![
                    0u32,
                    0x0a00_0000,
                    0x0a01_0000,
                    0x0a01_0100,
                    0xc000_0200,
                ]),
                0u8..=32,
            )
                .prop_map(|(a, l)| {
                    Prefix::new(
                        Ipv4Addr::from(a | 0x0000_0005),
                        [0, 8, 16, 24, 32][l as usize % 5],
                    )
                })
        }

        fn verdict() -> impl Strategy<Value = Verdict> {
            prop_oneof![Just(Verdict::Allow), (0u8..3).prop_map(Verdict::Deny)]
        }

        fn proto() -> impl Strategy<Value = u8> {
            prop::sample::select(vec![PROTO_ANY, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP])
        }

        fn ports() -> impl Strategy<Value = (u16, u16)> {
            prop_oneof![
                Just((0, 65535)),
                (0u16..100, 0u16..100).prop_map(|(a, b)| (a.min(b), a.max(b)))
            ]
        }

        fn rule() -> impl Strategy<Value = Rule> {
            (prefix(), prefix(), proto(), ports(), verdict()).prop_map(
                |(inside, dst, proto, ports, verdict)| Rule {
                    name: "r".into(),
                    inside,
                    dst,
                    proto,
                    ports,
                    verdict,
                },
            )
        }

        fn addr() -> impl Strategy<Value = Ipv4Addr> {
            (
                prop::sample::select(vec![
                    0u32,
                    0x0a00_0000,
                    0x0a01_0000,
                    0x0a01_0100,
                    0xc000_0200,
                    0x0b00_0000,
                ]),
                0u32..8,
            )
                .prop_map(|(a, low)| Ipv4Addr::from(a | low))
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]
            #[test]
            fn compiled_lookup_decides_as_the_first_match_walk(
                rules in prop::collection::vec(rule(), 0..40),
                default in verdict(),
                flows in prop::collection::vec((addr(), addr(), proto(), 0u16..100), 1..30),
            ) {
                let p = Policy { rules, default };
                let c = compile(&p).unwrap();
                for (src, dst, proto, port) in flows {
                    let proto = if proto == PROTO_ANY { IPPROTO_TCP } else { proto };
                    let port = if proto == IPPROTO_ICMP { 0 } else { port };
                    let (want_idx, want) = p.decide(src, dst, proto, port);
                    let (idx, got) = c.lookup(src, dst, proto, port).expect("every list decides");
                    prop_assert_eq!(got, want);
                    prop_assert_eq!(idx, want_idx.unwrap_or(p.rules.len()));
                }
            }
        }
    }
}

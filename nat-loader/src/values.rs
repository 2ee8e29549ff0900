//! Typed setting values, each parsed and checked in one place: `FromStr`
//! for the flags (cli.rs), serde for the config file (config.rs), so both
//! accept exactly the same values with the same messages.

use std::{fmt, str::FromStr};

use nat_common::{
    DEFAULT_LOW_PORT_MAX, DEFAULT_LOW_PORT_MIN, DEFAULT_PORT_MAX, DEFAULT_PORT_MIN, FILTER_ADDRESS,
    FILTER_ADDRESS_AND_PORT, FILTER_ENDPOINT_INDEPENDENT,
};
use nat_loader::events;
use serde::{Deserialize, Deserializer, de};

/// An inclusive range of ports, `MIN-MAX` (`1 <= MIN <= MAX`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

impl PortRange {
    /// `--port-range`'s default.
    pub const DEFAULT: PortRange = PortRange {
        min: DEFAULT_PORT_MIN,
        max: DEFAULT_PORT_MAX,
    };
    /// `--low-port-range`'s default.
    pub const DEFAULT_LOW: PortRange = PortRange {
        min: DEFAULT_LOW_PORT_MIN,
        max: DEFAULT_LOW_PORT_MAX,
    };

    pub fn contains(self, port: u16) -> bool {
        (self.min..=self.max).contains(&port)
    }

    /// How many ports it holds.
    pub fn size(self) -> usize {
        (self.max - self.min) as usize + 1
    }
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<PortRange, String> {
        let (a, b) = s
            .split_once('-')
            .ok_or_else(|| format!("{s:?} is not MIN-MAX (e.g. 1024-65535)"))?;
        let min: u16 = a
            .trim()
            .parse()
            .map_err(|_| format!("{a:?} is not a port number"))?;
        let max: u16 = b
            .trim()
            .parse()
            .map_err(|_| format!("{b:?} is not a port number"))?;
        if min == 0 || min > max {
            return Err(format!("{s:?}: need 1 <= MIN <= MAX <= 65535"));
        }
        Ok(PortRange { min, max })
    }
}

impl TryFrom<String> for PortRange {
    type Error = String;
    fn try_from(s: String) -> Result<PortRange, String> {
        s.parse()
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}

/// `--mss-clamp`: the largest TCP MSS a SYN may carry through; 0 is off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "u16")]
pub struct MssClamp(pub u16);

impl MssClamp {
    pub const OFF: MssClamp = MssClamp(0);
    /// Linux's own floor for an MSS (TCP_MIN_MSS).
    pub const MIN: u16 = 88;
}

impl TryFrom<u16> for MssClamp {
    type Error = String;
    fn try_from(v: u16) -> Result<MssClamp, String> {
        if v != 0 && v < MssClamp::MIN {
            return Err(format!(
                "{v} is below the smallest MSS TCP accepts ({}); 0 turns clamping off",
                MssClamp::MIN
            ));
        }
        Ok(MssClamp(v))
    }
}

impl FromStr for MssClamp {
    type Err = String;
    fn from_str(s: &str) -> Result<MssClamp, String> {
        let v: u16 = s
            .parse()
            .map_err(|_| format!("{s:?} is not a number of bytes (0-65535)"))?;
        v.try_into()
    }
}

impl fmt::Display for MssClamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A routing table id the loader may fill: not 0 ("unspecified") nor the
/// kernel's default, main and local tables (253-255).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "u32")]
pub struct RouteTable(pub u32);

impl TryFrom<u32> for RouteTable {
    type Error = String;
    fn try_from(t: u32) -> Result<RouteTable, String> {
        if t == 0 || (253..=255).contains(&t) {
            return Err(format!("table {t} is reserved; pick 1-252 or above 255"));
        }
        Ok(RouteTable(t))
    }
}

impl FromStr for RouteTable {
    type Err = String;
    fn from_str(s: &str) -> Result<RouteTable, String> {
        let t: u32 = s
            .parse()
            .map_err(|_| format!("{s:?} is not a table number"))?;
        t.try_into()
    }
}

impl fmt::Display for RouteTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The Scheduled Events URL to watch (plain HTTP: the metadata service's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduledEvents(String);

impl ScheduledEvents {
    pub fn new(url: &str) -> Result<ScheduledEvents, String> {
        events::Imds::new(url)
            .map(|_| ScheduledEvents(url.to_string()))
            .map_err(|e| format!("{e:#}"))
    }

    pub fn url(&self) -> &str {
        &self.0
    }
}

impl FromStr for ScheduledEvents {
    type Err = String;
    fn from_str(s: &str) -> Result<ScheduledEvents, String> {
        ScheduledEvents::new(s)
    }
}

/// In the config file: `true` (the metadata service's URL), `false` (off)
/// or a URL, as `--scheduled-events` alone, absent or with a URL.
pub fn scheduled_events_key<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<ScheduledEvents>>, D::Error> {
    struct V;
    impl de::Visitor<'_> for V {
        type Value = Option<ScheduledEvents>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("true, false or an http:// URL")
        }
        fn visit_bool<E: de::Error>(self, on: bool) -> Result<Self::Value, E> {
            Ok(on.then(|| ScheduledEvents(events::DEFAULT_URL.to_string())))
        }
        fn visit_str<E: de::Error>(self, url: &str) -> Result<Self::Value, E> {
            ScheduledEvents::new(url).map(Some).map_err(E::custom)
        }
    }
    d.deserialize_any(V).map(Some)
}

/// Which inbound packets a binding lets in (RFC 4787 section 5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filtering {
    EndpointIndependent,
    AddressDependent,
    AddressAndPortDependent,
}

impl Filtering {
    /// The dataplane's code (nat-common's `FILTER_*`).
    pub fn code(self) -> u8 {
        match self {
            Filtering::EndpointIndependent => FILTER_ENDPOINT_INDEPENDENT,
            Filtering::AddressDependent => FILTER_ADDRESS,
            Filtering::AddressAndPortDependent => FILTER_ADDRESS_AND_PORT,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_range_accepts_min_max() {
        assert_eq!(
            "1024-65535".parse(),
            Ok(PortRange {
                min: 1024,
                max: 65535
            })
        );
        assert_eq!(
            "5000-5000".parse(),
            Ok(PortRange {
                min: 5000,
                max: 5000
            })
        );
        assert!(PortRange::DEFAULT.contains(PortRange::DEFAULT.max));
        assert!(!PortRange::DEFAULT.contains(PortRange::DEFAULT_LOW.max));
    }

    #[test]
    fn port_range_rejects_reversed_zero_and_garbage() {
        for bad in ["2000-1000", "0-100", "1024", "a-b", "1-70000"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
        let e = "2000-1000".parse::<PortRange>().expect_err("reversed");
        assert!(e.contains("MIN <= MAX"), "{e}");
    }

    #[test]
    fn mss_clamp_accepts_off_and_real_sizes_only() {
        assert_eq!("0".parse(), Ok(MssClamp::OFF));
        assert_eq!("1200".parse(), Ok(MssClamp(1200)));
        for bad in ["40", "70000", "big"] {
            assert!(bad.parse::<MssClamp>().is_err(), "{bad}");
        }
    }

    #[test]
    fn route_tables_refuse_the_kernels_own() {
        assert_eq!("190".parse(), Ok(RouteTable(190)));
        assert_eq!("256".parse(), Ok(RouteTable(256)));
        for bad in ["0", "253", "254", "255", "main"] {
            assert!(bad.parse::<RouteTable>().is_err(), "{bad}");
        }
    }
}

/// The egress policy's values (`--allow`, `--deny`, `--policy-default`,
/// `[[policy.rule]]`), parsed here for the flags and the file alike.
pub mod policy {
    use std::{net::Ipv4Addr, str::FromStr};

    use nat_common::{
        IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP,
        policy::{ANSWER_DROP, ANSWER_ICMP, ANSWER_RST, PROTO_ANY, Prefix, Rule, Verdict},
    };
    use serde::Deserialize;

    /// `any`, `tcp`, `udp` or `icmp`.
    pub fn protocol(s: &str) -> Result<u8, String> {
        match s {
            "any" => Ok(PROTO_ANY),
            "tcp" => Ok(IPPROTO_TCP),
            "udp" => Ok(IPPROTO_UDP),
            "icmp" => Ok(IPPROTO_ICMP),
            _ => Err(format!("{s:?} is not a protocol (any, tcp, udp, icmp)")),
        }
    }

    /// A prefix `A.B.C.D/LEN`, or an address alone (`/32`); host bits must
    /// be clear.
    pub fn prefix(s: &str) -> Result<Prefix, String> {
        let (a, len) = match s.split_once('/') {
            Some((a, l)) => (
                a,
                l.parse::<u8>()
                    .ok()
                    .filter(|l| *l <= 32)
                    .ok_or_else(|| format!("{l:?} is not a prefix length (0-32)"))?,
            ),
            None => (s, 32),
        };
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("{a:?} is not an IPv4 address or prefix"))?;
        let p = Prefix::new(addr, len);
        if p.addr != addr {
            return Err(format!("{s}: host bits set (did you mean {p}?)"));
        }
        Ok(p)
    }

    /// A destination port `P` or range `MIN-MAX` (0-65535).
    pub fn ports(s: &str) -> Result<(u16, u16), String> {
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        let p = |x: &str| {
            x.trim()
                .parse::<u16>()
                .map_err(|_| format!("{x:?} is not a port number"))
        };
        let (min, max) = (p(a)?, p(b)?);
        if min > max {
            return Err(format!("{s:?}: need MIN <= MAX"));
        }
        Ok((min, max))
    }

    /// `drop`, `icmp-prohibited` or `tcp-reset`.
    pub fn answer(s: &str) -> Result<u8, String> {
        match s {
            "drop" => Ok(ANSWER_DROP),
            "icmp-prohibited" => Ok(ANSWER_ICMP),
            "tcp-reset" => Ok(ANSWER_RST),
            _ => Err(format!(
                "{s:?} is not an answer (drop, icmp-prohibited, tcp-reset)"
            )),
        }
    }

    /// Whether the rest of a rule fits its protocol: ports need TCP or
    /// UDP (or any, which then matches TCP and UDP only), a reset TCP.
    pub fn check(proto: u8, ports: (u16, u16), verdict: Verdict) -> Result<(), String> {
        if ports != (0, u16::MAX) && !matches!(proto, PROTO_ANY | IPPROTO_TCP | IPPROTO_UDP) {
            return Err("ports need protocol tcp, udp or any".into());
        }
        if verdict == Verdict::Deny(ANSWER_RST) && !matches!(proto, PROTO_ANY | IPPROTO_TCP) {
            return Err("answer tcp-reset needs protocol tcp or any".into());
        }
        Ok(())
    }

    /// A rule of `--allow`/`--deny`: `[PROTO:][DEST][:PORTS]`, e.g.
    /// `tcp:25`, `203.0.113.0/24`, `tcp:198.51.100.0/24:443`,
    /// `udp:192.0.2.53:53`. From any inside source; a denied flow is
    /// dropped silently.
    #[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
    #[serde(try_from = "String")]
    pub struct RuleSpec {
        pub spec: String,
        pub proto: u8,
        pub dst: Prefix,
        pub ports: (u16, u16),
    }

    impl FromStr for RuleSpec {
        type Err = String;
        fn from_str(s: &str) -> Result<RuleSpec, String> {
            let mut parts: Vec<&str> = s.split(':').collect();
            let mut proto = PROTO_ANY;
            if let Some(first) = parts.first()
                && let Ok(p) = protocol(first)
            {
                proto = p;
                parts.remove(0);
            }
            let mut dst = Prefix::ANY;
            if let Some(first) = parts.first()
                && first.contains('.')
            {
                dst = prefix(first)?;
                parts.remove(0);
            }
            let mut range = (0, u16::MAX);
            match parts.as_slice() {
                [] => {}
                [p] if !p.is_empty() => range = ports(p)?,
                _ => {
                    return Err(format!(
                        "{s:?} is not [PROTO:][DEST][:PORTS] (e.g. tcp:25, 203.0.113.0/24, \
                         tcp:198.51.100.0/24:443)"
                    ));
                }
            }
            check(proto, range, Verdict::Allow)?;
            Ok(RuleSpec {
                spec: s.to_string(),
                proto,
                dst,
                ports: range,
            })
        }
    }

    impl TryFrom<String> for RuleSpec {
        type Error = String;
        fn try_from(s: String) -> Result<RuleSpec, String> {
            s.parse()
        }
    }

    impl RuleSpec {
        /// The rule, named after its flag (`--deny tcp:25`).
        pub fn rule(&self, flag: &str, verdict: Verdict) -> Rule {
            Rule {
                name: format!("--{flag} {}", self.spec),
                inside: Prefix::ANY,
                dst: self.dst,
                proto: self.proto,
                ports: self.ports,
                verdict,
            }
        }
    }

    /// `--policy-default`: `allow`, or deny with an answer (`drop`,
    /// `icmp-prohibited`, `tcp-reset`).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
    #[serde(try_from = "String")]
    pub struct PolicyDefault(pub Verdict);

    impl FromStr for PolicyDefault {
        type Err = String;
        fn from_str(s: &str) -> Result<PolicyDefault, String> {
            if s == "allow" {
                return Ok(PolicyDefault(Verdict::Allow));
            }
            answer(s)
                .map(|a| PolicyDefault(Verdict::Deny(a)))
                .map_err(|_| {
                    format!("{s:?} is not a default (allow, drop, icmp-prohibited, tcp-reset)")
                })
        }
    }

    impl TryFrom<String> for PolicyDefault {
        type Error = String;
        fn try_from(s: String) -> Result<PolicyDefault, String> {
            s.parse()
        }
    }

    impl std::fmt::Display for PolicyDefault {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(match self.0 {
                Verdict::Allow => "allow",
                Verdict::Deny(ANSWER_ICMP) => "icmp-prohibited",
                Verdict::Deny(ANSWER_RST) => "tcp-reset",
                Verdict::Deny(_) => "drop",
            })
        }
    }
}
/// `--snat-ip`: the SNAT address pool, a comma-separated list of
/// addresses, ranges `A-B` and prefixes `A/N` (every address of it), or
/// `auto`: every IPv4 address on `--ext`, followed while the gateway runs.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "SnatPoolKey")]
pub enum SnatPool {
    Auto,
    Addrs(Vec<std::net::Ipv4Addr>),
}

/// The config key: one string like the flag, or a list of them.
#[derive(Deserialize)]
#[serde(untagged)]
enum SnatPoolKey {
    One(String),
    Many(Vec<String>),
}

impl TryFrom<SnatPoolKey> for SnatPool {
    type Error = String;
    fn try_from(k: SnatPoolKey) -> Result<SnatPool, String> {
        match k {
            SnatPoolKey::One(s) => s.parse(),
            SnatPoolKey::Many(v) => v.join(",").parse(),
        }
    }
}

impl FromStr for SnatPool {
    type Err = String;
    fn from_str(s: &str) -> Result<SnatPool, String> {
        use std::net::Ipv4Addr;
        let max = nat_common::POOL_MAX as usize;
        let parse = |a: &str| -> Result<Ipv4Addr, String> {
            a.trim()
                .parse()
                .map_err(|_| format!("{a:?} is not an IPv4 address"))
        };
        let items: Vec<&str> = s
            .split(',')
            .map(str::trim)
            .filter(|i| !i.is_empty())
            .collect();
        if items.is_empty() {
            return Err("an empty SNAT pool: give addresses, A-B, A/N or auto".into());
        }
        if items.contains(&"auto") {
            if items.len() > 1 {
                return Err(format!("{s:?}: auto stands alone (every address on --ext)"));
            }
            return Ok(SnatPool::Auto);
        }
        let mut out: Vec<Ipv4Addr> = Vec::new();
        for item in items {
            let (lo, hi) = if let Some((a, b)) = item.split_once('-') {
                (u32::from(parse(a)?), u32::from(parse(b)?))
            } else if let Some((a, n)) = item.split_once('/') {
                let n: u32 = n
                    .trim()
                    .parse()
                    .ok()
                    .filter(|n| *n <= 32)
                    .ok_or_else(|| format!("{item:?}: the prefix length is not 0-32"))?;
                let mask = if n == 0 { 0 } else { u32::MAX << (32 - n) };
                let base = u32::from(parse(a)?) & mask;
                (base, base | !mask)
            } else {
                let a = u32::from(parse(item)?);
                (a, a)
            };
            if lo > hi {
                return Err(format!("{item:?}: the range ends before it starts"));
            }
            if (hi - lo) as usize >= max {
                return Err(format!(
                    "{item:?}: more than {max} addresses (the pool's limit)"
                ));
            }
            for a in lo..=hi {
                let a = Ipv4Addr::from(a);
                if a.is_unspecified() || a.is_broadcast() || a.is_multicast() {
                    return Err(format!("{a} cannot be a SNAT address"));
                }
                if !out.contains(&a) {
                    out.push(a);
                }
            }
        }
        if out.len() > max {
            return Err(format!(
                "{} addresses: the pool holds at most {max}",
                out.len()
            ));
        }
        Ok(SnatPool::Addrs(out))
    }
}

impl fmt::Display for SnatPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SnatPool::Auto => f.write_str("auto"),
            SnatPool::Addrs(a) => {
                let s: Vec<String> = a.iter().map(|a| a.to_string()).collect();
                f.write_str(&s.join(","))
            }
        }
    }
}

#[cfg(test)]
mod snat_pool_tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn addrs(s: &str) -> Vec<Ipv4Addr> {
        match s.parse::<SnatPool>().expect(s) {
            SnatPool::Addrs(a) => a,
            SnatPool::Auto => panic!("auto"),
        }
    }

    #[test]
    fn a_pool_is_addresses_ranges_and_prefixes_in_order_without_repeats() {
        assert_eq!(addrs("192.0.2.9"), vec![Ipv4Addr::new(192, 0, 2, 9)]);
        assert_eq!(
            addrs("192.0.2.9, 198.51.100.1-198.51.100.2,192.0.2.9"),
            vec![
                Ipv4Addr::new(192, 0, 2, 9),
                Ipv4Addr::new(198, 51, 100, 1),
                Ipv4Addr::new(198, 51, 100, 2)
            ]
        );
        let p = addrs("203.0.113.5/30");
        assert_eq!(p.len(), 4);
        assert_eq!(p[0], Ipv4Addr::new(203, 0, 113, 4));
        assert_eq!(p[3], Ipv4Addr::new(203, 0, 113, 7));
        assert_eq!("auto".parse::<SnatPool>(), Ok(SnatPool::Auto));
    }

    #[test]
    fn bad_pools_are_refused_with_the_reason() {
        for (s, why) in [
            ("", "empty"),
            ("auto,192.0.2.1", "alone"),
            ("192.0.2.300", "not an IPv4"),
            ("192.0.2.9-192.0.2.1", "ends before"),
            ("10.0.0.0/16", "more than 64"),
            ("10.0.0.0/33", "0-32"),
            ("0.0.0.0", "cannot be"),
        ] {
            let e = s.parse::<SnatPool>().expect_err(s);
            assert!(e.contains(why), "{s}: {e}");
        }
    }

    #[test]
    fn the_config_key_takes_a_string_or_a_list() {
        #[derive(Deserialize)]
        struct K {
            p: SnatPool,
        }
        let one: K = toml::from_str("p = \"192.0.2.1-192.0.2.2\"").expect("one");
        let many: K = toml::from_str("p = [\"192.0.2.1\", \"192.0.2.2\"]").expect("many");
        assert_eq!(one.p, many.p);
        assert_eq!(one.p.to_string(), "192.0.2.1,192.0.2.2");
    }
}

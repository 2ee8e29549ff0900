//! The settings of a gateway run: the flags given on the command line over
//! the config file (`--config`) over the flags' defaults, checked together
//! into a [`Config`]. Nothing here looks at the host: interfaces, addresses
//! and gateways are resolved by the daemon, after these checks.
//!
//! The file is TOML with one top-level key per flag, spelled as the flag
//! without its dashes (`port-range = "20000-29999"`, `udp-inbound-refresh
//! = true`, `internal-cidr = ["10.2.0.0/16"]`), its values checked by the
//! same parsers as the flags'. An unknown key is an error. Settings that
//! have no flag get sections of their own (egress rules in a `[policy]`
//! with `[[policy.rule]]`, a pool of SNAT addresses): the top level stays
//! the flags'. packaging/nat-loader.toml lists every key with its default.

use std::{
    net::Ipv4Addr,
    num::{NonZeroU16, NonZeroU64},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use clap::ValueEnum;
use nat_common::{
    policy::{ANSWER_DROP, PROTO_ANY, Policy, Prefix, Rule, Verdict},
    timeouts::Timeouts,
};
use nat_loader::{dataplane::XdpAttach, routing::Cidr};
use serde::{Deserialize, Deserializer, de};

use crate::{
    cli::{self, FilteringArg, GatewayArgs, Given, XdpModeArg},
    values::{
        self, Filtering, MssClamp, PortRange, RouteTable, ScheduledEvents, SnatPool,
        policy::{PolicyDefault, RuleSpec},
    },
};

const SEC: u64 = 1_000_000_000;

/// Everything a gateway run needs to know before it looks at the host.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub ext: String,
    pub int: String,
    pub bpffs_dir: PathBuf,
    /// `None`: the primary IPv4 address of `ext`, followed.
    pub snat_ip: Option<SnatPool>,
    pub ports: PortRange,
    pub low_ports: PortRange,
    pub filtering: Filtering,
    pub udp_inbound_refresh: bool,
    pub port_hold: Duration,
    /// 0: no clamping.
    pub mss_clamp: u16,
    pub max_flows: u32,
    pub max_fragments: u32,
    pub xdp: XdpAttach,
    pub timeouts: Timeouts,
    /// 0: no probe port.
    pub probe_port: u16,
    pub health_port: Option<u16>,
    /// Zero: a signal stops at once.
    pub drain: Duration,
    pub scheduled_events: Option<ScheduledEvents>,
    /// `None`: `--no-policy-routing`.
    pub routing: Option<Routing>,
    pub sweep_interval: Duration,
    /// `None`: the counters are logged at exit only.
    pub stats_interval: Option<Duration>,
    pub show_flows: usize,
    /// `--metrics-listen`.
    pub metrics_listen: Option<std::net::SocketAddrV4>,
    pub metrics_allow_ext: bool,
    /// `--translation-log`.
    pub translation_log: Option<PathBuf>,
    /// Drop new flows from sources outside the inside prefixes (BCP 38).
    pub anti_spoofing: bool,
    /// The egress policy: `--deny`, then `--allow`, then the file's
    /// `[[policy.rule]]`s, and `--policy-default`.
    pub policy: Policy,
}

/// How to read the configuration again, for a reload (SIGHUP): the same
/// command line over the file as it is now.
pub struct Reload {
    args: GatewayArgs,
    given: Given,
}

impl Reload {
    pub fn new(args: &GatewayArgs, given: &Given) -> Reload {
        Reload {
            args: args.clone(),
            given: given.clone(),
        }
    }

    /// The configuration now, checked as at start.
    pub fn config(&self) -> Result<Config> {
        Config::load(self.args.clone(), &self.given)
    }
}

/// Policy routing as configured (the gateways may still be discovered).
#[derive(Clone, Debug, PartialEq)]
pub struct Routing {
    pub int_table: u32,
    pub ext_table: u32,
    pub int_gateway: Option<Ipv4Addr>,
    pub ext_gateway: Option<Ipv4Addr>,
    pub internal_cidrs: Vec<Cidr>,
}

impl Config {
    /// The flags over the file that `--config` names (if any).
    pub fn load(args: GatewayArgs, given: &Given) -> Result<Config> {
        let file = match &args.config {
            Some(path) => File::read(path)?,
            None => File::default(),
        };
        Config::try_from(file.under(args, given))
    }

    /// What is legal but questionable, for the log.
    pub fn warnings(&self) -> Vec<String> {
        let udp = self.timeouts.udp_ns / SEC;
        let mut w = Vec::new();
        if udp < 120 {
            w.push(format!(
                "UDP timeout of {udp} s is below the 120 s RFC 4787 REQ-5 asks for"
            ));
        }
        w
    }
}

impl TryFrom<GatewayArgs> for Config {
    type Error = anyhow::Error;

    fn try_from(a: GatewayArgs) -> Result<Config> {
        let policy = policy_of(&a);
        // What the dataplane cannot hold is refused before anything changes.
        nat_common::policy::compile(&policy).map_err(|e| anyhow!("egress policy: {e}"))?;
        let (Some(ext), Some(int)) = (a.ext, a.int) else {
            bail!("--ext and --int are required (or `ext` and `int` in the config file)");
        };
        if ext == int {
            bail!("--ext and --int are the same interface ({ext}): the gateway needs two NICs");
        }
        if a.low_port_range.max >= 1024 || a.port_range.min < 1024 {
            bail!(
                "--low-port-range must lie below 1024 and --port-range at or above it \
                 (RFC 4787 REQ-3a keeps the two apart)"
            );
        }
        if a.max_flows == 0 {
            bail!("--max-flows: the conntrack table needs room for at least one flow");
        }
        if a.max_flows > nat_loader::tables::MAX_FLOWS_LIMIT {
            bail!(
                "--max-flows {} is above the largest table, {} flows",
                a.max_flows,
                nat_loader::tables::MAX_FLOWS_LIMIT
            );
        }
        if a.max_fragments == 0 {
            bail!(
                "--max-fragments: the fragment tracking table needs room for at least one datagram"
            );
        }
        for (name, v) in [
            ("--udp-timeout", a.udp_timeout),
            ("--tcp-established-timeout", a.tcp_established_timeout),
            ("--tcp-transitory-timeout", a.tcp_transitory_timeout),
            ("--icmp-timeout", a.icmp_timeout),
        ] {
            if v == 0 {
                bail!("{name} must be at least 1 second");
            }
        }
        if !a.no_policy_routing && a.int_table == a.ext_table {
            bail!(
                "--int-table and --ext-table are both {}: each NIC needs its own table",
                a.int_table
            );
        }
        if a.no_policy_routing && !a.internal_cidr.is_empty() {
            bail!("--internal-cidr needs policy routing; drop --no-policy-routing");
        }
        if a.health_port == Some(a.probe_port) {
            bail!("--health-port and --probe-port are both {}", a.probe_port);
        }
        let routing = (!a.no_policy_routing).then_some(Routing {
            int_table: a.int_table.0,
            ext_table: a.ext_table.0,
            int_gateway: a.int_gateway,
            ext_gateway: a.ext_gateway,
            internal_cidrs: a.internal_cidr,
        });
        Ok(Config {
            ext,
            int,
            bpffs_dir: a.bpffs_dir,
            snat_ip: a.snat_ip,
            ports: a.port_range,
            low_ports: a.low_port_range,
            filtering: a.filtering.into(),
            udp_inbound_refresh: a.udp_inbound_refresh,
            port_hold: Duration::from_secs(a.port_hold),
            mss_clamp: a.mss_clamp.0,
            max_flows: a.max_flows,
            max_fragments: a.max_fragments,
            xdp: a.xdp_mode.into(),
            timeouts: Timeouts {
                udp_ns: a.udp_timeout * SEC,
                icmp_ns: a.icmp_timeout * SEC,
                tcp_established_ns: a.tcp_established_timeout * SEC,
                tcp_transitory_ns: a.tcp_transitory_timeout * SEC,
            },
            probe_port: a.probe_port,
            health_port: a.health_port,
            drain: Duration::from_secs(a.drain_seconds),
            scheduled_events: a.scheduled_events,
            routing,
            sweep_interval: Duration::from_secs(a.sweep_interval),
            stats_interval: (a.stats_interval > 0).then(|| Duration::from_secs(a.stats_interval)),
            show_flows: a.show_flows,
            anti_spoofing: !a.no_anti_spoofing,
            policy,
            metrics_listen: a.metrics_listen,
            metrics_allow_ext: a.metrics_allow_ext,
            translation_log: a.translation_log,
        })
    }
}

/// The egress policy of a run's settings: `--deny`, then `--allow`, then
/// the file's `[[policy.rule]]`s, and the default.
fn policy_of(a: &GatewayArgs) -> Policy {
    Policy {
        rules: a
            .deny
            .iter()
            .map(|r| r.rule("deny", Verdict::Deny(ANSWER_DROP)))
            .chain(a.allow.iter().map(|r| r.rule("allow", Verdict::Allow)))
            .chain(a.policy_rules.iter().cloned())
            .collect(),
        default: a.policy_default.0,
    }
}

/// The policy `nat-loader policy test` tries: the file's over the
/// defaults, the given rules flags first, as a gateway run would have it.
pub fn test_policy(file: Option<&Path>, flags: &[String]) -> Result<Policy> {
    // The interfaces are not needed: the file stands in for them, as for
    // a run.
    let path = file.unwrap_or(Path::new("/dev/null")).display().to_string();
    let argv = ["nat-loader".to_string(), "--config".to_string(), path]
        .into_iter()
        .chain(flags.iter().cloned());
    let (cli, given) = cli::Cli::try_parse_args(argv).map_err(|e| anyhow!("{e}"))?;
    let file = match file {
        Some(path) => File::read(path)?,
        None => File::default(),
    };
    Ok(policy_of(&file.under(cli.gateway, &given)))
}

/// The config file: every key optional, each a flag's name and type.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct File {
    ext: Option<String>,
    int: Option<String>,
    bpffs_dir: Option<PathBuf>,
    snat_ip: Option<SnatPool>,
    port_range: Option<PortRange>,
    low_port_range: Option<PortRange>,
    #[serde(default, deserialize_with = "word")]
    filtering: Option<FilteringArg>,
    udp_inbound_refresh: Option<bool>,
    port_hold: Option<u64>,
    mss_clamp: Option<MssClamp>,
    max_flows: Option<u32>,
    max_fragments: Option<u32>,
    #[serde(default, deserialize_with = "word")]
    xdp_mode: Option<XdpModeArg>,
    udp_timeout: Option<u64>,
    tcp_established_timeout: Option<u64>,
    tcp_transitory_timeout: Option<u64>,
    icmp_timeout: Option<u64>,
    probe_port: Option<u16>,
    health_port: Option<NonZeroU16>,
    drain_seconds: Option<u64>,
    #[serde(default, deserialize_with = "values::scheduled_events_key")]
    scheduled_events: Option<Option<ScheduledEvents>>,
    no_policy_routing: Option<bool>,
    int_table: Option<RouteTable>,
    ext_table: Option<RouteTable>,
    int_gateway: Option<Ipv4Addr>,
    ext_gateway: Option<Ipv4Addr>,
    #[serde(default, deserialize_with = "cidrs")]
    internal_cidr: Option<Vec<Cidr>>,
    sweep_interval: Option<NonZeroU64>,
    stats_interval: Option<u64>,
    show_flows: Option<usize>,
    metrics_listen: Option<std::net::SocketAddrV4>,
    metrics_allow_ext: Option<bool>,
    translation_log: Option<PathBuf>,
    no_anti_spoofing: Option<bool>,
    deny: Option<Vec<RuleSpec>>,
    allow: Option<Vec<RuleSpec>>,
    policy_default: Option<PolicyDefault>,
    /// `[policy]`, with its `[[policy.rule]]` list.
    policy: Option<PolicyFile>,
}

/// `[policy]`: settings of the egress policy that have no flag.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct PolicyFile {
    /// The rules, in order: the first that matches decides. Each is
    /// checked as a whole once the file is read ([`File::parse`]), its
    /// span giving the line for an error.
    #[serde(default)]
    rule: Vec<toml::Spanned<RawRule>>,
    /// The checked rules.
    #[serde(skip)]
    rules: Vec<Rule>,
}

/// One `[[policy.rule]]`, checked.
#[derive(Debug)]
struct RuleFile(Rule);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawRule {
    name: String,
    /// Inside prefix [default: any].
    inside: Option<String>,
    /// Destination prefix [default: any].
    destination: Option<String>,
    /// any, tcp, udp, icmp [default: any].
    protocol: Option<String>,
    /// Destination port or range [default: all].
    ports: Option<String>,
    /// allow or deny.
    action: String,
    /// For deny: drop, icmp-prohibited, tcp-reset [default: drop].
    answer: Option<String>,
}

impl TryFrom<RawRule> for RuleFile {
    type Error = String;
    fn try_from(r: RawRule) -> Result<RuleFile, String> {
        use values::policy as v;
        let name = r.name;
        let ctx = |e: String| format!("rule {name:?}: {e}");
        let prefix = |s: &Option<String>| match s {
            Some(s) => v::prefix(s).map_err(ctx),
            None => Ok(Prefix::ANY),
        };
        let inside = prefix(&r.inside)?;
        let dst = prefix(&r.destination)?;
        let proto = match &r.protocol {
            Some(p) => v::protocol(p).map_err(ctx)?,
            None => PROTO_ANY,
        };
        let ports = match &r.ports {
            Some(p) => v::ports(p).map_err(ctx)?,
            None => (0, u16::MAX),
        };
        let verdict = match (r.action.as_str(), &r.answer) {
            ("allow", None) => Verdict::Allow,
            ("allow", Some(_)) => return Err(ctx("an answer is for action \"deny\" only".into())),
            ("deny", a) => Verdict::Deny(match a {
                Some(a) => v::answer(a).map_err(ctx)?,
                None => ANSWER_DROP,
            }),
            (a, _) => return Err(ctx(format!("{a:?} is not an action (allow, deny)"))),
        };
        v::check(proto, ports, verdict).map_err(ctx)?;
        Ok(RuleFile(Rule {
            name,
            inside,
            dst,
            proto,
            ports,
            verdict,
        }))
    }
}

impl File {
    pub fn read(path: &Path) -> Result<File> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the config file {}", path.display()))?;
        File::parse(&text, path)
    }

    /// Parses `text`, the contents of `path`; an error names the file, the
    /// line and the key.
    pub fn parse(text: &str, path: &Path) -> Result<File> {
        let mut file: File = toml::from_str(text).map_err(|e| {
            let place = match e.span() {
                Some(span) => {
                    let line = text[..span.start].matches('\n').count() + 1;
                    match key_at(text, span.start) {
                        Some(key) if !e.message().starts_with("unknown field") => {
                            format!(", line {line}, key {key}")
                        }
                        _ => format!(", line {line}"),
                    }
                }
                None => String::new(),
            };
            anyhow!(
                "config file {}{place}: {}",
                path.display(),
                explain(e.message())
            )
        })?;
        if let Some(p) = &mut file.policy {
            for raw in std::mem::take(&mut p.rule) {
                let line = text[..raw.span().start].matches('\n').count() + 1;
                let rule = RuleFile::try_from(raw.into_inner())
                    .map_err(|e| anyhow!("config file {}, line {line}: {e}", path.display()))?;
                p.rules.push(rule.0);
            }
        }
        Ok(file)
    }

    /// `flags` with every value this file sets that the command line did
    /// not (the flags' defaults count as not set).
    pub fn under(self, mut flags: GatewayArgs, given: &Given) -> GatewayArgs {
        macro_rules! take {
            ($($key:ident $(as $conv:expr)?),* $(,)?) => {$(
                if let Some(v) = self.$key {
                    if !given.contains(stringify!($key)) {
                        flags.$key = take!(@conv v $(, $conv)?);
                    }
                }
            )*};
            (@conv $v:ident) => { $v.into() };
            (@conv $v:ident, $conv:expr) => { $conv($v) };
        }
        take!(
            ext,
            int,
            bpffs_dir,
            snat_ip,
            port_range,
            low_port_range,
            filtering,
            udp_inbound_refresh,
            port_hold,
            mss_clamp,
            max_flows,
            max_fragments,
            xdp_mode,
            udp_timeout,
            tcp_established_timeout,
            tcp_transitory_timeout,
            icmp_timeout,
            probe_port,
            health_port as |p: NonZeroU16| Some(p.get()),
            drain_seconds,
            scheduled_events as |s| s,
            no_policy_routing,
            int_table,
            ext_table,
            int_gateway,
            ext_gateway,
            internal_cidr,
            sweep_interval as |s: NonZeroU64| s.get(),
            stats_interval,
            show_flows,
            no_anti_spoofing,
            deny,
            allow,
            policy_default,
            metrics_listen as Some,
            metrics_allow_ext,
            translation_log as Some,
        );
        if let Some(p) = self.policy {
            flags.policy_rules = p.rules;
        }
        flags
    }
}

/// toml's message, in the file's words (keys, not fields; no list of all
/// keys).
fn explain(message: &str) -> String {
    match message.strip_prefix("unknown field ") {
        Some(rest) => {
            let key = rest.split(", expected").next().unwrap_or(rest);
            format!(
                "unknown key {key} (the keys are the flags' names without the dashes, \
                 see nat-loader --help)"
            )
        }
        None => message.to_string(),
    }
}

/// The key whose value holds byte `offset` of `text`: the nearest
/// `key = ...` line at or above it within the same table.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let upto = &text[..text[offset..].find('\n').map_or(text.len(), |n| offset + n)];
    for line in upto.lines().rev() {
        let line = line.trim();
        if line.starts_with('[') {
            return None;
        }
        if let Some((key, _)) = line.split_once('=') {
            let key = key.trim();
            if !key.is_empty()
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.\"".contains(c))
            {
                return Some(key.to_string());
            }
        }
    }
    None
}

/// A word of a `ValueEnum`, spelled as on the command line.
fn word<'de, D: Deserializer<'de>, T: ValueEnum>(d: D) -> Result<Option<T>, D::Error> {
    let s = String::deserialize(d)?;
    cli::value_enum(&s).map(Some).map_err(de::Error::custom)
}

fn cidrs<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<Cidr>>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|s| s.parse())
        .collect::<Result<Vec<Cidr>, String>>()
        .map(Some)
        .map_err(de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "/etc/nat-loader/test.toml";

    /// The config of `flags` over the file `toml`.
    fn config(toml: &str, flags: &[&str]) -> Result<Config> {
        let mut argv = vec!["nat-loader", "--config", FILE];
        argv.extend_from_slice(flags);
        let (cli, given) = cli::Cli::try_parse_args(argv)?;
        let file = File::parse(toml, Path::new(FILE))?;
        Config::try_from(file.under(cli.gateway, &given))
    }

    fn err(toml: &str, flags: &[&str]) -> String {
        format!("{:#}", config(toml, flags).expect_err("must fail"))
    }

    const NICS: &str = "ext = \"eth0\"\nint = \"eth1\"\n";

    #[test]
    fn flags_alone_give_the_defaults() {
        let c = config("", &["--ext", "eth0", "--int", "eth1"]).expect("config");
        assert_eq!((c.ext.as_str(), c.int.as_str()), ("eth0", "eth1"));
        assert_eq!(c.ports, PortRange::DEFAULT);
        assert_eq!(c.low_ports, PortRange::DEFAULT_LOW);
        assert_eq!(c.filtering, Filtering::AddressAndPortDependent);
        assert_eq!(c.timeouts, Timeouts::DEFAULT);
        assert_eq!(c.probe_port, nat_common::DEFAULT_PROBE_PORT);
        assert_eq!(c.xdp, XdpAttach::Auto);
        assert_eq!(c.drain, Duration::from_secs(30));
        assert_eq!(c.stats_interval, Some(Duration::from_secs(60)));
        assert!(c.routing.is_some());
        assert!(c.warnings().is_empty());
    }

    #[test]
    fn the_file_sets_what_no_flag_gives() {
        let toml = format!(
            "{NICS}port-range = \"20000-29999\"\nfiltering = \"endpoint-independent\"\n\
             udp-inbound-refresh = true\nscheduled-events = true\nstats-interval = 0\n\
             internal-cidr = [\"10.2.0.0/16\", \"10.3.0.0/16\"]\nxdp-mode = \"generic\"\n"
        );
        let c = config(&toml, &[]).expect("config");
        assert_eq!((c.ext.as_str(), c.int.as_str()), ("eth0", "eth1"));
        assert_eq!(
            c.ports,
            PortRange {
                min: 20000,
                max: 29999
            }
        );
        assert_eq!(c.filtering, Filtering::EndpointIndependent);
        assert!(c.udp_inbound_refresh);
        assert_eq!(
            c.scheduled_events.as_ref().map(ScheduledEvents::url),
            Some(nat_loader::events::DEFAULT_URL)
        );
        assert_eq!(c.stats_interval, None);
        assert_eq!(c.xdp, XdpAttach::Generic);
        let cidrs: Vec<String> = c
            .routing
            .expect("policy routing")
            .internal_cidrs
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(cidrs, ["10.2.0.0/16", "10.3.0.0/16"]);
    }

    #[test]
    fn a_flag_given_overrides_the_file_and_a_default_does_not() {
        let toml = format!(
            "{NICS}port-range = \"20000-29999\"\nmax-flows = 1000\nfiltering = \"address-dependent\"\n"
        );
        let c = config(
            &toml,
            &[
                "--port-range",
                "30000-39999",
                "--int",
                "eth2",
                "--max-flows",
                "65536",
            ],
        )
        .expect("config");
        assert_eq!(
            c.ports,
            PortRange {
                min: 30000,
                max: 39999
            }
        );
        assert_eq!(c.int, "eth2");
        // Given explicitly, even with the default's value: the flag wins.
        assert_eq!(c.max_flows, 65536);
        // Not given: the file's value, not the flag's default.
        assert_eq!(c.filtering, Filtering::AddressDependent);
        assert_eq!(c.ext, "eth0");
    }

    #[test]
    fn scheduled_events_false_in_the_file_is_off_and_a_url_is_checked() {
        let c = config(&format!("{NICS}scheduled-events = false\n"), &[]).expect("config");
        assert_eq!(c.scheduled_events, None);
        let c = config(
            &format!("{NICS}scheduled-events = \"http://127.0.0.1:8080/se\"\n"),
            &[],
        )
        .expect("config");
        assert_eq!(
            c.scheduled_events.as_ref().map(ScheduledEvents::url),
            Some("http://127.0.0.1:8080/se")
        );
        let e = err(&format!("{NICS}scheduled-events = \"https://x/\"\n"), &[]);
        assert!(
            e.contains("key scheduled-events") && e.contains("only http://"),
            "{e}"
        );
    }

    #[test]
    fn an_unknown_key_names_the_key_the_file_and_the_line() {
        let e = err(
            &format!("{NICS}# a comment\nprot-range = \"2000-3000\"\n"),
            &[],
        );
        assert_eq!(
            e,
            format!(
                "config file {FILE}, line 4: unknown key `prot-range` (the keys are the flags' \
                 names without the dashes, see nat-loader --help)"
            )
        );
        let e = err(&format!("{NICS}[policy]\nrule = []\ncolour = 1\n"), &[]);
        assert!(
            e.contains("line 5") && e.contains("unknown key `colour`"),
            "{e}"
        );
    }

    #[test]
    fn a_bad_value_names_the_key_the_file_and_the_line_with_the_flags_message() {
        let e = err(&format!("{NICS}\nport-range = \"2000-1000\"\n"), &[]);
        assert_eq!(
            e,
            format!(
                "config file {FILE}, line 4, key port-range: \"2000-1000\": need 1 <= MIN <= MAX <= 65535"
            )
        );
        let e = err(&format!("{NICS}max-flows = \"many\"\n"), &[]);
        assert!(
            e.starts_with(&format!(
                "config file {FILE}, line 3, key max-flows: invalid type"
            )),
            "{e}"
        );
        let e = err(&format!("{NICS}int-table = 254\n"), &[]);
        assert!(e.contains("key int-table: table 254 is reserved"), "{e}");
        let e = err(&format!("{NICS}filtering = \"full-cone\"\n"), &[]);
        assert!(
            e.contains("key filtering") && e.contains("endpoint-independent"),
            "{e}"
        );
        let e = err(
            &format!("{NICS}internal-cidr = [\n  \"10.2.0.0/16\",\n  \"10.3.0.1/16\",\n]\n"),
            &[],
        );
        assert!(
            e.contains("key internal-cidr") && e.contains("host bits set"),
            "{e}"
        );
        let e = err(&format!("{NICS}mss-clamp = 40\n"), &[]);
        assert!(e.contains("key mss-clamp: 40 is below"), "{e}");
        let e = err(&format!("{NICS}sweep-interval = 0\n"), &[]);
        assert!(e.contains("key sweep-interval"), "{e}");
        let e = err("ext = \"eth0\"\next = \"eth1\"\n", &[]);
        assert!(e.contains("line 2") && e.contains("duplicate key"), "{e}");
    }

    #[test]
    fn a_missing_file_is_an_error_that_names_it() {
        let args = GatewayArgs {
            config: Some(PathBuf::from("/nonexistent/nat-loader.toml")),
            ..cli::Cli::try_parse_args(["nat-loader", "--config", "x"])
                .expect("parse")
                .0
                .gateway
        };
        let e = format!(
            "{:#}",
            Config::load(args, &Given::default()).expect_err("missing")
        );
        assert!(
            e.contains("reading the config file /nonexistent/nat-loader.toml"),
            "{e}"
        );
    }

    #[test]
    fn the_interfaces_must_come_from_somewhere_and_differ() {
        assert!(err("", &[]).contains("--ext and --int are required"));
        assert!(err("ext = \"eth0\"\n", &[]).contains("--ext and --int are required"));
        let e = err(NICS, &["--int", "eth0"]);
        assert!(e.contains("are the same interface (eth0)"), "{e}");
    }

    #[test]
    fn the_checks_of_the_flags_hold_for_the_file_too() {
        for (toml, flags, expected) in [
            (
                "low-port-range = \"600-1100\"\n",
                &[][..],
                "--low-port-range must lie below 1024",
            ),
            (
                "",
                &["--port-range", "1000-2000"],
                "--low-port-range must lie below 1024",
            ),
            ("max-flows = 0\n", &[], "at least one flow"),
            ("", &["--max-fragments", "0"], "at least one datagram"),
            (
                "udp-timeout = 0\n",
                &[],
                "--udp-timeout must be at least 1 second",
            ),
            (
                "",
                &["--icmp-timeout", "0"],
                "--icmp-timeout must be at least 1 second",
            ),
            (
                "int-table = 200\next-table = 200\n",
                &[],
                "each NIC needs its own table",
            ),
            (
                "internal-cidr = [\"10.2.0.0/16\"]\n",
                &["--no-policy-routing"],
                "--internal-cidr needs policy routing",
            ),
            (
                "health-port = 9999\n",
                &[],
                "--health-port and --probe-port are both 9999",
            ),
            (
                "",
                &["--health-port", "8080", "--probe-port", "8080"],
                "are both 8080",
            ),
        ] {
            let e = err(&format!("{NICS}{toml}"), flags);
            assert!(e.contains(expected), "{toml:?} {flags:?}: {e}");
        }
        // The same table twice is fine without policy routing.
        config(
            &format!("{NICS}int-table = 200\next-table = 200\n"),
            &["--no-policy-routing"],
        )
        .expect("no tables used");
    }

    #[test]
    fn a_short_udp_timeout_is_allowed_with_a_warning() {
        let c = config(&format!("{NICS}udp-timeout = 30\n"), &[]).expect("config");
        assert_eq!(c.timeouts.udp_ns, 30 * SEC);
        let w = c.warnings();
        assert!(w.len() == 1 && w[0].contains("RFC 4787"), "{w:?}");
    }

    const PACKAGED: &str = include_str!("../../packaging/nat-loader.toml");
    /// What marks a key of the packaged file that shows an example.
    const NO_DEFAULT: &str = " # no default";

    /// The packaged file's key lines, uncommented: all, or only those that
    /// show a default.
    fn packaged_keys(examples: bool) -> String {
        PACKAGED
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| {
                l.split_once(" = ").is_some_and(|(k, _)| {
                    !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '-')
                })
            })
            .filter(|l| examples || !l.ends_with(NO_DEFAULT))
            .map(|l| format!("{l}\n"))
            .collect()
    }

    #[test]
    fn the_packaged_file_sets_nothing_and_lists_every_flag() {
        let packaged = File::parse(PACKAGED, Path::new("packaged")).expect("it parses");
        assert_eq!(
            format!("{packaged:?}").matches("Some").count(),
            0,
            "a key is set: {packaged:?}"
        );
        let all = packaged_keys(true);
        let mut keys: Vec<&str> = all
            .lines()
            .filter_map(|l| l.split_once(" = "))
            .map(|(k, _)| k)
            .collect();
        keys.sort();
        let mut flags: Vec<String> = <cli::Cli as clap::CommandFactory>::command()
            .get_arguments()
            .filter_map(|a| a.get_long())
            .filter(|l| !["config", "help", "version"].contains(l))
            .map(str::to_string)
            .collect();
        flags.sort();
        assert_eq!(keys, flags, "the packaged file's keys are not the flags");
        config(&all, &[]).expect("uncommented with its examples, it is valid");
    }

    #[test]
    fn the_packaged_files_values_are_the_flags_defaults() {
        let from_file = config(&packaged_keys(false), &["--ext", "a", "--int", "b"])
            .expect("the uncommented defaults are valid");
        let from_flags = config("", &["--ext", "a", "--int", "b"]).expect("defaults");
        assert_eq!(from_file, from_flags);
    }

    #[test]
    fn every_key_of_the_file_reaches_its_flag() {
        let toml = "ext = \"a\"\nint = \"b\"\nbpffs-dir = \"/sys/fs/bpf/x\"\nsnat-ip = \"192.0.2.9\"\n\
            port-range = \"2000-2999\"\nlow-port-range = \"700-799\"\nfiltering = \"address-dependent\"\n\
            udp-inbound-refresh = true\nport-hold = 7\nmss-clamp = 1200\nmax-flows = 11\n\
            max-fragments = 12\nxdp-mode = \"native\"\nudp-timeout = 130\n\
            tcp-established-timeout = 14\ntcp-transitory-timeout = 15\nicmp-timeout = 16\n\
            probe-port = 17\nhealth-port = 18\ndrain-seconds = 19\n\
            scheduled-events = \"http://127.0.0.1:1/se\"\nno-policy-routing = false\n\
            int-table = 20\next-table = 21\n\
            int-gateway = \"10.0.0.1\"\next-gateway = \"10.0.1.1\"\n\
            internal-cidr = [\"10.9.0.0/16\"]\nsweep-interval = 22\nstats-interval = 23\n\
            show-flows = 24\nno-anti-spoofing = true\ndeny = [\"tcp:25\"]\n\
            allow = [\"192.0.2.0/24\"]\npolicy-default = \"tcp-reset\"\n\
            metrics-listen = \"10.0.0.4:9100\"\nmetrics-allow-ext = true\n\
            translation-log = \"/var/log/nat-translations.jsonl\"\n";
        let c = config(toml, &[]).expect("config");
        let expected = Config {
            ext: "a".into(),
            int: "b".into(),
            bpffs_dir: "/sys/fs/bpf/x".into(),
            snat_ip: Some(SnatPool::Addrs(vec![Ipv4Addr::new(192, 0, 2, 9)])),
            ports: PortRange {
                min: 2000,
                max: 2999,
            },
            low_ports: PortRange { min: 700, max: 799 },
            filtering: Filtering::AddressDependent,
            udp_inbound_refresh: true,
            port_hold: Duration::from_secs(7),
            mss_clamp: 1200,
            max_flows: 11,
            max_fragments: 12,
            xdp: XdpAttach::Native,
            timeouts: Timeouts {
                udp_ns: 130 * SEC,
                tcp_established_ns: 14 * SEC,
                tcp_transitory_ns: 15 * SEC,
                icmp_ns: 16 * SEC,
            },
            probe_port: 17,
            health_port: Some(18),
            drain: Duration::from_secs(19),
            scheduled_events: Some(ScheduledEvents::new("http://127.0.0.1:1/se").expect("url")),
            routing: Some(Routing {
                int_table: 20,
                ext_table: 21,
                int_gateway: Some(Ipv4Addr::new(10, 0, 0, 1)),
                ext_gateway: Some(Ipv4Addr::new(10, 0, 1, 1)),
                internal_cidrs: vec!["10.9.0.0/16".parse().expect("cidr")],
            }),
            sweep_interval: Duration::from_secs(22),
            stats_interval: Some(Duration::from_secs(23)),
            show_flows: 24,
            anti_spoofing: false,
            policy: Policy {
                rules: vec![
                    Rule {
                        name: "--deny tcp:25".into(),
                        inside: Prefix::ANY,
                        dst: Prefix::ANY,
                        proto: nat_common::IPPROTO_TCP,
                        ports: (25, 25),
                        verdict: Verdict::Deny(ANSWER_DROP),
                    },
                    Rule {
                        name: "--allow 192.0.2.0/24".into(),
                        inside: Prefix::ANY,
                        dst: Prefix::new(Ipv4Addr::new(192, 0, 2, 0), 24),
                        proto: PROTO_ANY,
                        ports: (0, u16::MAX),
                        verdict: Verdict::Allow,
                    },
                ],
                default: Verdict::Deny(nat_common::policy::ANSWER_RST),
            },
            metrics_listen: Some("10.0.0.4:9100".parse().expect("addr")),
            metrics_allow_ext: true,
            translation_log: Some("/var/log/nat-translations.jsonl".into()),
        };
        assert_eq!(c, expected);
        let off = config(
            &toml
                .replace("no-policy-routing = false", "no-policy-routing = true")
                .replace("internal-cidr = [\"10.9.0.0/16\"]", ""),
            &[],
        )
        .expect("config");
        assert_eq!(off.routing, None);
        // Every key counted: a new flag must be added here and to File.
        assert_eq!(toml.lines().count(), packaged_keys(true).lines().count());
    }

    const POLICY: &str = "[policy]\n\
        [[policy.rule]]\nname = \"https-mirrors\"\ninside = \"10.1.0.0/16\"\n\
        destination = \"198.51.100.0/24\"\nprotocol = \"tcp\"\nports = \"443\"\naction = \"allow\"\n\
        [[policy.rule]]\nname = \"no-smtp\"\nprotocol = \"tcp\"\nports = \"25-26\"\n\
        action = \"deny\"\nanswer = \"icmp-prohibited\"\n";

    #[test]
    fn policy_rules_come_from_the_file_after_the_flags_in_order() {
        let c = config(&format!("{NICS}{POLICY}"), &["--deny", "udp:53"]).expect("config");
        let names: Vec<&str> = c.policy.rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["--deny udp:53", "https-mirrors", "no-smtp"]);
        let r = &c.policy.rules[1];
        assert_eq!(r.inside, Prefix::new(Ipv4Addr::new(10, 1, 0, 0), 16));
        assert_eq!(r.dst, Prefix::new(Ipv4Addr::new(198, 51, 100, 0), 24));
        assert_eq!(
            (r.proto, r.ports, r.verdict),
            (6, (443, 443), Verdict::Allow)
        );
        let r = &c.policy.rules[2];
        assert_eq!(r.inside, Prefix::ANY);
        assert_eq!(
            (r.ports, r.verdict),
            ((25, 26), Verdict::Deny(nat_common::policy::ANSWER_ICMP))
        );
        assert_eq!(c.policy.default, Verdict::Allow);
        assert!(c.anti_spoofing);
    }

    #[test]
    fn a_bad_rule_is_an_error_naming_the_file_line_and_rule() {
        for (bad, line, expected) in [
            ("action = \"allow\"", "line 3", "is not an action"),
            (
                "answer = \"icmp-prohibited\"",
                "line 3",
                "for action \"deny\" only",
            ),
            (
                "protocol = \"icmp\"\nports = \"80\"",
                "line 3",
                "ports need protocol",
            ),
            (
                "protocol = \"udp\"\nanswer = \"tcp-reset\"",
                "line 3",
                "tcp-reset needs",
            ),
            ("destination = \"10.0.0.1/8\"", "line 3", "host bits set"),
            ("colour = \"red\"", "line 6", "unknown key `colour`"),
        ] {
            let action = if bad.starts_with("action") {
                "action = \"permit\""
            } else {
                "action = \"deny\""
            };
            let action = if bad.starts_with("answer") {
                "action = \"allow\""
            } else {
                action
            };
            let toml = format!(
                "{NICS}[[policy.rule]]\nname = \"r1\"\n{action}\n{}\n",
                if bad.starts_with("action") { "" } else { bad }
            );
            let e = err(&toml, &[]);
            assert!(
                e.contains(FILE) && e.contains(line) && e.contains(expected),
                "{bad}: {e}"
            );
            if !expected.starts_with("unknown key") {
                assert!(e.contains("rule \"r1\""), "{e}");
            }
        }
        let e = err(NICS, &["--deny", "tcp:10.0.0.0/8:80:90"]);
        assert!(e.contains("is not [PROTO:][DEST][:PORTS]"), "{e}");
    }

    #[test]
    fn policy_test_builds_the_policy_a_run_would_have() {
        let flags: Vec<String> = ["--deny", "tcp:25", "--policy-default", "tcp-reset"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let p = test_policy(None, &flags).expect("policy");
        assert_eq!(p.rules.len(), 1);
        assert_eq!(p.rules[0].name, "--deny tcp:25");
        assert_eq!(p.default, Verdict::Deny(nat_common::policy::ANSWER_RST));
        let e =
            test_policy(None, &["--deny".to_string(), "sctp:1".to_string()]).expect_err("bad rule");
        assert!(format!("{e:#}").contains("--deny"), "{e:#}");
    }

    #[test]
    fn a_policy_the_dataplane_cannot_hold_is_refused_with_the_reason() {
        let rules: String = (0..=nat_common::policy::MAX_CANDIDATES)
            .map(|i| {
                format!(
                    "[[policy.rule]]\nname = \"r{i}\"\ninside = \"10.9.{i}.0/24\"\naction = \"deny\"\n"
                )
            })
            .collect();
        let e = err(&format!("{NICS}{rules}"), &[]);
        assert!(
            e.contains("egress policy") && e.contains("destination 0.0.0.0/0"),
            "{e}"
        );
    }
}

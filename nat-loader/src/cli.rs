//! The command line: clap types only. Every value is parsed once, into the
//! type the configuration keeps ([`crate::values`]); how the values combine
//! (and the config file) is [`crate::config`]'s business.

use std::{collections::BTreeSet, ffi::OsString, net::Ipv4Addr, path::PathBuf};

use clap::{
    Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum, parser::ValueSource,
};
use nat_common::{
    DEFAULT_MAX_FLOWS, DEFAULT_MAX_FRAGMENTS, DEFAULT_PROBE_PORT, PORT_HOLD_NS, timeouts::Timeouts,
};
use nat_loader::{dataplane::XdpAttach, events, pins, routing};

use nat_common::policy::Verdict;

use crate::values::{
    Filtering, MssClamp, PortRange, RouteTable, ScheduledEvents, SnatPool,
    policy::{PolicyDefault, RuleSpec as PolicyRuleSpec},
};

/// XDP/eBPF NAT gateway: source NAT from the --int NIC out of the --ext NIC.
///
/// Without a subcommand it runs the gateway (`nat-loader --ext eth0 --int
/// eth1`). SIGTERM/SIGINT: detach and remove everything. SIGUSR2: exit with
/// status 75, leaving the pinned dataplane forwarding for the next loader.
#[derive(Parser, Debug)]
#[command(
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Remove a pinned dataplane for good: detach its programs, unpin its
    /// maps, restore the sysctls recorded by the first loader, remove the
    /// pin directory. For a dataplane whose loader is gone (crashed,
    /// killed, handed over); stop a running loader with SIGTERM instead.
    /// Idempotent.
    Teardown {
        /// Internet-side NIC of the gateway.
        #[arg(long, value_name = "IFNAME")]
        ext: String,
        /// Private-side NIC of the gateway.
        #[arg(long, value_name = "IFNAME")]
        int: String,
        /// The gateway's pin directory.
        #[arg(long, value_name = "DIR", default_value = pins::DEFAULT_DIR)]
        bpffs_dir: PathBuf,
    },
    /// Tell whether a loader with these flags (or `--config FILE`) could
    /// adopt the dataplane pinned in --bpffs-dir, keeping its flows: exit
    /// status 0 if it could (or nothing is pinned), 1 with the reason if
    /// not (another layout version of the maps, another --max-flows...).
    /// Changes nothing. Packaging restarts the service instead of handing
    /// over when a new build cannot adopt.
    CheckAdoption(Box<GatewayArgs>),
    /// The egress policy: reload the running gateway's, or try one.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Print the counters of a running gateway (every hook and reason,
    /// summed over CPUs), read-only from its pinned maps.
    Stats {
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Inspect the sessions of a running gateway (the `conntrack -L` of
    /// this gateway), read-only from its pinned maps.
    Conntrack {
        #[command(subcommand)]
        what: ConntrackCommand,
    },
}

/// Where and how the read-only commands read and print.
#[derive(Args, Debug, Clone)]
pub struct ReadArgs {
    /// The running gateway's pin directory.
    #[arg(long, value_name = "DIR", default_value = pins::DEFAULT_DIR)]
    pub bpffs_dir: PathBuf,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum ConntrackCommand {
    /// The sessions, one per line (or a JSON array), that match the filters.
    List {
        #[command(flatten)]
        filter: FilterArgs,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// How many sessions match the filters.
    Count {
        #[command(flatten)]
        filter: FilterArgs,
        #[command(flatten)]
        read: ReadArgs,
    },
    /// Who holds external port PORT: its bindings (held ones too) and
    /// sessions.
    Get {
        /// The external (translated) port or ICMP identifier.
        #[arg(value_name = "PORT")]
        port: u16,
        /// Only this protocol.
        #[arg(long, value_enum)]
        proto: Option<ProtoArg>,
        #[command(flatten)]
        read: ReadArgs,
    },
}

/// Session filters; each given one must match.
#[derive(Args, Debug, Clone, Default)]
pub struct FilterArgs {
    #[arg(long, value_enum)]
    pub proto: Option<ProtoArg>,
    /// Inside host address.
    #[arg(long, value_name = "IPV4")]
    pub inside: Option<Ipv4Addr>,
    /// Outside (remote) host address.
    #[arg(long, value_name = "IPV4")]
    pub outside: Option<Ipv4Addr>,
    /// A port at any end (inside, external or remote).
    #[arg(long, value_name = "PORT")]
    pub port: Option<u16>,
    /// State: opening, established, closing (TCP); answered, unanswered
    /// (UDP, ICMP).
    #[arg(long, value_parser = ["opening", "established", "closing", "answered", "unanswered"])]
    pub state: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProtoArg {
    Tcp,
    Udp,
    Icmp,
}

impl ProtoArg {
    pub fn number(self) -> u8 {
        match self {
            ProtoArg::Tcp => nat_common::IPPROTO_TCP,
            ProtoArg::Udp => nat_common::IPPROTO_UDP,
            ProtoArg::Icmp => nat_common::IPPROTO_ICMP,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Make the running gateway (the loader holding --bpffs-dir) read its
    /// config file again and apply its egress policy to new flows, as
    /// SIGHUP and `systemctl reload` do.
    Apply {
        /// Also end the established flows the new policy denies.
        #[arg(long)]
        recheck: bool,
        /// The gateway's pin directory.
        #[arg(long, value_name = "DIR", default_value = pins::DEFAULT_DIR)]
        bpffs_dir: PathBuf,
    },
    /// Print the running gateway's egress policy (the loader holding
    /// --bpffs-dir) as its maps hold it, with each rule's hits since it
    /// was installed.
    Show {
        /// The gateway's pin directory.
        #[arg(long, value_name = "DIR", default_value = pins::DEFAULT_DIR)]
        bpffs_dir: PathBuf,
        /// The config file the gateway read, for the rules' names (the
        /// maps hold no names).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Say which rule of a config file's policy (with its flags) decides a
    /// flow, the way the dataplane does.
    Test {
        /// The config file (its `[[policy.rule]]`s, `allow`, `deny` and
        /// `policy-default` keys).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Inside source address.
        #[arg(long, value_name = "IPV4")]
        src: Ipv4Addr,
        /// Destination address.
        #[arg(long, value_name = "IPV4")]
        dst: Ipv4Addr,
        /// tcp, udp or icmp.
        #[arg(long, value_name = "PROTO", value_parser = crate::values::policy::protocol)]
        proto: u8,
        /// Destination port (TCP, UDP).
        #[arg(long, value_name = "PORT", default_value_t = 0)]
        port: u16,
        /// Rules as on the gateway's command line.
        #[arg(long, value_name = "RULE")]
        deny: Vec<PolicyRuleSpec>,
        #[arg(long, value_name = "RULE")]
        allow: Vec<PolicyRuleSpec>,
        #[arg(long, value_name = "VERDICT")]
        policy_default: Option<PolicyDefault>,
    },
}

/// The flags of a gateway run. Each but `--config` has a key of the same
/// name in the config file (see config.rs); a flag given here wins.
#[derive(Args, Debug, Clone)]
pub struct GatewayArgs {
    /// Read settings from this TOML file (e.g. /etc/nat-loader/nat-loader.toml):
    /// one key per flag, named like it without the dashes (`port-range =
    /// "20000-29999"`). Flags given on the command line override the file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Internet-side NIC: translated traffic leaves here.
    #[arg(long, value_name = "IFNAME", required_unless_present = "config")]
    pub ext: Option<String>,
    /// Private-side NIC: traffic to translate arrives here.
    #[arg(long, value_name = "IFNAME", required_unless_present = "config")]
    pub int: Option<String>,
    /// Directory on a BPF file system where the maps and program links are
    /// pinned; a loader adopts the dataplane it finds there. Mounts bpffs at
    /// /sys/fs/bpf if needed. One directory per gateway.
    #[arg(long, value_name = "DIR", default_value = pins::DEFAULT_DIR)]
    pub bpffs_dir: PathBuf,
    /// The SNAT address pool: source addresses of translated traffic, a
    /// comma-separated list of addresses, ranges A-B and prefixes A/N (up
    /// to 64 addresses), or `auto` for every IPv4 address on --ext,
    /// followed while the gateway runs. Each inside host gets one of them
    /// for all its flows (paired pooling) [default: the primary IPv4
    /// address of --ext, followed].
    #[arg(long, value_name = "LIST")]
    pub snat_ip: Option<SnatPool>,
    /// External ports (and ICMP identifiers) to translate inside ports >= 1024 to, inclusive.
    #[arg(long, value_name = "MIN-MAX", default_value_t = PortRange::DEFAULT)]
    pub port_range: PortRange,
    /// External ports for inside ports below 1024 (RFC 4787 REQ-3a), inclusive.
    #[arg(long, value_name = "MIN-MAX", default_value_t = PortRange::DEFAULT_LOW)]
    pub low_port_range: PortRange,
    /// Which inbound packets a binding lets in besides replies of its
    /// sessions (RFC 4787 section 5): only replies (address-and-port-dependent),
    /// anything from a remote address it has sent to (address-dependent), or
    /// anything (endpoint-independent, for peer-to-peer applications).
    #[arg(long, value_enum, default_value_t = FilteringArg::AddressAndPortDependent)]
    pub filtering: FilteringArg,
    /// Let inbound UDP packets refresh a session's idle timer too (by
    /// default only outbound ones do, RFC 4787 REQ-6).
    #[arg(long)]
    pub udp_inbound_refresh: bool,
    /// How long a released external port stays reserved for its inside
    /// endpoint before another may get it, seconds (RFC 6888: 120).
    #[arg(long, value_name = "SECS", default_value_t = PORT_HOLD_NS / 1_000_000_000)]
    pub port_hold: u64,
    /// Lower the TCP MSS option of SYN and SYN-ACK segments (both
    /// directions) to at most this many bytes, for paths with a smaller
    /// MTU than the hosts' own (0: off).
    #[arg(long, value_name = "BYTES", default_value_t = MssClamp::OFF)]
    pub mss_clamp: MssClamp,
    /// Conntrack table size, in flows (preallocated; up to 16777216). The
    /// loader logs the memory it takes and refuses more than 90% of
    /// MemAvailable.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_FLOWS)]
    pub max_flows: u32,
    /// Fragment budget: how many fragmented datagrams from --ext are
    /// tracked at once (16 bytes each), and four times fewer fragments
    /// held because they came before their first one (2 KiB each). Both
    /// tables are LRU: when full the oldest is forgotten, and a forgotten
    /// held fragment is counted (drop_fragment_budget).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_FRAGMENTS)]
    pub max_fragments: u32,
    /// How to attach XDP.
    #[arg(long, value_enum, default_value_t = XdpModeArg::Auto)]
    pub xdp_mode: XdpModeArg,
    /// Idle timeout of UDP mappings, seconds (RFC 4787: at least 120).
    #[arg(long, value_name = "SECS", default_value_t = Timeouts::DEFAULT.udp_ns / 1_000_000_000)]
    pub udp_timeout: u64,
    /// Idle timeout of established TCP connections, seconds.
    #[arg(long, value_name = "SECS", default_value_t = Timeouts::DEFAULT.tcp_established_ns / 1_000_000_000)]
    pub tcp_established_timeout: u64,
    /// Idle timeout of TCP connections opening or closing, seconds.
    #[arg(long, value_name = "SECS", default_value_t = Timeouts::DEFAULT.tcp_transitory_ns / 1_000_000_000)]
    pub tcp_transitory_timeout: u64,
    /// Idle timeout of ICMP echo mappings, seconds.
    #[arg(long, value_name = "SECS", default_value_t = Timeouts::DEFAULT.icmp_ns / 1_000_000_000)]
    pub icmp_timeout: u64,
    /// TCP port of the load balancer's health probe (0: none). It accepts
    /// only while the dataplane is healthy (programs attached on both NICs,
    /// maps reachable, both links up, forwarding on), checked every 250 ms;
    /// otherwise connections are refused. It closes first on shutdown.
    #[arg(long, value_name = "PORT", default_value_t = DEFAULT_PROBE_PORT)]
    pub probe_port: u16,
    /// TCP port of an HTTP health endpoint: `GET /healthz` answers 200
    /// `{"healthy":true}` or 503 with the reason [default: none].
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub health_port: Option<u16>,
    /// On SIGTERM/SIGINT: fail the probes at once, keep forwarding this many
    /// seconds so the load balancer moves new flows away while established
    /// ones finish, then detach. A second signal stops at once.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub drain_seconds: u64,
    /// Watch Azure's Scheduled Events (the metadata service's notice that
    /// the platform will terminate, evict, reboot or redeploy this VM): on
    /// such a notice, drain as on SIGTERM, then approve the event and shut
    /// down. URL [default when given alone: the metadata service's].
    #[arg(long, value_name = "URL", num_args = 0..=1, default_missing_value = events::DEFAULT_URL)]
    pub scheduled_events: Option<ScheduledEvents>,
    /// Do not add policy rules and routes (replies to probes then follow
    /// the main table, which on a two-NIC VM sends them out of --ext).
    #[arg(long)]
    pub no_policy_routing: bool,
    /// Routing table for traffic from --int's addresses.
    #[arg(long, value_name = "ID", default_value_t = RouteTable(routing::DEFAULT_INT_TABLE))]
    pub int_table: RouteTable,
    /// Routing table for traffic from --ext's addresses.
    #[arg(long, value_name = "ID", default_value_t = RouteTable(routing::DEFAULT_EXT_TABLE))]
    pub ext_table: RouteTable,
    /// Gateway of --int's subnet [default: from the default route through --int;
    /// in Azure the subnet's first address, e.g. 10.0.1.1].
    #[arg(long, value_name = "IPV4")]
    pub int_gateway: Option<Ipv4Addr>,
    /// Gateway of --ext's subnet [default: from the default route through --ext].
    #[arg(long, value_name = "IPV4")]
    pub ext_gateway: Option<Ipv4Addr>,
    /// An inside prefix beyond --int's own subnet (e.g. peered networks),
    /// routed via --int's gateway so replies find the way back. Repeatable.
    #[arg(long, value_name = "CIDR")]
    pub internal_cidr: Vec<routing::Cidr>,
    /// How often expired flows are swept, seconds.
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub sweep_interval: u64,
    /// Log the counters (and with --show-flows the flows) this often, seconds; 0 = only at exit.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub stats_interval: u64,
    /// With each stats line, also log up to this many translated flows.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub show_flows: usize,
    /// Do not drop new flows from --int whose source is outside --int's
    /// subnets and the --internal-cidr prefixes (anti-spoofing, BCP 38).
    #[arg(long)]
    pub no_anti_spoofing: bool,
    /// Deny new flows matching `[PROTO:][DEST][:PORTS]` (e.g. `tcp:25`),
    /// silently. Repeatable; checked before --allow and the config file's
    /// `[[policy.rule]]`s.
    #[arg(long, value_name = "RULE")]
    pub deny: Vec<PolicyRuleSpec>,
    /// Allow new flows matching `[PROTO:][DEST][:PORTS]` (e.g.
    /// `tcp:198.51.100.0/24:443`). Repeatable; checked after --deny.
    #[arg(long, value_name = "RULE")]
    pub allow: Vec<PolicyRuleSpec>,
    /// What new flows no rule matches get: allow, drop, icmp-prohibited
    /// or tcp-reset.
    #[arg(long, value_name = "VERDICT", default_value_t = PolicyDefault(Verdict::Allow))]
    pub policy_default: PolicyDefault,
    /// The config file's `[[policy.rule]]`s (no flag).
    #[arg(skip)]
    pub policy_rules: Vec<nat_common::policy::Rule>,
    /// Serve Prometheus metrics (`GET /metrics`) on this address and TCP
    /// port, e.g. 10.0.1.4:9100 or 0.0.0.0:9100 [default: none]. Not
    /// reachable from the --ext side: an --ext address is refused, and any
    /// other but loopback is bound to --int (SO_BINDTODEVICE).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_listen: Option<std::net::SocketAddrV4>,
    /// Let --metrics-listen take connections from the --ext side too (no
    /// --int binding; an --ext address allowed).
    #[arg(long)]
    pub metrics_allow_ext: bool,
    /// Append a JSON line to this file for every binding created, released
    /// and freed, and for new flows refused for want of a port: which
    /// inside endpoint had which external port when; `journal`: to the
    /// loader's log (target nat_translog) instead [default: none].
    #[arg(long, value_name = "PATH")]
    pub translation_log: Option<PathBuf>,
}

/// `--filtering`'s values (RFC 4787 section 5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FilteringArg {
    EndpointIndependent,
    AddressDependent,
    AddressAndPortDependent,
}

impl From<FilteringArg> for Filtering {
    fn from(f: FilteringArg) -> Filtering {
        match f {
            FilteringArg::EndpointIndependent => Filtering::EndpointIndependent,
            FilteringArg::AddressDependent => Filtering::AddressDependent,
            FilteringArg::AddressAndPortDependent => Filtering::AddressAndPortDependent,
        }
    }
}

/// `--xdp-mode`'s values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum XdpModeArg {
    /// Native (driver) mode, falling back to generic mode where the driver
    /// has no XDP support.
    Auto,
    /// Native mode only.
    Native,
    /// Generic (skb) mode: works everywhere, slower.
    Generic,
}

impl From<XdpModeArg> for XdpAttach {
    fn from(m: XdpModeArg) -> XdpAttach {
        match m {
            XdpModeArg::Auto => XdpAttach::Auto,
            XdpModeArg::Native => XdpAttach::Native,
            XdpModeArg::Generic => XdpAttach::Generic,
        }
    }
}

/// The value of a `ValueEnum` spelled as on the command line (for the
/// config file, so that both accept the same words).
pub fn value_enum<T: ValueEnum>(s: &str) -> Result<T, String> {
    T::from_str(s, false).map_err(|_| {
        let words: Vec<String> = T::value_variants()
            .iter()
            .filter_map(|v| v.to_possible_value())
            .map(|p| p.get_name().to_string())
            .collect();
        format!("{s:?} is not one of {}", words.join(", "))
    })
}

/// The ids of the flags given on the command line (not defaulted): they
/// win over the config file.
#[derive(Debug, Default, Clone)]
pub struct Given(BTreeSet<String>);

impl Given {
    /// Whether the flag whose field is `id` (`port_range`) was given.
    pub fn contains(&self, id: &str) -> bool {
        self.0.contains(id)
    }
}

impl Cli {
    /// Parses the process's arguments; prints the usage and exits on an
    /// error, as clap does.
    pub fn parse_args() -> (Cli, Given) {
        Cli::try_parse_args(std::env::args_os()).unwrap_or_else(|e| e.exit())
    }

    pub fn try_parse_args(
        argv: impl IntoIterator<Item = impl Into<OsString> + Clone>,
    ) -> Result<(Cli, Given), clap::Error> {
        let matches = Cli::command().try_get_matches_from(argv)?;
        let cli = Cli::from_arg_matches(&matches)?;
        // A subcommand that takes the gateway's flags: what was given to it.
        let matches = matches
            .subcommand_matches("check-adoption")
            .unwrap_or(&matches);
        let given = matches
            .ids()
            .filter(|id| matches.value_source(id.as_str()) == Some(ValueSource::CommandLine))
            .map(|id| id.to_string())
            .collect();
        Ok((cli, Given(given)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<(Cli, Given), clap::Error> {
        let mut argv = vec!["nat-loader", "--ext", "eth0", "--int", "eth1"];
        argv.extend_from_slice(extra);
        Cli::try_parse_args(argv)
    }

    #[test]
    fn flags_alone_still_run_the_gateway() {
        let (a, _) = parse(&[]).expect("today's invocation");
        assert!(a.command.is_none());
        let g = &a.gateway;
        assert_eq!(
            (g.ext.as_deref(), g.int.as_deref()),
            (Some("eth0"), Some("eth1"))
        );
        assert_eq!(g.bpffs_dir, PathBuf::from(pins::DEFAULT_DIR));
        assert!(Cli::try_parse_args(["nat-loader", "--int", "eth1"]).is_err());
    }

    #[test]
    fn a_config_file_may_name_the_interfaces_instead() {
        let (a, _) = Cli::try_parse_args(["nat-loader", "--config", "/x.toml"]).expect("config");
        assert_eq!(a.gateway.config, Some(PathBuf::from("/x.toml")));
        assert_eq!(a.gateway.ext, None);
    }

    #[test]
    fn given_holds_the_typed_flags_and_not_the_defaults() {
        let (a, given) =
            parse(&["--port-range", "2000-3000", "--udp-inbound-refresh"]).expect("ok");
        assert_eq!(
            a.gateway.port_range,
            PortRange {
                min: 2000,
                max: 3000
            }
        );
        for id in ["ext", "int", "port_range", "udp_inbound_refresh"] {
            assert!(given.contains(id), "{id}");
        }
        for id in [
            "low_port_range",
            "max_flows",
            "filtering",
            "no_policy_routing",
        ] {
            assert!(!given.contains(id), "{id}");
        }
    }

    #[test]
    fn scheduled_events_is_off_alone_means_the_metadata_service_and_takes_an_http_url() {
        let se = |extra: &[&str]| parse(extra).map(|(a, _)| a.gateway.scheduled_events);
        assert_eq!(se(&[]).expect("no flag"), None);
        assert_eq!(
            se(&["--scheduled-events", "--probe-port", "9999"]).expect("alone"),
            Some(ScheduledEvents::new(events::DEFAULT_URL).expect("url"))
        );
        assert_eq!(
            se(&["--scheduled-events", "http://127.0.0.1:8080/se"]).expect("url"),
            Some(ScheduledEvents::new("http://127.0.0.1:8080/se").expect("url"))
        );
        let err = se(&["--scheduled-events", "https://169.254.169.254/x"])
            .expect_err("https refused")
            .to_string();
        assert!(err.contains("only http://"), "{err}");
    }

    #[test]
    fn values_are_checked_as_they_are_parsed() {
        for bad in [
            &["--port-range", "2000-1000"][..],
            &["--mss-clamp", "40"],
            &["--int-table", "254"],
            &["--sweep-interval", "0"],
            &["--health-port", "0"],
            &["--filtering", "full-cone"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn teardown_is_a_subcommand_with_its_own_flags() {
        let (a, _) = Cli::try_parse_args([
            "nat-loader",
            "teardown",
            "--ext",
            "eth0",
            "--int",
            "eth1",
            "--bpffs-dir",
            "/x",
        ])
        .expect("teardown");
        match a.command {
            Some(Command::Teardown {
                ext,
                int,
                bpffs_dir,
            }) => {
                assert_eq!((ext.as_str(), int.as_str()), ("eth0", "eth1"));
                assert_eq!(bpffs_dir, PathBuf::from("/x"));
            }
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_args(["nat-loader", "teardown", "--ext", "eth0"]).is_err());
        assert!(
            Cli::try_parse_args([
                "nat-loader",
                "--max-flows",
                "5",
                "teardown",
                "--ext",
                "a",
                "--int",
                "b"
            ])
            .is_err(),
            "gateway flags do not mix with a subcommand"
        );
    }

    #[test]
    fn stats_and_conntrack_are_read_only_subcommands_with_filters_and_json() {
        let (a, _) = Cli::try_parse_args(["nat-loader", "stats", "-o", "json"]).expect("stats");
        match a.command {
            Some(Command::Stats { read }) => {
                assert_eq!(read.output, Output::Json);
                assert_eq!(read.bpffs_dir, PathBuf::from(pins::DEFAULT_DIR));
            }
            other => panic!("{other:?}"),
        }
        let (a, _) = Cli::try_parse_args([
            "nat-loader",
            "conntrack",
            "list",
            "--proto",
            "udp",
            "--inside",
            "10.1.0.11",
            "--state",
            "answered",
            "--bpffs-dir",
            "/x",
        ])
        .expect("list");
        match a.command {
            Some(Command::Conntrack {
                what: ConntrackCommand::List { filter, read },
            }) => {
                assert_eq!(filter.proto, Some(ProtoArg::Udp));
                assert_eq!(filter.inside, Some(Ipv4Addr::new(10, 1, 0, 11)));
                assert_eq!(filter.state.as_deref(), Some("answered"));
                assert_eq!((read.output, read.bpffs_dir), (Output::Text, "/x".into()));
            }
            other => panic!("{other:?}"),
        }
        let (a, _) = Cli::try_parse_args(["nat-loader", "conntrack", "get", "40000"]).expect("get");
        assert!(matches!(
            a.command,
            Some(Command::Conntrack {
                what: ConntrackCommand::Get { port: 40000, .. }
            })
        ));
        for bad in [
            &["nat-loader", "conntrack", "list", "--state", "half-open"][..],
            &["nat-loader", "conntrack", "get"],
            &["nat-loader", "stats", "-o", "yaml"],
        ] {
            assert!(Cli::try_parse_args(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn metrics_listen_takes_an_ipv4_socket_address() {
        let (a, _) = parse(&["--metrics-listen", "10.0.0.4:9100"]).expect("ok");
        assert_eq!(
            a.gateway.metrics_listen,
            Some("10.0.0.4:9100".parse().expect("addr"))
        );
        assert!(parse(&["--metrics-listen", "9100"]).is_err());
    }

    #[test]
    fn the_value_enums_map_every_word_to_its_own_value() {
        assert_eq!(
            value_enum::<FilteringArg>("endpoint-independent"),
            Ok(FilteringArg::EndpointIndependent)
        );
        assert_eq!(value_enum::<XdpModeArg>("generic"), Ok(XdpModeArg::Generic));
        let e = value_enum::<XdpModeArg>("turbo").expect_err("no such mode");
        assert!(e.contains("auto, native, generic"), "{e}");
    }
}

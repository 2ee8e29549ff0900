//! `nat-loader`: attaches the NAT gateway's eBPF programs to the `--int` and
//! `--ext` NICs and runs its control plane in the foreground until SIGINT or
//! SIGTERM. On that exit, and on any failure half-way through a fresh
//! start, it removes everything it added.
//!
//! The maps and program links are pinned (`--bpffs-dir`), so the dataplane
//! survives the process: after a crash, a SIGKILL or a SIGUSR2 handover the
//! programs keep forwarding, and the next loader adopts them and swaps in
//! its own programs atomically. `nat-loader teardown` removes a dataplane
//! whose loader is gone.

use std::{net::Ipv4Addr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use nat_common::{
    CFG_F_UDP_INBOUND_REFRESH, DEFAULT_LOW_PORT_MAX, DEFAULT_LOW_PORT_MIN, DEFAULT_MAX_FLOWS,
    DEFAULT_MAX_FRAGMENTS, DEFAULT_PORT_MAX, DEFAULT_PORT_MIN, DEFAULT_PROBE_PORT, FILTER_ADDRESS,
    FILTER_ADDRESS_AND_PORT, FILTER_ENDPOINT_INDEPENDENT, PORT_HOLD_NS, timeouts::Timeouts,
};
use nat_common::{MAP_STATS, PROG_TC_EXT, PROG_TC_INT, PROG_XDP_EXT, PROG_XDP_INT};
use nat_loader::{
    build_id, caps, conntrack,
    dataplane::{self, CtMaps, Dataplane, Exit, Settings, XdpAttach},
    events::{self, Departure, Imds},
    health::{self, Probe, Status},
    monotonic_ns, netif,
    pins::{self, PinDir},
    routing::{self, Cidr, NicPolicy, Plan, PolicyRoutes},
    stats::Stats,
    sysctl::{self, SysctlGuard},
};
use std::io::IsTerminal;
use tokio::signal::unix::{SignalKind, signal};

use tracing::{info, warn};

/// Exit status of a SIGUSR2 handover: the dataplane is left pinned and
/// forwarding. systemd restarts the service on it (RestartForceExitStatus).
const EXIT_HANDOVER: u8 = 75;

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
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Internet-side NIC: translated traffic leaves here.
    #[arg(long, value_name = "IFNAME", required = true)]
    ext: Option<String>,
    /// Private-side NIC: traffic to translate arrives here.
    #[arg(long, value_name = "IFNAME", required = true)]
    int: Option<String>,
    /// Directory on a BPF file system where the maps and program links are
    /// pinned; a loader adopts the dataplane it finds there. Mounts bpffs at
    /// /sys/fs/bpf if needed. One directory per gateway.
    #[arg(long, value_name = "DIR", default_value = pins::DEFAULT_DIR)]
    bpffs_dir: PathBuf,
    /// Source address of translated traffic [default: the primary IPv4 address of --ext].
    #[arg(long, value_name = "IPV4")]
    snat_ip: Option<Ipv4Addr>,
    /// External ports (and ICMP identifiers) to translate inside ports >= 1024 to, inclusive.
    #[arg(long, value_name = "MIN-MAX", default_value_t = format!("{DEFAULT_PORT_MIN}-{DEFAULT_PORT_MAX}"), value_parser = parse_port_range)]
    port_range: String,
    /// External ports for inside ports below 1024 (RFC 4787 REQ-3a), inclusive.
    #[arg(long, value_name = "MIN-MAX", default_value_t = format!("{DEFAULT_LOW_PORT_MIN}-{DEFAULT_LOW_PORT_MAX}"), value_parser = parse_port_range)]
    low_port_range: String,
    /// Which inbound packets a binding lets in besides replies of its
    /// sessions (RFC 4787 section 5): only replies (address-and-port-dependent),
    /// anything from a remote address it has sent to (address-dependent), or
    /// anything (endpoint-independent, for peer-to-peer applications).
    #[arg(long, value_enum, default_value_t = Filtering::AddressAndPortDependent)]
    filtering: Filtering,
    /// Let inbound UDP packets refresh a session's idle timer too (by
    /// default only outbound ones do, RFC 4787 REQ-6).
    #[arg(long)]
    udp_inbound_refresh: bool,
    /// How long a released external port stays reserved for its inside
    /// endpoint before another may get it, seconds (RFC 6888: 120).
    #[arg(long, value_name = "SECS", default_value_t = PORT_HOLD_NS / 1_000_000_000)]
    port_hold: u64,
    /// Lower the TCP MSS option of SYN and SYN-ACK segments (both
    /// directions) to at most this many bytes, for paths with a smaller
    /// MTU than the hosts' own (0: off).
    #[arg(long, value_name = "BYTES", default_value_t = 0, value_parser = parse_mss_clamp)]
    mss_clamp: u16,
    /// Conntrack table size, in flows.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_FLOWS)]
    max_flows: u32,
    /// Fragment budget: how many fragmented datagrams from --ext are
    /// tracked at once (16 bytes each), and four times fewer fragments
    /// held because they came before their first one (2 KiB each). Both
    /// tables are LRU: when full the oldest is forgotten, and a forgotten
    /// held fragment is counted (drop_fragment_budget).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_FRAGMENTS)]
    max_fragments: u32,
    /// How to attach XDP.
    #[arg(long, value_enum, default_value_t = XdpAttach::Auto)]
    xdp_mode: XdpAttach,
    /// Idle timeout of UDP mappings, seconds (RFC 4787: at least 120).
    #[arg(long, value_name = "SECS", default_value_t = Timeouts::DEFAULT.udp_ns / 1_000_000_000)]
    udp_timeout: u64,
    /// Idle timeout of established TCP connections, seconds.
    #[arg(long, value_name = "SECS", default_value_t = Timeouts::DEFAULT.tcp_established_ns / 1_000_000_000)]
    tcp_established_timeout: u64,
    /// Idle timeout of TCP connections opening or closing, seconds.
    #[arg(long, value_name = "SECS", default_value_t = Timeouts::DEFAULT.tcp_transitory_ns / 1_000_000_000)]
    tcp_transitory_timeout: u64,
    /// Idle timeout of ICMP echo mappings, seconds.
    #[arg(long, value_name = "SECS", default_value_t = Timeouts::DEFAULT.icmp_ns / 1_000_000_000)]
    icmp_timeout: u64,
    /// TCP port of the load balancer's health probe (0: none). It accepts
    /// only while the dataplane is healthy (programs attached on both NICs,
    /// maps reachable, both links up, forwarding on), checked every 250 ms;
    /// otherwise connections are refused. It closes first on shutdown.
    #[arg(long, value_name = "PORT", default_value_t = DEFAULT_PROBE_PORT)]
    probe_port: u16,
    /// TCP port of an HTTP health endpoint: `GET /healthz` answers 200
    /// `{"healthy":true}` or 503 with the reason [default: none].
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    health_port: Option<u16>,
    /// On SIGTERM/SIGINT: fail the probes at once, keep forwarding this many
    /// seconds so the load balancer moves new flows away while established
    /// ones finish, then detach. A second signal stops at once.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    drain_seconds: u64,
    /// Watch Azure's Scheduled Events (the metadata service's notice that
    /// the platform will terminate, evict, reboot or redeploy this VM): on
    /// such a notice, drain as on SIGTERM, then approve the event and shut
    /// down. URL [default when given alone: the metadata service's].
    #[arg(long, value_name = "URL", num_args = 0..=1, default_missing_value = events::DEFAULT_URL, value_parser = parse_events_url)]
    scheduled_events: Option<String>,
    /// Do not add policy rules and routes (replies to probes then follow
    /// the main table, which on a two-NIC VM sends them out of --ext).
    #[arg(long)]
    no_policy_routing: bool,
    /// Routing table for traffic from --int's addresses.
    #[arg(long, value_name = "ID", default_value_t = routing::DEFAULT_INT_TABLE, value_parser = parse_table)]
    int_table: u32,
    /// Routing table for traffic from --ext's addresses.
    #[arg(long, value_name = "ID", default_value_t = routing::DEFAULT_EXT_TABLE, value_parser = parse_table)]
    ext_table: u32,
    /// Gateway of --int's subnet [default: from the default route through --int;
    /// in Azure the subnet's first address, e.g. 10.0.1.1].
    #[arg(long, value_name = "IPV4")]
    int_gateway: Option<Ipv4Addr>,
    /// Gateway of --ext's subnet [default: from the default route through --ext].
    #[arg(long, value_name = "IPV4")]
    ext_gateway: Option<Ipv4Addr>,
    /// An inside prefix beyond --int's own subnet (e.g. peered networks),
    /// routed via --int's gateway so replies find the way back. Repeatable.
    #[arg(long, value_name = "CIDR")]
    internal_cidr: Vec<Cidr>,
    /// How often expired flows are swept, seconds.
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    sweep_interval: u64,
    /// Log the counters (and with --show-flows the flows) this often, seconds; 0 = only at exit.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    stats_interval: u64,
    /// With each stats line, also log up to this many translated flows.
    #[arg(long, value_name = "N", default_value_t = 0)]
    show_flows: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Filtering {
    EndpointIndependent,
    AddressDependent,
    AddressAndPortDependent,
}

impl Filtering {
    fn code(self) -> u8 {
        match self {
            Filtering::EndpointIndependent => FILTER_ENDPOINT_INDEPENDENT,
            Filtering::AddressDependent => FILTER_ADDRESS,
            Filtering::AddressAndPortDependent => FILTER_ADDRESS_AND_PORT,
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
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
}

/// The receiver half of the Scheduled Events watch and its task.
type LeaveNotices = (
    Imds,
    tokio::sync::watch::Receiver<Option<Departure>>,
    tokio::task::JoinHandle<()>,
);

/// The next change of the event that takes this VM away (`None`: no such
/// event any more); pending forever without `--scheduled-events`.
async fn next_notice(n: &mut Option<LeaveNotices>) -> Option<Departure> {
    let Some((_, rx, _)) = n else {
        return std::future::pending().await;
    };
    if rx.changed().await.is_err() {
        // The watcher is gone (it never returns; only at shutdown).
        return std::future::pending().await;
    }
    rx.borrow_and_update().clone()
}

/// Polls the Scheduled Events document every [`events::POLL_INTERVAL`] and
/// publishes the first event that takes VM `vm` away (or `None`). Read
/// errors are logged once per outage and retried: a metadata service that
/// is briefly away must not take the gateway down.
async fn watch_events(imds: Imds, vm: String, tx: tokio::sync::watch::Sender<Option<Departure>>) {
    let mut tick = tokio::time::interval(events::POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        match imds.events().await {
            Ok(doc) => {
                if failing {
                    info!("scheduled events readable again");
                    failing = false;
                }
                let next = events::departures(&doc, &vm).into_iter().next();
                tx.send_if_modified(|cur| {
                    let changed = *cur != next;
                    *cur = next;
                    changed
                });
            }
            Err(e) => {
                if !failing {
                    warn!(error = %format!("{e:#}"), "reading scheduled events failed; retrying every second");
                    failing = true;
                }
            }
        }
    }
}

fn parse_events_url(s: &str) -> Result<String, String> {
    events::Imds::new(s)
        .map(|_| s.to_string())
        .map_err(|e| format!("{e:#}"))
}

fn parse_table(s: &str) -> Result<u32, String> {
    let t: u32 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a table number"))?;
    // 0 is "unspecified", 253-255 are the kernel's default, main and local.
    if t == 0 || (253..=255).contains(&t) {
        return Err(format!("table {t} is reserved; pick 1-252 or above 255"));
    }
    Ok(t)
}

/// Linux's own floor for an MSS (TCP_MIN_MSS): 0 turns clamping off.
const MIN_MSS: u16 = 88;

fn parse_mss_clamp(s: &str) -> Result<u16, String> {
    let v: u16 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of bytes (0-65535)"))?;
    if v != 0 && v < MIN_MSS {
        return Err(format!(
            "{v} is below the smallest MSS TCP accepts ({MIN_MSS}); 0 turns clamping off"
        ));
    }
    Ok(v)
}

fn parse_port_range(s: &str) -> Result<String, String> {
    port_range(s).map(|_| s.to_string())
}

fn port_range(s: &str) -> Result<(u16, u16), String> {
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
    Ok((min, max))
}

const SEC: u64 = 1_000_000_000;

impl Args {
    fn timeouts(&self) -> Result<Timeouts> {
        if self.udp_timeout < 120 {
            warn!(
                secs = self.udp_timeout,
                "UDP timeout below the 120 s RFC 4787 REQ-5 asks for"
            );
        }
        for (name, v) in [
            ("--udp-timeout", self.udp_timeout),
            ("--tcp-established-timeout", self.tcp_established_timeout),
            ("--tcp-transitory-timeout", self.tcp_transitory_timeout),
            ("--icmp-timeout", self.icmp_timeout),
        ] {
            if v == 0 {
                bail!("{name} must be at least 1 second");
            }
        }
        Ok(Timeouts {
            udp_ns: self.udp_timeout * SEC,
            icmp_ns: self.icmp_timeout * SEC,
            tcp_established_ns: self.tcp_established_timeout * SEC,
            tcp_transitory_ns: self.tcp_transitory_timeout * SEC,
        })
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nat-loader: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let fut = async {
        match args.command {
            Some(Command::Teardown {
                ref ext,
                ref int,
                ref bpffs_dir,
            }) => teardown(ext, int, bpffs_dir)
                .await
                .map(|()| ExitCode::SUCCESS),
            None => run(args).await,
        }
    };
    match rt.block_on(fut) {
        Ok(code) => code,
        Err(e) => {
            // One line: the chain of contexts, outermost first.
            eprintln!("nat-loader: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `nat-loader teardown`: removes a pinned dataplane left by a loader that
/// is gone.
async fn teardown(ext: &str, int: &str, dir: &std::path::Path) -> Result<()> {
    caps::require()?;
    let pins = PinDir::new(dir);
    if !pins.exists() {
        info!(pins = %dir.display(), "no pinned dataplane: nothing to remove");
    } else {
        let _lock = pins.lock()?;
        let record = pins.sysctl_record()?;
        let removed = pins.remove_all()?;
        info!(pins = %dir.display(), removed = ?removed, "detached the pinned programs and removed the pins");
        sysctl::restore_record(&record);
    }
    purge_policy_routing().await?;
    info!(
        ext,
        int, "teardown complete: nothing of the gateway is left"
    );
    Ok(())
}

/// Removes the policy rules and routes a loader that is gone left (every
/// one carries our route protocol number).
async fn purge_policy_routing() -> Result<()> {
    let handle = netif::connect()?;
    let (rules, routes) = routing::purge_ours(&handle).await?;
    if rules + routes > 0 {
        info!(
            rules,
            routes, "removed the policy rules and routes left behind"
        );
    }
    Ok(())
}

async fn run(args: Args) -> Result<ExitCode> {
    // Caught from the very start: a SIGTERM while the dataplane is being
    // set up (or the moment the ready line is out, before the main loop
    // runs) would otherwise kill the process by default, leaving programs,
    // rules and routes behind. Pending signals are acted on by the loop.
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigusr2 =
        signal(SignalKind::user_defined2()).context("installing the SIGUSR2 handler")?;
    // Everything that can be checked without changing the host comes first,
    // so a bad invocation leaves the host exactly as it was.
    let (Some(ext_name), Some(int_name)) = (args.ext.clone(), args.int.clone()) else {
        bail!("--ext and --int are required");
    };
    if ext_name == int_name {
        bail!(
            "--ext and --int are the same interface ({}): the gateway needs two NICs",
            ext_name
        );
    }
    let (port_min, port_max) = port_range(&args.port_range).map_err(anyhow::Error::msg)?;
    let (low_port_min, low_port_max) =
        port_range(&args.low_port_range).map_err(anyhow::Error::msg)?;
    if low_port_max >= 1024 || port_min < 1024 {
        bail!(
            "--low-port-range must lie below 1024 and --port-range at or above it \
             (RFC 4787 REQ-3a keeps the two apart)"
        );
    }
    if args.max_flows == 0 {
        bail!("--max-flows: the conntrack table needs room for at least one flow");
    }
    if args.max_fragments == 0 {
        bail!("--max-fragments: the fragment tracking table needs room for at least one datagram");
    }
    let timeouts = args.timeouts()?;
    caps::require()?;
    let handle = netif::connect()?;
    let ext = netif::lookup(&handle, &ext_name).await.context("--ext")?;
    let int = netif::lookup(&handle, &int_name).await.context("--int")?;
    for nic in [&ext, &int] {
        if !nic.up {
            warn!(interface = %nic.name, "interface is down; traffic flows once it is up");
        }
        if nic.controller.is_some() {
            warn!(
                interface = %nic.name,
                "interface is enslaved to another device (an accelerated-networking VF?); \
                 attach to the synthetic NIC instead"
            );
        }
    }
    let snat_addr = match args.snat_ip {
        Some(a) => {
            if !ext.ipv4.contains(&a) {
                warn!(snat_ip = %a, interface = %ext.name, "SNAT address is not configured on --ext; replies must be routed to it");
            }
            a
        }
        None => *ext.ipv4.first().with_context(|| {
            format!(
                "--ext {} has no IPv4 address to use as the SNAT address (configure one or give --snat-ip)",
                ext.name
            )
        })?,
    };
    if !args.no_policy_routing && args.int_table == args.ext_table {
        bail!(
            "--int-table and --ext-table are both {}: each NIC needs its own table",
            args.int_table
        );
    }
    if args.no_policy_routing && !args.internal_cidr.is_empty() {
        bail!("--internal-cidr needs policy routing; drop --no-policy-routing");
    }
    if args.health_port.is_some() && args.health_port == Some(args.probe_port) {
        bail!(
            "--health-port and --probe-port are both {}",
            args.probe_port
        );
    }
    let plan = if args.no_policy_routing {
        None
    } else {
        let int_gw = match args.int_gateway {
            Some(g) => Some(g),
            None => routing::discover_gateway(&handle, int.index).await?,
        };
        let ext_gw = match args.ext_gateway {
            Some(g) => Some(g),
            None => routing::discover_gateway(&handle, ext.index).await?,
        };
        Some(Plan {
            int: NicPolicy {
                name: int.name.clone(),
                index: int.index,
                table: args.int_table,
                gateway: int_gw,
            },
            ext: NicPolicy {
                name: ext.name.clone(),
                index: ext.index,
                table: args.ext_table,
                gateway: ext_gw,
            },
            internal_cidrs: args.internal_cidr.clone(),
        })
    };
    if let Some(p) = &plan
        && !p.internal_cidrs.is_empty()
        && p.int.gateway.is_none()
    {
        bail!(
            "--internal-cidr: no gateway of --int {} found (no default route through it): give --int-gateway",
            int.name
        );
    }
    // RFC 5508 REQ-8: the out-of-ports ICMP errors come from --int's
    // address, the one the inside hosts know the gateway by.
    let int_addr = int.ipv4.first().copied();
    if int_addr.is_none() {
        warn!(interface = %int.name,
            "--int has no IPv4 address: new flows that find no free port are dropped without an ICMP error");
    }
    let settings = Settings {
        ext: ext.name.clone(),
        ext_index: ext.index,
        int: int.name.clone(),
        int_index: int.index,
        snat_addr,
        port_min,
        port_max,
        low_port_min,
        low_port_max,
        filtering: args.filtering.code(),
        flags: if args.udp_inbound_refresh {
            CFG_F_UDP_INBOUND_REFRESH
        } else {
            0
        },
        probe_port: args.probe_port,
        int_mac: int.mac.unwrap_or_default(),
        ext_mac: ext.mac.unwrap_or_default(),
        max_flows: args.max_flows,
        max_fragments: args.max_fragments,
        xdp: args.xdp_mode,
        int_addr,
        mss_clamp: args.mss_clamp,
    };

    let build = build_id::current();
    info!(build = %build, version = env!("CARGO_PKG_VERSION"), pins = %args.bpffs_dir.display(), "nat-loader starting");

    // From here on every change is owned by a guard that undoes it on drop.
    let pins = PinDir::new(&args.bpffs_dir);
    let created = !pins.exists();
    pins.prepare()?;
    let _lock = match pins.lock() {
        Ok(l) => l,
        Err(e) => {
            if created {
                let _ = std::fs::remove_dir(pins.path());
            }
            return Err(e);
        }
    };
    let adopting = pins.has_maps();
    if adopting {
        // Refuse an incompatible dataplane before touching anything.
        pins.check_maps(args.max_flows)?;
    } else {
        // The pin directory may be ours alone: remove it again on failure.
        if let Err(e) = prepare_fresh(&pins) {
            let _ = pins.remove_all();
            return Err(e);
        }
    }
    let mut sysctls = SysctlGuard::default();
    let started = (|| -> Result<Dataplane> {
        // Record the originals before changing anything, keeping an earlier
        // loader's record (its "before" is the true one).
        let keys = sysctl::forwarding_keys(&ext.name, &int.name);
        let record = sysctl::complete_record(pins.sysctl_record()?, &keys)?;
        pins.write_sysctl_record(&record)?;
        sysctl::enable_forwarding(&mut sysctls, &ext.name, &int.name)?;
        sysctls.restore_to(&record);
        Dataplane::start(&settings, &pins)
    })();
    let dp = match started {
        Ok(dp) => dp,
        Err(e) => {
            if adopting {
                // The earlier dataplane keeps forwarding; leave it and the
                // sysctls it needs for the next attempt or `teardown`.
                sysctls.keep();
            } else {
                let _ = pins.remove_all();
            }
            return Err(e);
        }
    };
    if dp.adopted {
        let flows = conntrack::flows(&dp.maps.sessions, monotonic_ns());
        let foreign = flows
            .iter()
            .filter(|f| {
                let p = f.external.port();
                *f.external.ip() != snat_addr
                    || !((port_min..=port_max).contains(&p)
                        || (low_port_min..=low_port_max).contains(&p))
            })
            .count();
        info!(
            flows = flows.len(),
            "adopted the pinned dataplane and its flows"
        );
        if foreign > 0 {
            warn!(
                flows = foreign,
                snat = %snat_addr, ports = %format!("{port_min}-{port_max}"),
                "adopted flows use another SNAT address or port range than these flags; \
                 they keep their mapping until they expire"
            );
        }
    }
    // Policy routing, health watch, probe listeners: a failure here is a
    // bad invocation (a port in use, a route refused). A fresh start then
    // leaves the host as it was; an adopted dataplane keeps forwarding.
    let ready = async {
        let routes = match &plan {
            Some(p) => PolicyRoutes::install(&handle, p)
                .await
                .context("installing policy routing (--no-policy-routing to do without)")?,
            None => PolicyRoutes::default(),
        };
        let watched = [
            health::Nic {
                name: int.name.clone(),
                index: int.index,
                xdp_prog_id: dp.program_id(PROG_XDP_INT)?,
                tc_prog_id: dp.program_id(PROG_TC_INT)?,
            },
            health::Nic {
                name: ext.name.clone(),
                index: ext.index,
                xdp_prog_id: dp.program_id(PROG_XDP_EXT)?,
                tc_prog_id: dp.program_id(PROG_TC_EXT)?,
            },
        ];
        let probe = match args.probe_port {
            0 => None,
            port => Some(Probe::new(port)?),
        };
        let http = match args.health_port {
            Some(port) => Some(health::http_listener(port).await?),
            None => None,
        };
        let leave_notices = match &args.scheduled_events {
            Some(url) => {
                let imds = Imds::new(url)?;
                let vm = imds
                    .vm_name()
                    .await
                    .context("--scheduled-events needs the instance metadata service")?;
                info!(vm = %vm, url = %url, "watching scheduled events");
                let (tx, rx) = tokio::sync::watch::channel(None);
                Some((imds.clone(), rx, tokio::spawn(watch_events(imds, vm, tx))))
            }
            None => None,
        };
        let (failed_tx, failed_rx) = tokio::sync::oneshot::channel();
        let sweeper = conntrack::SweeperThread::spawn(
            conntrack::Sweeper::new(
                timeouts,
                args.port_hold * SEC,
                args.max_flows,
                Duration::from_secs(args.sweep_interval),
            ),
            CtMaps::from_pins(&pins).context("opening the conntrack maps for the sweeper")?,
            dataplane::pinned_map(&pins, MAP_STATS)
                .context("opening the counters for the sweeper")?,
            failed_tx,
        )?;
        anyhow::Ok((
            routes,
            watched,
            probe,
            http,
            (sweeper, failed_rx),
            leave_notices,
        ))
    }
    .await;
    let (mut routes, watched, mut probe, http, (mut sweeper, mut sweep_failed), mut leave_notices) =
        match ready {
            Ok(r) => r,
            Err(e) => {
                let how = if dp.adopted {
                    sysctls.keep();
                    Exit::KeepForwarding
                } else {
                    Exit::Teardown
                };
                if let Err(e2) = dp.stop(how) {
                    warn!(error = %format!("{e2:#}"), "cleaning up");
                }
                return Err(e);
            }
        };
    let mut status = health::check(&handle, &watched, &dp.stats).await;
    if let Status::Unhealthy(reason) = &status {
        warn!(%reason, "not healthy yet: the probe stays closed until it is");
    }
    if let Some(p) = &mut probe {
        p.set_open(status.is_healthy());
    }
    let (status_tx, status_rx) = tokio::sync::watch::channel(status.clone());
    let http = http.map(|l| {
        info!(port = args.health_port, "serving GET /healthz");
        tokio::spawn(health::serve_http(l, status_rx))
    });
    info!(
        ext = %ext.name, int = %int.name, snat = %snat_addr,
        ports = %format!("{port_min}-{port_max}"), low_ports = %format!("{low_port_min}-{low_port_max}"),
        filtering = ?args.filtering, max_flows = args.max_flows,
        adopted = dp.adopted, build = %build,
        "nat-loader ready"
    );

    let stats_every = Duration::from_secs(args.stats_interval.max(1));
    let mut stats_tick = tokio::time::interval(stats_every);
    let mut health_tick = tokio::time::interval(health::CHECK_INTERVAL);
    health_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut drain_until: Option<tokio::time::Instant> = None;
    // The scheduled event this instance is draining for, if any.
    let mut leaving: Option<Departure> = None;
    let (how, result) = loop {
        let signal = tokio::select! {
            _ = sigint.recv() => "SIGINT",
            _ = sigterm.recv() => "SIGTERM",
            _ = sigusr2.recv() => {
                info!("SIGUSR2: handing over; the pinned dataplane keeps forwarding");
                break (Exit::KeepForwarding, Ok(()));
            }
            _ = sleep_until(drain_until), if drain_until.is_some() => {
                match (&leaving, &leave_notices) {
                    (Some(d), Some((imds, _, _))) => match imds.approve(&d.id).await {
                        Ok(()) => info!(event = %d.id, "drain over: approved the scheduled event; shutting down"),
                        Err(e) => warn!(
                            event = %d.id, error = %format!("{e:#}"),
                            "drain over: could not approve the scheduled event (the platform goes ahead \
                             at its deadline); shutting down"
                        ),
                    },
                    _ => info!("drain over: shutting down"),
                }
                break (Exit::Teardown, Ok(()));
            }
            notice = next_notice(&mut leave_notices) => {
                match (notice, &leaving) {
                    // Draining already (a signal): the shutdown is on its way.
                    (Some(_), None) if drain_until.is_some() => {}
                    (Some(d), None) => {
                        warn!(
                            event = %d.id, kind = %d.kind, not_before = %d.not_before,
                            seconds = args.drain_seconds,
                            "scheduled event: the platform will take this VM away; draining \
                             (probe closed, forwarding goes on), then approving it"
                        );
                        if let Some(p) = &mut probe {
                            p.set_open(false);
                        }
                        status = Status::Draining;
                        status_tx.send_replace(Status::Draining);
                        drain_until = Some(tokio::time::Instant::now() + Duration::from_secs(args.drain_seconds));
                        leaving = Some(d);
                    }
                    (None, Some(d)) => {
                        // The next health check reopens the probe.
                        info!(event = %d.id, "the scheduled event was withdrawn: drain cancelled");
                        leaving = None;
                        drain_until = None;
                    }
                    _ => {}
                }
                continue;
            }
            _ = health_tick.tick() => {
                let now = if drain_until.is_some() {
                    Status::Draining
                } else {
                    // A check that hangs (netlink) is a failed check.
                    tokio::time::timeout(health::CHECK_INTERVAL * 3, health::check(&handle, &watched, &dp.stats))
                        .await
                        .unwrap_or_else(|_| Status::Unhealthy("health check timed out".into()))
                };
                if now != status {
                    match &now {
                        Status::Healthy => {
                            // Routes through a NIC die with it when it goes
                            // down; put ours back before saying healthy.
                            match routes.restore(&handle).await {
                                Ok(0) => {}
                                Ok(n) => info!(count = n, "restored policy routes"),
                                Err(e) => warn!(error = %format!("{e:#}"), "restoring policy routes"),
                            }
                            info!("healthy");
                        }
                        Status::Unhealthy(reason) => warn!(%reason, "unhealthy: probe closed"),
                        Status::Draining => {}
                    }
                    if let Some(p) = &mut probe {
                        p.set_open(now.is_healthy());
                    }
                    status = now;
                    status_tx.send_replace(status.clone());
                }
                continue;
            }
            failed = &mut sweep_failed => {
                // A failing control plane is not a failing dataplane: leave
                // it forwarding for the restarted loader.
                let e = failed.unwrap_or_else(|_| anyhow::anyhow!("the sweeper thread died"));
                break (Exit::KeepForwarding, Err(e.context("sweeping conntrack")));
            }
            _ = stats_tick.tick(), if args.stats_interval > 0 => {
                log_stats(&dp, args.show_flows);
                continue;
            }
            conn = accept(&probe), if probe.as_ref().is_some_and(Probe::is_open) => {
                // Accepting is the answer; nothing is read or written.
                if let Err(e) = conn {
                    warn!(error = %e, "accepting a health probe");
                }
                continue;
            }
        };
        // SIGTERM or SIGINT.
        if drain_until.is_some() || args.drain_seconds == 0 {
            info!("{signal}: shutting down now");
            break (Exit::Teardown, Ok(()));
        }
        // Probes fail at once; forwarding goes on while the load balancer
        // moves new flows elsewhere and established ones finish.
        if let Some(p) = &mut probe {
            p.set_open(false);
        }
        status = Status::Draining;
        status_tx.send_replace(Status::Draining);
        drain_until = Some(tokio::time::Instant::now() + Duration::from_secs(args.drain_seconds));
        info!(
            seconds = args.drain_seconds,
            "{signal}: draining: probe closed, forwarding goes on (signal again to stop now)"
        );
    };
    // A pass under way would only find the maps going away.
    sweeper.stop(Duration::from_secs(2));
    if let Some((_, _, watcher)) = leave_notices {
        watcher.abort();
    }
    // Probes fail before the programs go.
    drop(probe);
    if let Some(h) = http {
        h.abort();
    }
    log_stats(&dp, args.show_flows);
    match how {
        Exit::Teardown => {
            dp.stop(Exit::Teardown)?;
            if let Err(e) = routes.remove(&handle).await {
                warn!(error = %format!("{e:#}"), "policy routing cleanup");
            }
            drop(sysctls);
            info!("nat-loader stopped; everything it added is removed");
        }
        Exit::KeepForwarding => {
            dp.stop(Exit::KeepForwarding)?;
            // The next loader adds the same rules ("exists" is fine) and
            // owns them from then on.
            routes.keep();
            sysctls.keep();
            info!(
                pins = %args.bpffs_dir.display(),
                "nat-loader exited; the dataplane keeps forwarding until a loader adopts it \
                 (or `nat-loader teardown` removes it)"
            );
        }
    }
    result?;
    Ok(match how {
        Exit::Teardown => ExitCode::SUCCESS,
        Exit::KeepForwarding => ExitCode::from(EXIT_HANDOVER),
    })
}

/// A fresh start must not trip over leftovers that are not a dataplane:
/// links or counters pinned without conntrack maps are stale and removed
/// (the loader would otherwise reuse a counters map whatever its layout).
fn prepare_fresh(pins: &PinDir) -> Result<()> {
    let stale: Vec<&str> = pins::LINKS
        .iter()
        .copied()
        .chain([nat_common::MAP_STATS])
        .filter(|p| pins.pin(p).exists())
        .collect();
    if !stale.is_empty() {
        warn!(pins = ?stale, "pins without conntrack maps; removing them");
        for p in stale {
            pins.remove_pin(p)?;
        }
    }
    Ok(())
}

async fn accept(p: &Option<Probe>) -> std::io::Result<()> {
    match p {
        Some(p) => p.accept().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

fn log_stats(dp: &Dataplane, show_flows: usize) {
    match Stats::read(&dp.stats) {
        Ok(s) => {
            for line in s.lines() {
                info!("stats {line}");
            }
        }
        Err(e) => warn!(error = %format!("{e:#}"), "reading stats"),
    }
    if show_flows > 0 {
        let flows = conntrack::flows(&dp.maps.sessions, monotonic_ns());
        info!(count = flows.len(), "flows");
        for f in flows.iter().take(show_flows) {
            info!("flow {f}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_range_accepts_min_max() {
        assert_eq!(port_range("1024-65535"), Ok((1024, 65535)));
        assert_eq!(port_range("5000-5000"), Ok((5000, 5000)));
    }

    #[test]
    fn flags_alone_still_run_the_gateway() {
        let a = Args::try_parse_from(["nat-loader", "--ext", "eth0", "--int", "eth1"])
            .expect("today's invocation");
        assert!(a.command.is_none());
        assert_eq!(
            (a.ext.as_deref(), a.int.as_deref()),
            (Some("eth0"), Some("eth1"))
        );
        assert_eq!(a.bpffs_dir, PathBuf::from(pins::DEFAULT_DIR));
        assert!(Args::try_parse_from(["nat-loader", "--int", "eth1"]).is_err());
    }

    #[test]
    fn scheduled_events_is_off_alone_means_the_metadata_service_and_takes_an_http_url() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["nat-loader", "--ext", "eth0", "--int", "eth1"];
            argv.extend_from_slice(extra);
            Args::try_parse_from(argv).map(|a| a.scheduled_events)
        };
        assert_eq!(parse(&[]).expect("no flag"), None);
        assert_eq!(
            parse(&["--scheduled-events", "--probe-port", "9999"]).expect("alone"),
            Some(events::DEFAULT_URL.to_string())
        );
        assert_eq!(
            parse(&["--scheduled-events", "http://127.0.0.1:8080/se"]).expect("url"),
            Some("http://127.0.0.1:8080/se".to_string())
        );
        let err = parse(&["--scheduled-events", "https://169.254.169.254/x"])
            .expect_err("https refused")
            .to_string();
        assert!(err.contains("only http://"), "{err}");
    }

    #[test]
    fn teardown_is_a_subcommand_with_its_own_flags() {
        let a = Args::try_parse_from([
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
        assert!(Args::try_parse_from(["nat-loader", "teardown", "--ext", "eth0"]).is_err());
        assert!(
            Args::try_parse_from([
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
    fn mss_clamp_accepts_off_and_real_sizes_only() {
        assert_eq!(parse_mss_clamp("0"), Ok(0));
        assert_eq!(parse_mss_clamp("1200"), Ok(1200));
        assert!(parse_mss_clamp("40").is_err());
        assert!(parse_mss_clamp("70000").is_err());
        assert!(parse_mss_clamp("big").is_err());
    }

    #[test]
    fn port_range_rejects_reversed_zero_and_garbage() {
        assert!(port_range("2000-1000").is_err());
        assert!(port_range("0-100").is_err());
        assert!(port_range("1024").is_err());
        assert!(port_range("a-b").is_err());
        assert!(port_range("1-70000").is_err());
    }
}

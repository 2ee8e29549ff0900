//! `nat-loader`: attaches the NAT gateway's eBPF programs to the `--int` and
//! `--ext` NICs and runs its control plane in the foreground until SIGINT or
//! SIGTERM. On exit, and on any failure half-way, it removes everything it
//! added.

use std::{net::Ipv4Addr, process::ExitCode, time::Duration};

use anyhow::{Context, Result, bail};
use clap::Parser;
use nat_common::{
    CFG_F_UDP_INBOUND_REFRESH, DEFAULT_LOW_PORT_MAX, DEFAULT_LOW_PORT_MIN, DEFAULT_MAX_FLOWS,
    DEFAULT_PORT_MAX, DEFAULT_PORT_MIN, DEFAULT_PROBE_PORT, FILTER_ADDRESS,
    FILTER_ADDRESS_AND_PORT, FILTER_ENDPOINT_INDEPENDENT, PORT_HOLD_NS, timeouts::Timeouts,
};
use nat_loader::{
    caps, conntrack,
    dataplane::{Dataplane, Settings, XdpAttach},
    monotonic_ns, netif,
    stats::Stats,
    sysctl::{self, SysctlGuard},
};
use std::io::IsTerminal;
use tokio::signal::unix::{SignalKind, signal};

use tracing::{info, warn};

/// XDP/eBPF NAT gateway: source NAT from the --int NIC out of the --ext NIC.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Internet-side NIC: translated traffic leaves here.
    #[arg(long, value_name = "IFNAME")]
    ext: String,
    /// Private-side NIC: traffic to translate arrives here.
    #[arg(long, value_name = "IFNAME")]
    int: String,
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
    /// Conntrack table size, in flows.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_FLOWS)]
    max_flows: u32,
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
    /// only while the programs are attached: it opens after attaching and
    /// closes first on shutdown.
    #[arg(long, value_name = "PORT", default_value_t = DEFAULT_PROBE_PORT)]
    probe_port: u16,
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
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the chain of contexts, outermost first.
            eprintln!("nat-loader: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    // Everything that can be checked without changing the host comes first,
    // so a bad invocation leaves the host exactly as it was.
    if args.ext == args.int {
        bail!(
            "--ext and --int are the same interface ({}): the gateway needs two NICs",
            args.ext
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
    let timeouts = args.timeouts()?;
    caps::require()?;
    let handle = netif::connect()?;
    let ext = netif::lookup(&handle, &args.ext).await.context("--ext")?;
    let int = netif::lookup(&handle, &args.int).await.context("--int")?;
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
        max_flows: args.max_flows,
        xdp: args.xdp_mode,
    };

    // From here on every change is owned by a guard that undoes it on drop.
    let mut sysctls = SysctlGuard::default();
    sysctl::enable_forwarding(&mut sysctls, &ext.name, &int.name)?;
    let mut dp = Dataplane::start(&settings)?;
    let probe = match args.probe_port {
        0 => None,
        port => Some(
            tokio::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
                .await
                .with_context(|| {
                    format!("listening for health probes on TCP port {port} (--probe-port)")
                })?,
        ),
    };
    info!(
        ext = %ext.name, int = %int.name, snat = %snat_addr,
        ports = %format!("{port_min}-{port_max}"), low_ports = %format!("{low_port_min}-{low_port_max}"),
        filtering = ?args.filtering, max_flows = args.max_flows,
        "nat-loader ready"
    );

    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sweep_tick = tokio::time::interval(Duration::from_secs(args.sweep_interval));
    let stats_every = Duration::from_secs(args.stats_interval.max(1));
    let mut stats_tick = tokio::time::interval(stats_every);
    let result = loop {
        tokio::select! {
            _ = sigint.recv() => { info!("SIGINT: shutting down"); break Ok(()); }
            _ = sigterm.recv() => { info!("SIGTERM: shutting down"); break Ok(()); }
            _ = sweep_tick.tick() => {
                match conntrack::sweep(&mut dp.maps, &timeouts, args.port_hold * SEC, monotonic_ns()) {
                    Ok(s) if s.expired + s.released + s.freed + s.orphans > 0 => info!(
                        expired = s.expired, remaining = s.remaining, released = s.released,
                        freed = s.freed, orphans = s.orphans, "swept conntrack"
                    ),
                    Ok(_) => {}
                    Err(e) => break Err(e.context("sweeping conntrack")),
                }
            }
            _ = stats_tick.tick(), if args.stats_interval > 0 => log_stats(&dp, args.show_flows),
            conn = accept(&probe), if probe.is_some() => {
                // Accepting is the answer; nothing is read or written.
                if let Err(e) = conn {
                    warn!(error = %e, "accepting a health probe");
                }
            }
        }
    };
    // Probes fail before the programs go.
    drop(probe);
    log_stats(&dp, args.show_flows);
    dp.stop();
    drop(sysctls);
    info!("nat-loader stopped; everything it added is removed");
    result
}

async fn accept(l: &Option<tokio::net::TcpListener>) -> std::io::Result<()> {
    match l {
        Some(l) => l.accept().await.map(drop),
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
    fn port_range_rejects_reversed_zero_and_garbage() {
        assert!(port_range("2000-1000").is_err());
        assert!(port_range("0-100").is_err());
        assert!(port_range("1024").is_err());
        assert!(port_range("a-b").is_err());
        assert!(port_range("1-70000").is_err());
    }
}

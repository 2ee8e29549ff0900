//! `nat-loader`: attaches the NAT gateway's eBPF programs to the `--int` and
//! `--ext` NICs and runs its control plane in the foreground until SIGINT or
//! SIGTERM. On exit, and on any failure half-way, it removes everything it
//! added.

use std::{net::Ipv4Addr, process::ExitCode, time::Duration};

use anyhow::{Context, Result, bail};
use clap::Parser;
use nat_common::{
    DEFAULT_MAX_FLOWS, DEFAULT_PORT_MAX, DEFAULT_PORT_MIN, DEFAULT_PROBE_PORT, timeouts::Timeouts,
};
use nat_common::{PROG_TC_EXT, PROG_TC_INT, PROG_XDP_EXT, PROG_XDP_INT};
use nat_loader::{
    caps, conntrack,
    dataplane::{Dataplane, Settings, XdpAttach},
    health::{self, Probe, Status},
    monotonic_ns, netif,
    routing::{self, Cidr, NicPolicy, Plan, PolicyRoutes},
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
    /// External ports (and ICMP identifiers) to translate to, inclusive.
    #[arg(long, value_name = "MIN-MAX", default_value_t = format!("{DEFAULT_PORT_MIN}-{DEFAULT_PORT_MAX}"), value_parser = parse_port_range)]
    port_range: String,
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
    let settings = Settings {
        ext: ext.name.clone(),
        ext_index: ext.index,
        int: int.name.clone(),
        int_index: int.index,
        snat_addr,
        port_min,
        port_max,
        max_flows: args.max_flows,
        xdp: args.xdp_mode,
    };

    // From here on every change is owned by a guard that undoes it on drop.
    let mut sysctls = SysctlGuard::default();
    sysctl::enable_forwarding(&mut sysctls, &ext.name, &int.name)?;
    let mut routes = match &plan {
        Some(p) => PolicyRoutes::install(&handle, p)
            .await
            .context("installing policy routing (--no-policy-routing to do without)")?,
        None => PolicyRoutes::default(),
    };
    let mut dp = Dataplane::start(&settings)?;
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
    let mut probe = match args.probe_port {
        0 => None,
        port => Some(Probe::new(port)?),
    };
    let mut status = health::check(&handle, &watched, &dp.stats).await;
    if let Status::Unhealthy(reason) = &status {
        warn!(%reason, "not healthy yet: the probe stays closed until it is");
    }
    if let Some(p) = &mut probe {
        p.set_open(status.is_healthy());
    }
    let (status_tx, status_rx) = tokio::sync::watch::channel(status.clone());
    let http = match args.health_port {
        Some(port) => {
            let l = health::http_listener(port).await?;
            info!(port, "serving GET /healthz");
            Some(tokio::spawn(health::serve_http(l, status_rx)))
        }
        None => None,
    };
    info!(
        ext = %ext.name, int = %int.name, snat = %snat_addr,
        ports = %format!("{port_min}-{port_max}"), max_flows = args.max_flows,
        "nat-loader ready"
    );

    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sweep_tick = tokio::time::interval(Duration::from_secs(args.sweep_interval));
    let stats_every = Duration::from_secs(args.stats_interval.max(1));
    let mut stats_tick = tokio::time::interval(stats_every);
    let mut health_tick = tokio::time::interval(health::CHECK_INTERVAL);
    health_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut drain_until: Option<tokio::time::Instant> = None;
    let result = loop {
        let signal = tokio::select! {
            _ = sigint.recv() => "SIGINT",
            _ = sigterm.recv() => "SIGTERM",
            _ = sleep_until(drain_until), if drain_until.is_some() => {
                info!("drain over: shutting down");
                break Ok(());
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
            _ = sweep_tick.tick() => {
                match conntrack::sweep(&mut dp.ct_fwd, &mut dp.ct_rev, &timeouts, monotonic_ns()) {
                    Ok(s) if s.expired + s.orphans > 0 => info!(expired = s.expired, orphans = s.orphans, remaining = s.remaining, "swept conntrack"),
                    Ok(_) => {}
                    Err(e) => break Err(e.context("sweeping conntrack")),
                }
                continue;
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
        // A signal.
        if drain_until.is_some() || args.drain_seconds == 0 {
            info!("{signal}: shutting down now");
            break Ok(());
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
    // Probes fail before the programs go.
    drop(probe);
    if let Some(h) = http {
        h.abort();
    }
    log_stats(&dp, args.show_flows);
    dp.stop();
    if let Err(e) = routes.remove(&handle).await {
        warn!(error = %format!("{e:#}"), "policy routing cleanup");
    }
    drop(routes);
    drop(sysctls);
    info!("nat-loader stopped; everything it added is removed");
    result
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
        let flows = conntrack::flows(&dp.ct_fwd, monotonic_ns());
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

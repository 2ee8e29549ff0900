//! Starting a gateway, in three steps, each undone as far as it must be
//! when a later one fails:
//! 1. [`Host::resolve`]: the interfaces, the SNAT address and the gateways
//!    of the host, changing nothing;
//! 2. [`Attached::attach`]: the pin directory, the forwarding sysctls and
//!    the dataplane (fresh, or adopted from an earlier loader);
//! 3. [`Services::start`]: policy routing, the health probes, the
//!    Scheduled Events watch, the conntrack sweeper and the stats log.

use std::net::Ipv4Addr;

use anyhow::{Context, Result, bail};
use std::sync::Arc;

use nat_common::{
    CFG_F_ANTI_SPOOFING, CFG_F_UDP_INBOUND_REFRESH, MAP_STATS, NatConfig, PROG_TC_EXT, PROG_TC_INT,
    PROG_XDP_EXT, PROG_XDP_INT,
};
use nat_loader::{
    build_id,
    conntrack::{self, SweeperThread},
    dataplane::{self, CtMaps, Dataplane, Exit, Settings, XdpAttach},
    egress::{self, XdpRun},
    events, health,
    health::{Health, Probe, Status},
    metrics, monotonic_ns,
    netif::{self, NetIf},
    pins::{self, DirLock, PinDir},
    routing::{self, NicPolicy, Plan, PolicyRoutes},
    sysctl::{self, SysctlGuard},
    tables, translog,
    xdp_features::Netdev,
};
use rtnetlink::Handle;
use tokio::{
    net::TcpListener,
    sync::{oneshot, watch},
};
use tracing::{info, warn};

use crate::{
    config::Config,
    report::{Reporter, ReporterThread},
    values::SnatPool,
};

/// What the host says about the configured interfaces.
pub struct Host {
    pub ext: NetIf,
    pub int: NetIf,
    /// The SNAT pool's addresses (`--snat-ip`, resolved).
    pub pool: Vec<Ipv4Addr>,
    /// Source of the out-of-ports ICMP errors (RFC 5508 REQ-8: the address
    /// the inside hosts know the gateway by).
    pub int_addr: Option<Ipv4Addr>,
    /// `--int`'s subnets (address, prefix length): inside sources.
    pub int_nets: Vec<(Ipv4Addr, u8)>,
    /// `None`: no policy routing.
    pub plan: Option<Plan>,
    /// What each NIC can take from XDP (`xdp-features`) at start.
    pub int_xdp_features: u64,
    pub ext_xdp_features: u64,
}

impl Host {
    pub async fn resolve(handle: &Handle, config: &Config) -> Result<Host> {
        let ext = netif::lookup(handle, &config.ext).await.context("--ext")?;
        let int = netif::lookup(handle, &config.int).await.context("--int")?;
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
        let pool = match &config.snat_ip {
            Some(SnatPool::Addrs(addrs)) => {
                for a in addrs.iter().filter(|a| !ext.ipv4.contains(a)) {
                    warn!(snat_ip = %a, interface = %ext.name, "SNAT address is not configured on --ext; replies must be routed to it");
                }
                addrs.clone()
            }
            Some(SnatPool::Auto) => {
                if ext.ipv4.is_empty() {
                    bail!(
                        "--snat-ip auto: --ext {} has no IPv4 address (configure one or give \
                         --snat-ip addresses)",
                        ext.name
                    );
                }
                let mut all = ext.ipv4.clone();
                all.truncate(nat_common::POOL_MAX as usize);
                all
            }
            None => vec![*ext.ipv4.first().with_context(|| {
                format!(
                    "--ext {} has no IPv4 address to use as the SNAT address (configure one or give --snat-ip)",
                    ext.name
                )
            })?],
        };
        let plan = match &config.routing {
            Some(r) => Some(plan(handle, r, &int, &ext).await?),
            None => None,
        };
        let int_addr = int.ipv4.first().copied();
        let int_nets = netif::addresses(handle, int.index)
            .await
            .context("--int's subnets")?;
        if int_addr.is_none() {
            warn!(interface = %int.name,
                "--int has no IPv4 address: new flows that find no free port are dropped without an ICMP error");
        }
        let mut netdev = Netdev::open().context("reading what the NICs can take from XDP")?;
        let int_xdp_features = netdev.xdp_features(int.index).context("--int")?;
        let ext_xdp_features = netdev.xdp_features(ext.index).context("--ext")?;
        Ok(Host {
            ext,
            int,
            pool,
            int_addr,
            int_nets,
            plan,
            int_xdp_features,
            ext_xdp_features,
        })
    }

    /// The SNAT addresses that must stay configured on `--ext` while the
    /// gateway runs: those that were at start.
    pub fn snat_on_ext(&self) -> Vec<Ipv4Addr> {
        self.pool
            .iter()
            .copied()
            .filter(|a| self.ext.ipv4.contains(a))
            .collect()
    }

    /// What the dataplane's programs are given.
    pub fn settings(&self, config: &Config) -> Settings {
        let mut flags = if config.udp_inbound_refresh {
            CFG_F_UDP_INBOUND_REFRESH
        } else {
            0
        };
        if config.anti_spoofing {
            flags |= CFG_F_ANTI_SPOOFING;
        }
        if config.translation_log.is_some() {
            flags |= nat_common::CFG_F_TRANSLOG;
        }
        // The pool is in maps; the config's address is the first, for the
        // logs.
        let first = self.pool.first().copied().unwrap_or(Ipv4Addr::UNSPECIFIED);
        let nat = NatConfig::new(self.int.index, self.ext.index, first)
            .with_ports(config.ports.min, config.ports.max)
            .with_low_ports(config.low_ports.min, config.low_ports.max)
            .with_filtering(config.filtering.code())
            .with_flags(flags)
            .with_probe_port(config.probe_port)
            .with_macs(
                self.int.mac.unwrap_or_default(),
                self.ext.mac.unwrap_or_default(),
            )
            .with_int_addr(self.int_addr)
            .with_mss_clamp(config.mss_clamp);
        // Until the first health check sees how XDP was really attached.
        let run = match config.xdp {
            XdpAttach::Generic => XdpRun::Generic,
            XdpAttach::Native | XdpAttach::Auto => XdpRun::Native,
        };
        Settings {
            ext: self.ext.name.clone(),
            int: self.int.name.clone(),
            nat,
            pool: self.pool.clone(),
            max_flows: config.max_flows,
            max_fragments: config.max_fragments,
            xdp: config.xdp,
            // The program on --int forwards to --ext, and back.
            xdp_egress: [
                egress::decide(run, self.ext_xdp_features),
                egress::decide(run, self.int_xdp_features),
            ],
            policy: config.policy.clone(),
            inside_nets: self.inside_nets(config),
        }
    }

    /// Where new flows' sources may be (anti-spoofing): `--int`'s subnets
    /// and the `--internal-cidr`s.
    pub fn inside_nets(&self, config: &Config) -> Vec<(Ipv4Addr, u8)> {
        let cidrs = config
            .routing
            .iter()
            .flat_map(|r| r.internal_cidrs.iter().map(|c| (c.addr, c.len)));
        self.int_nets.iter().copied().chain(cidrs).collect()
    }
}

async fn plan(
    handle: &Handle,
    r: &crate::config::Routing,
    int: &NetIf,
    ext: &NetIf,
) -> Result<Plan> {
    let int_gw = match r.int_gateway {
        Some(g) => Some(g),
        None => routing::discover_gateway(handle, int.index).await?,
    };
    let ext_gw = match r.ext_gateway {
        Some(g) => Some(g),
        None => routing::discover_gateway(handle, ext.index).await?,
    };
    if !r.internal_cidrs.is_empty() && int_gw.is_none() {
        bail!(
            "--internal-cidr: no gateway of --int {} found (no default route through it): give --int-gateway",
            int.name
        );
    }
    Ok(Plan {
        int: NicPolicy {
            name: int.name.clone(),
            index: int.index,
            table: r.int_table,
            gateway: int_gw,
        },
        ext: NicPolicy {
            name: ext.name.clone(),
            index: ext.index,
            table: r.ext_table,
            gateway: ext_gw,
        },
        internal_cidrs: r.internal_cidrs.clone(),
    })
}

/// The attached dataplane and what it holds on the host.
pub struct Attached {
    pub pins: PinDir,
    _lock: DirLock,
    pub sysctls: SysctlGuard,
    pub dp: Dataplane,
}

impl Attached {
    /// Locks the pin directory and attaches: a fresh start that fails
    /// removes what it created; a failed adoption leaves the earlier
    /// dataplane forwarding, with the sysctls it needs.
    pub fn attach(config: &Config, host: &Host) -> Result<Attached> {
        let pins = PinDir::new(&config.bpffs_dir);
        let created = !pins.exists();
        pins.prepare()?;
        let lock = match pins.lock() {
            Ok(l) => l,
            Err(e) => {
                if created {
                    let _ = std::fs::remove_dir(pins.path());
                }
                return Err(e);
            }
        };
        let adopting = pins.has_maps();
        let estimate = tables::estimate(
            config.max_flows,
            config.max_fragments,
            config.filtering.code(),
            tables::possible_cpus(),
        );
        info!(
            "map memory: {}",
            tables::describe(&estimate, config.max_flows)
        );
        if adopting {
            // Refuse an incompatible dataplane before touching anything.
            pins.check_maps(config.max_flows, config.filtering.code())?;
        } else if let Err(e) = tables::mem_available()
            .and_then(|avail| tables::check(&estimate, config.max_flows, avail))
        {
            if created {
                let _ = std::fs::remove_dir(pins.path());
            }
            return Err(e);
        } else if let Err(e) = prepare_fresh(&pins) {
            // The pin directory may be ours alone: remove it again.
            let _ = pins.remove_all();
            return Err(e);
        }
        let mut sysctls = SysctlGuard::default();
        let started = (|| -> Result<Dataplane> {
            // Record the originals before changing anything, keeping an
            // earlier loader's record (its "before" is the true one).
            let keys = sysctl::forwarding_keys(&host.ext.name, &host.int.name);
            let record = sysctl::complete_record(pins.sysctl_record()?, &keys)?;
            pins.write_sysctl_record(&record)?;
            sysctl::enable_forwarding(&mut sysctls, &host.ext.name, &host.int.name)?;
            sysctls.restore_to(&record);
            Dataplane::start(&host.settings(config), &pins)
        })();
        match started {
            Ok(dp) => Ok(Attached {
                pins,
                _lock: lock,
                sysctls,
                dp,
            }),
            Err(e) => {
                if adopting {
                    // The earlier dataplane keeps forwarding; leave it and
                    // the sysctls it needs for the next attempt or
                    // `teardown`.
                    sysctls.keep();
                } else {
                    let _ = pins.remove_all();
                }
                Err(e)
            }
        }
    }

    /// After an adoption: how many flows came along, and whether some use
    /// another SNAT address or port range than this configuration.
    pub fn report_adoption(&self, config: &Config, host: &Host) {
        if !self.dp.adopted {
            return;
        }
        let flows = match self
            .dp
            .maps
            .pool_slots()
            .and_then(|pool| conntrack::flows(&self.dp.maps.sessions, &pool, monotonic_ns()))
        {
            Ok(f) => f,
            Err(e) => {
                warn!(error = %format!("{e:#}"), "reading the adopted flows");
                return;
            }
        };
        let foreign = flows
            .iter()
            .filter(|f| {
                let p = f.external.port();
                !host.pool.contains(f.external.ip())
                    || !(config.ports.contains(p) || config.low_ports.contains(p))
            })
            .count();
        info!(
            flows = flows.len(),
            "adopted the pinned dataplane and its flows"
        );
        if foreign > 0 {
            warn!(
                flows = foreign,
                pool = ?host.pool, ports = %config.ports,
                "adopted flows use another SNAT address (draining) or port range than these \
                 flags; they keep their mapping until they expire"
            );
        }
    }

    /// A failure after attaching: a fresh dataplane is removed, an adopted
    /// one left forwarding. Returns `e`.
    pub fn abandon(self, e: anyhow::Error) -> anyhow::Error {
        let how = if self.dp.adopted {
            self.sysctls.keep();
            Exit::KeepForwarding
        } else {
            Exit::Teardown
        };
        if let Err(e2) = self.dp.stop(how) {
            warn!(error = %format!("{e2:#}"), "cleaning up");
        }
        e
    }
}

/// A fresh start must not trip over leftovers that are not a dataplane:
/// links or counters pinned without conntrack maps are stale and removed
/// (the loader would otherwise reuse a counters map whatever its layout).
fn prepare_fresh(pins: &PinDir) -> Result<()> {
    let stale: Vec<&str> = pins::LINKS
        .iter()
        .copied()
        .chain([MAP_STATS])
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

/// What runs beside the dataplane.
pub struct Services {
    pub routes: PolicyRoutes,
    pub health: Health,
    pub probe: Option<Probe>,
    pub http: Option<TcpListener>,
    pub events: Option<events::Watch>,
    pub sweeper: SweeperThread,
    /// Fires if the sweeper fails.
    pub sweep_failed: oneshot::Receiver<anyhow::Error>,
    pub reporter: ReporterThread,
    /// The health verdict, for `/healthz` and the metrics.
    pub status_tx: watch::Sender<Status>,
    /// `--metrics-listen`: the socket and what a scrape reads.
    pub metrics: Option<(TcpListener, Arc<metrics::Sources>)>,
    /// `--translation-log`.
    pub translog: Option<translog::TranslogThread>,
}

impl Services {
    /// A failure here is a bad invocation (a port in use, a route
    /// refused): what was started so far stops again on drop.
    pub async fn start(
        config: &Config,
        host: &Host,
        handle: &Handle,
        attached: &mut Attached,
    ) -> Result<Services> {
        let (translog, binding_log) = match &config.translation_log {
            Some(path) => {
                let (tx, rx) = translog::channel();
                let ring = nat_loader::take_map(attached.dp.ebpf_mut(), nat_common::MAP_TRANSLOG)
                    .context("the translation log's ring buffer")?;
                let t = translog::TranslogThread::spawn(
                    path,
                    ring,
                    rx,
                    dataplane::pinned_map(&attached.pins, MAP_STATS)
                        .context("opening the counters for the translation log")?,
                )?;
                info!(path = %path.display(), "writing the translation log");
                (Some(t), Some(tx))
            }
            None => (None, None),
        };
        let dp = &attached.dp;
        let routes = match &host.plan {
            Some(p) => PolicyRoutes::install(handle, p)
                .await
                .context("installing policy routing (--no-policy-routing to do without)")?,
            None => PolicyRoutes::default(),
        };
        let modes = Arc::new(egress::Modes::new(host.settings(config).xdp_egress));
        let health = Health::new(
            health::Nic {
                name: host.int.name.clone(),
                index: host.int.index,
                xdp_prog_id: dp.program_id(PROG_XDP_INT)?,
                tc_prog_id: dp.program_id(PROG_TC_INT)?,
            },
            health::Nic {
                name: host.ext.name.clone(),
                index: host.ext.index,
                xdp_prog_id: dp.program_id(PROG_XDP_EXT)?,
                tc_prog_id: dp.program_id(PROG_TC_EXT)?,
            },
            host.snat_on_ext(),
            Arc::clone(&modes),
        )
        .context("starting the health check")?
        .following(match config.snat_ip {
            Some(SnatPool::Auto) => Some(health::Follow::All),
            Some(SnatPool::Addrs(_)) | None => None,
        });
        let probe = match config.probe_port {
            0 => None,
            port => Some(Probe::new(port)?),
        };
        let http = match config.health_port {
            Some(port) => Some(health::http_listener(port).await?),
            None => None,
        };
        let events = match &config.scheduled_events {
            Some(se) => Some(
                events::Watch::start(se.url())
                    .await
                    .context("--scheduled-events needs the instance metadata service")?,
            ),
            None => None,
        };
        let pins = &attached.pins;
        let (status_tx, status_rx) = watch::channel(Status::Unhealthy("starting".into()));
        let published = Arc::new(nat_loader::summary::Published::default());
        let metrics = match config.metrics_listen {
            Some(addr) => {
                let listener = metrics::listener(
                    addr,
                    &host.int.name,
                    &host.ext.ipv4,
                    config.metrics_allow_ext,
                )?;
                let ports = |r: &crate::values::PortRange| u64::from(r.max - r.min) + 1;
                let sources = metrics::Sources {
                    stats: dataplane::pinned_map(pins, MAP_STATS)
                        .context("opening the counters for the metrics")?,
                    traffic: dataplane::pinned_map(pins, nat_common::MAP_TRAFFIC)
                        .context("opening the traffic counters for the metrics")?,
                    published: Arc::clone(&published),
                    status: status_rx,
                    modes: Arc::clone(&modes),
                    adopted: dp.adopted,
                    max_flows: config.max_flows,
                    snat: host
                        .pool
                        .iter()
                        .map(|a| (*a, ports(&config.ports), ports(&config.low_ports)))
                        .collect(),
                    nics: (host.int.name.clone(), host.ext.name.clone()),
                    version: env!("CARGO_PKG_VERSION"),
                    build: build_id::current(),
                };
                Some((listener, Arc::new(sources)))
            }
            None => None,
        };
        let (failed_tx, sweep_failed) = oneshot::channel();
        let sweeper = SweeperThread::spawn(
            conntrack::Sweeper::new(
                config.timeouts,
                config.port_hold.as_nanos() as u64,
                config.max_flows,
                config.sweep_interval,
            )
            .publish_to(published)
            .log_bindings_to(binding_log),
            CtMaps::from_pins(pins).context("opening the conntrack maps for the sweeper")?,
            dataplane::pinned_map(pins, MAP_STATS)
                .context("opening the counters for the sweeper")?,
            failed_tx,
        )?;
        let reporter = ReporterThread::spawn(
            Reporter::open(
                pins,
                config.show_flows,
                config.ports.size() + config.low_ports.size(),
                modes,
            )?,
            config.stats_interval,
        )?;
        Ok(Services {
            routes,
            health,
            probe,
            http,
            events,
            sweeper,
            sweep_failed,
            reporter,
            status_tx,
            metrics,
            translog,
        })
    }
}

//! A gateway run: start (setup.rs), then a loop that answers signals,
//! health checks, probe connections and Scheduled Events until it is time
//! to go, then shut down: remove everything (SIGTERM, SIGINT, after the
//! drain) or leave the pinned dataplane forwarding (SIGUSR2, a failing
//! sweeper). SIGHUP reloads the egress policy.

use std::{ops::ControlFlow, process::ExitCode, time::Duration};

use anyhow::{Context, Result};
use nat_loader::{
    build_id, caps,
    dataplane::Exit,
    events::{self, Departure},
    health::{self, Probe, Status},
    metrics, netif,
};
use rtnetlink::Handle;
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    sync::watch,
    task::JoinHandle,
    time::Instant,
};
use tracing::{info, warn};

use crate::{
    config::{Config, Reload},
    setup::{Attached, Host, Services},
};

/// Exit status of a SIGUSR2 handover: the dataplane is left pinned and
/// forwarding. systemd restarts the service on it (RestartForceExitStatus).
const EXIT_HANDOVER: u8 = 75;

/// How the run ends: how the dataplane is left, and whether with an error.
type End = (Exit, Result<()>);

pub async fn run(config: Config, reload: Reload) -> Result<ExitCode> {
    // Caught from the very start: a SIGTERM while the dataplane is being
    // set up (or the moment the ready line is out, before the loop runs)
    // would otherwise kill the process by default, leaving programs, rules
    // and routes behind. Pending signals are acted on by the loop.
    let mut signals = Signals::install()?;
    for w in config.warnings() {
        warn!("{w}");
    }
    // A loader built without the programs stops before it changes anything.
    nat_loader::ebpf_object()?;
    caps::require()?;
    let handle = netif::connect()?;
    let host = Host::resolve(&handle, &config).await?;
    let build = build_id::current();
    info!(build = %build, version = env!("CARGO_PKG_VERSION"), pins = %config.bpffs_dir.display(), "nat-loader starting");
    // From here on every change is owned by a guard that undoes it.
    let mut attached = Attached::attach(&config, &host)?;
    attached.report_adoption(&config, &host);
    let services = match Services::start(&config, &host, &handle, &mut attached).await {
        Ok(s) => s,
        Err(e) => return Err(attached.abandon(e)),
    };
    let mut gw = Gateway::new(config, handle, attached, services, reload).await;
    info!(
        ext = %host.ext.name, int = %host.int.name, snat = ?host.pool,
        ports = %gw.config.ports, low_ports = %gw.config.low_ports,
        filtering = ?gw.config.filtering, max_flows = gw.config.max_flows,
        adopted = gw.attached.dp.adopted, build = %build,
        "nat-loader ready"
    );
    let (how, result) = gw.serve(&mut signals).await;
    gw.shutdown(how).await?;
    result?;
    Ok(match how {
        Exit::Teardown => ExitCode::SUCCESS,
        Exit::KeepForwarding => ExitCode::from(EXIT_HANDOVER),
    })
}

struct Signals {
    int: Signal,
    term: Signal,
    usr2: Signal,
    hup: Signal,
    usr1: Signal,
}

impl Signals {
    fn install() -> Result<Signals> {
        Ok(Signals {
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            usr2: signal(SignalKind::user_defined2()).context("installing the SIGUSR2 handler")?,
            hup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
            usr1: signal(SignalKind::user_defined1()).context("installing the SIGUSR1 handler")?,
        })
    }
}

/// Whether the gateway is on its way out while still forwarding: the probe
/// is closed so the load balancer moves new flows away, and established
/// ones get until the deadline to finish.
enum Drain {
    Off,
    /// For a SIGTERM or SIGINT: shut down at the deadline.
    Signal {
        until: Instant,
    },
    /// For a scheduled event: approve it at the deadline, then shut down.
    /// Cancelled if the event is withdrawn.
    Event {
        until: Instant,
        event: Departure,
    },
}

impl Drain {
    fn until(&self) -> Option<Instant> {
        match self {
            Drain::Off => None,
            Drain::Signal { until } | Drain::Event { until, .. } => Some(*until),
        }
    }
}

/// What woke the loop.
enum Event {
    /// SIGTERM or SIGINT.
    Stop(&'static str),
    /// SIGUSR2.
    Handover,
    /// SIGHUP: read the egress policy again; SIGUSR1 (`nat-loader policy
    /// apply --recheck`): and end the established flows it denies.
    Reload {
        recheck: bool,
    },
    DrainOver,
    /// The event that takes this VM away changed (`None`: withdrawn).
    Notice(Option<Departure>),
    HealthCheck,
    SweepFailed(anyhow::Error),
    ProbeAccepted(std::io::Result<()>),
}

/// The running gateway.
struct Gateway {
    config: Config,
    handle: Handle,
    attached: Attached,
    services: Services,
    http: Option<JoinHandle<()>>,
    metrics: Option<JoinHandle<()>>,
    status: Status,
    status_tx: watch::Sender<Status>,
    drain: Drain,
    /// How to read the configuration again (SIGHUP).
    reload: Reload,
}

impl Gateway {
    /// Checks health once, opens the probe if healthy and starts serving
    /// `/healthz`.
    async fn new(
        config: Config,
        handle: Handle,
        mut attached: Attached,
        mut services: Services,
        reload: Reload,
    ) -> Gateway {
        let status = services.health.check(&handle, &mut attached.dp).await;
        if let Status::Unhealthy(reason) = &status {
            warn!(%reason, "not healthy yet: the probe stays closed until it is");
        }
        if let Some(p) = &mut services.probe {
            p.set_open(status.is_healthy());
        }
        let status_tx = services.status_tx.clone();
        status_tx.send_replace(status.clone());
        let status_rx = status_tx.subscribe();
        let http = services.http.take().map(|l| {
            info!(port = config.health_port, "serving GET /healthz");
            tokio::spawn(health::serve_http(l, status_rx))
        });
        let metrics = services.metrics.take().map(|(l, sources)| {
            info!(listen = ?config.metrics_listen, "serving GET /metrics");
            tokio::spawn(metrics::serve(l, sources))
        });
        Gateway {
            config,
            handle,
            attached,
            services,
            http,
            metrics,
            status,
            status_tx,
            drain: Drain::Off,
            reload,
        }
    }

    /// The loop: until a signal, the end of a drain or a failing sweeper
    /// says how to end.
    async fn serve(&mut self, signals: &mut Signals) -> End {
        let mut health_tick = tokio::time::interval(health::CHECK_INTERVAL);
        health_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let event = self.next_event(signals, &mut health_tick).await;
            if let ControlFlow::Break(end) = self.handle_event(event).await {
                return end;
            }
        }
    }

    async fn next_event(
        &mut self,
        signals: &mut Signals,
        health_tick: &mut tokio::time::Interval,
    ) -> Event {
        let drain_until = self.drain.until();
        let s = &mut self.services;
        tokio::select! {
            _ = signals.int.recv() => Event::Stop("SIGINT"),
            _ = signals.term.recv() => Event::Stop("SIGTERM"),
            _ = signals.usr2.recv() => Event::Handover,
            _ = signals.hup.recv() => Event::Reload { recheck: false },
            _ = signals.usr1.recv() => Event::Reload { recheck: true },
            _ = sleep_until(drain_until), if drain_until.is_some() => Event::DrainOver,
            notice = next_notice(&mut s.events) => Event::Notice(notice),
            _ = health_tick.tick() => Event::HealthCheck,
            failed = &mut s.sweep_failed => Event::SweepFailed(
                failed.unwrap_or_else(|_| anyhow::anyhow!("the sweeper thread died")),
            ),
            conn = accept(&s.probe), if s.probe.as_ref().is_some_and(Probe::is_open) => {
                Event::ProbeAccepted(conn)
            }
        }
    }

    async fn handle_event(&mut self, event: Event) -> ControlFlow<End> {
        match event {
            Event::Stop(signal) => return self.on_stop_signal(signal),
            Event::Handover => {
                info!("SIGUSR2: handing over; the pinned dataplane keeps forwarding");
                return ControlFlow::Break((Exit::KeepForwarding, Ok(())));
            }
            Event::DrainOver => {
                self.end_drain().await;
                return ControlFlow::Break((Exit::Teardown, Ok(())));
            }
            Event::Reload { recheck } => self.on_reload(recheck),
            Event::Notice(notice) => self.on_notice(notice),
            Event::HealthCheck => self.check_health().await,
            Event::SweepFailed(e) => {
                // A failing control plane is not a failing dataplane: leave
                // it forwarding for the restarted loader.
                return ControlFlow::Break((
                    Exit::KeepForwarding,
                    Err(e.context("sweeping conntrack")),
                ));
            }
            Event::ProbeAccepted(conn) => {
                // Accepting is the answer; nothing is read or written.
                if let Err(e) = conn {
                    warn!(error = %e, "accepting a health probe");
                }
            }
        }
        ControlFlow::Continue(())
    }

    /// SIGHUP: the configuration is read again and its egress policy
    /// replaces the running one atomically; new flows follow it,
    /// established ones are not judged again unless `recheck` (SIGUSR1):
    /// then those it denies are ended. A file that does not check
    /// (or a policy that does not compile) changes nothing: one line says
    /// why, with the file's line.
    fn on_reload(&mut self, recheck: bool) {
        let signal = if recheck { "SIGUSR1" } else { "SIGHUP" };
        let result = self
            .reload
            .config()
            .and_then(|c| self.attached.dp.policy.install(&c.policy).map(|()| c));
        let c = match result {
            Ok(c) => c,
            Err(e) => {
                warn!("{signal}: egress policy not reloaded, the one in force stays: {e:#}");
                return;
            }
        };
        let ended = if recheck {
            match nat_loader::policy::recheck(&mut self.attached.dp.maps.sessions, &c.policy) {
                Ok(n) => n,
                Err(e) => {
                    warn!("{signal}: rechecking the established flows: {e:#}");
                    0
                }
            }
        } else {
            0
        };
        info!(
            rules = c.policy.rules.len(),
            default = %c.policy.default,
            recheck,
            ended,
            "{signal}: egress policy reloaded (new flows follow it)"
        );
        self.config.policy = c.policy;
    }

    /// The first SIGTERM/SIGINT drains (unless --drain-seconds is 0); one
    /// during a drain stops at once.
    fn on_stop_signal(&mut self, signal: &str) -> ControlFlow<End> {
        if self.drain.until().is_some() || self.config.drain.is_zero() {
            info!("{signal}: shutting down now");
            return ControlFlow::Break((Exit::Teardown, Ok(())));
        }
        self.start_drain(Drain::Signal {
            until: Instant::now() + self.config.drain,
        });
        info!(
            seconds = self.config.drain.as_secs(),
            "{signal}: draining: probe closed, forwarding goes on (signal again to stop now)"
        );
        ControlFlow::Continue(())
    }

    fn on_notice(&mut self, notice: Option<Departure>) {
        match (notice, &self.drain) {
            (Some(d), Drain::Off) => {
                warn!(
                    event = %d.id, kind = %d.kind, not_before = %d.not_before,
                    seconds = self.config.drain.as_secs(),
                    "scheduled event: the platform will take this VM away; draining \
                     (probe closed, forwarding goes on), then approving it"
                );
                self.start_drain(Drain::Event {
                    until: Instant::now() + self.config.drain,
                    event: d,
                });
            }
            (None, Drain::Event { event, .. }) => {
                // The next health check reopens the probe.
                info!(event = %event.id, "the scheduled event was withdrawn: drain cancelled");
                self.drain = Drain::Off;
            }
            // Draining for a signal already: the shutdown is on its way.
            _ => {}
        }
    }

    /// Probes fail at once; forwarding goes on while the load balancer
    /// moves new flows elsewhere and established ones finish.
    fn start_drain(&mut self, drain: Drain) {
        if let Some(p) = &mut self.services.probe {
            p.set_open(false);
        }
        self.set_status(Status::Draining);
        self.drain = drain;
    }

    async fn end_drain(&self) {
        match (&self.drain, &self.services.events) {
            (Drain::Event { event, .. }, Some(watch)) => match watch.approve(&event.id).await {
                Ok(()) => {
                    info!(event = %event.id, "drain over: approved the scheduled event; shutting down")
                }
                Err(e) => warn!(
                    event = %event.id, error = %format!("{e:#}"),
                    "drain over: could not approve the scheduled event (the platform goes ahead \
                     at its deadline); shutting down"
                ),
            },
            _ => info!("drain over: shutting down"),
        }
    }

    async fn check_health(&mut self) {
        let now = if self.drain.until().is_some() {
            Status::Draining
        } else {
            // A check that hangs (netlink) is a failed check.
            let check = self
                .services
                .health
                .check(&self.handle, &mut self.attached.dp);
            tokio::time::timeout(health::CHECK_INTERVAL * 3, check)
                .await
                .unwrap_or_else(|_| Status::Unhealthy("health check timed out".into()))
        };
        if now == self.status {
            return;
        }
        match &now {
            Status::Healthy => {
                // Routes through a NIC die with it when it goes down; put
                // ours back before saying healthy.
                match self.services.routes.restore(&self.handle).await {
                    Ok(0) => {}
                    Ok(n) => info!(count = n, "restored policy routes"),
                    Err(e) => warn!(error = %format!("{e:#}"), "restoring policy routes"),
                }
                info!("healthy");
            }
            Status::Unhealthy(reason) => warn!(%reason, "unhealthy: probe closed"),
            Status::Draining => {}
        }
        if let Some(p) = &mut self.services.probe {
            p.set_open(now.is_healthy());
        }
        self.set_status(now);
    }

    fn set_status(&mut self, status: Status) {
        self.status = status;
        self.status_tx.send_replace(self.status.clone());
    }

    /// Stops the services, probes first, then leaves the dataplane as `how`
    /// says.
    async fn shutdown(self, how: Exit) -> Result<()> {
        let Gateway {
            config,
            handle,
            attached,
            services,
            http,
            metrics,
            ..
        } = self;
        let Services {
            mut routes,
            probe,
            events,
            mut sweeper,
            reporter,
            translog,
            ..
        } = services;
        // A pass under way would only find the maps going away.
        sweeper.stop(Duration::from_secs(2));
        // After the sweeper: its last records are written too.
        drop(translog);
        drop(events);
        // Probes fail before the programs go.
        drop(probe);
        if let Some(h) = http {
            h.abort();
        }
        if let Some(h) = metrics {
            h.abort();
        }
        reporter.stop();
        log_policy_hits(&attached.dp.policy);
        let Attached { dp, sysctls, .. } = attached;
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
                // The next loader adds the same rules ("exists" is fine)
                // and owns them from then on.
                routes.keep();
                sysctls.keep();
                info!(
                    pins = %config.bpffs_dir.display(),
                    "nat-loader exited; the dataplane keeps forwarding until a loader adopts it \
                     (or `nat-loader teardown` removes it)"
                );
            }
        }
        Ok(())
    }
}

/// One line per rule of the egress policy in force: the new flows it
/// decided since it was installed (denied ones: its drops).
fn log_policy_hits(policy: &nat_loader::policy::PolicyMaps) {
    match policy.hits() {
        Ok(hits) => {
            for (rule, verdict, flows) in hits {
                info!(%rule, %verdict, flows, "policy hits");
            }
        }
        Err(e) => warn!(error = %format!("{e:#}"), "reading the policy's hit counters"),
    }
}

/// The next change of the event that takes this VM away; pending forever
/// without `--scheduled-events`.
async fn next_notice(watch: &mut Option<events::Watch>) -> Option<Departure> {
    match watch {
        Some(w) => w.changed().await,
        None => std::future::pending().await,
    }
}

async fn accept(p: &Option<Probe>) -> std::io::Result<()> {
    match p {
        Some(p) => p.accept().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

//! The counters (and with `--show-flows` the flows) in the log: at start,
//! every `--stats-interval` and once at exit, from a thread of their own,
//! so that reading a large conntrack table never holds up the health probe
//! or the signals.

use std::{
    sync::{
        Arc,
        mpsc::{self, RecvTimeoutError},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result};
use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use nat_common::{
    BindKey, BindValue, CtKey, CtValue, MAP_BIND_REV, MAP_CT_FWD, MAP_POOL_ADDRS, MAP_STATS,
    POOL_MAX, PoolAddr,
};
use nat_loader::{
    batch, conntrack, dataplane::pinned_map, egress::Modes, monotonic_ns, pins::PinDir, pool,
    stats::Stats,
};
use tracing::{info, warn};

/// The log lines' target: `nat_loader`, whatever module logs them (the
/// tests and operators look for `nat_loader: stats <hook>: label=n`).
const TARGET: &str = "nat_loader";

/// Reads the counters and flows through handles of its own on the pinned
/// maps.
pub struct Reporter {
    stats: PerCpuArray<MapData, u64>,
    sessions: HashMap<MapData, CtKey, CtValue>,
    bindings: HashMap<MapData, BindKey, BindValue>,
    pool: Array<MapData, PoolAddr>,
    /// External ports each address has per protocol (both ranges).
    ports_per_proto: usize,
    show_flows: usize,
    /// How each XDP program forwards (the health check keeps it current).
    modes: Arc<Modes>,
}

impl Reporter {
    pub fn open(
        pins: &PinDir,
        show_flows: usize,
        ports_per_proto: usize,
        modes: Arc<Modes>,
    ) -> Result<Reporter> {
        Ok(Reporter {
            stats: pinned_map(pins, MAP_STATS).context("opening the counters for the log")?,
            sessions: pinned_map(pins, MAP_CT_FWD).context("opening the flows for the log")?,
            bindings: pinned_map(pins, MAP_BIND_REV).context("opening the bindings for the log")?,
            pool: pinned_map(pins, MAP_POOL_ADDRS).context("opening the pool for the log")?,
            ports_per_proto,
            show_flows,
            modes,
        })
    }

    /// One `stats <hook>: label=n ...` line per hook with a non-zero
    /// counter, one `stats xdp_egress: xdp_int=<mode> xdp_ext=<mode>` line;
    /// then, with `--show-flows`, the flows.
    pub fn log(&self) {
        match Stats::read(&self.stats) {
            Ok(s) => {
                for line in s.lines() {
                    info!(target: TARGET, "stats {line}");
                }
            }
            Err(e) => warn!(target: TARGET, error = %format!("{e:#}"), "reading stats"),
        }
        info!(target: TARGET, "stats xdp_egress: {}", self.modes.line());
        let slots: Vec<PoolAddr> = (0..POOL_MAX)
            .filter_map(|i| self.pool.get(&i, 0).ok())
            .collect();
        match batch::entries(&self.bindings) {
            Ok(b) => {
                for line in pool_lines(&conntrack::per_address(&slots, &b), self.ports_per_proto) {
                    info!(target: TARGET, "stats {line}");
                }
            }
            Err(e) => warn!(target: TARGET, error = %e, "reading the bindings"),
        }
        if self.show_flows > 0 {
            match conntrack::flows(&self.sessions, &slots, monotonic_ns()) {
                Ok(flows) => {
                    info!(target: TARGET, count = flows.len(), "flows");
                    for f in flows.iter().take(self.show_flows) {
                        info!(target: TARGET, "flow {f}");
                    }
                }
                Err(e) => warn!(target: TARGET, error = %format!("{e:#}"), "reading the flows"),
            }
        }
    }
}

/// One line per pool address: `pool <addr>: state=<active|draining>
/// tcp=<in use>/<free> udp=... icmp=...` (ports bound, held ones
/// included, and ports left).
fn pool_lines(usage: &[conntrack::AddressUse], ports: usize) -> Vec<String> {
    usage
        .iter()
        .map(|u| {
            let [t, ud, i] = u.bindings;
            format!(
                "pool {}: state={} tcp={t}/{} udp={ud}/{} icmp={i}/{}",
                u.addr,
                pool::state_label(u.state),
                ports.saturating_sub(t),
                ports.saturating_sub(ud),
                ports.saturating_sub(i)
            )
        })
        .collect()
}

/// The reporting thread.
pub struct ReporterThread {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

impl ReporterThread {
    /// Logs at once and then every `every`; with `None` only at
    /// [`ReporterThread::stop`].
    pub fn spawn(reporter: Reporter, every: Option<Duration>) -> Result<ReporterThread> {
        let (stop, stopped) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("stats".into())
            .spawn(move || {
                if let Some(every) = every {
                    reporter.log();
                    while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                        reporter.log();
                    }
                } else {
                    let _ = stopped.recv();
                }
                reporter.log();
            })
            .context("starting the stats thread")?;
        Ok(ReporterThread { stop, thread })
    }

    /// Logs a last time and ends the thread.
    pub fn stop(self) {
        let _ = self.stop.send(());
        if self.thread.join().is_err() {
            warn!(target: TARGET, "the stats thread panicked");
        }
    }
}

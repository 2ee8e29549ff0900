//! Prometheus metrics (`--metrics-listen`): `GET /metrics` in the
//! Prometheus text format, built with `prometheus-client` at each scrape
//! from the per-CPU counters (one syscall per counter, summed over CPUs),
//! from what the sweeper published of its last pass ([`Published`]: a
//! scrape never walks the session table) and from the loader's state
//! (health, drain, adoption, XDP egress modes, build).
//!
//! Safe by default: the endpoint is not reachable from the `--ext` side.
//! [`listener`] refuses an `--ext` address and binds any other address but
//! loopback to `--int` (`SO_BINDTODEVICE`: the kernel hands the socket only
//! connections that arrive on `--int`), unless `--metrics-allow-ext`.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use aya::maps::{MapData, PerCpuArray};
use nat_common::{
    IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP,
    stats::{self, HOOKS, Kind, LABELS},
};
use prometheus_client::{
    encoding::prometheus_text,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpSocket, TcpStream},
    sync::watch,
};
use tracing::warn;

use crate::{
    egress::Modes,
    health::Status,
    stats::Stats,
    summary::{Published, STATES, proto_name},
};

/// Everything a scrape reads.
pub struct Sources {
    pub stats: PerCpuArray<MapData, u64>,
    pub traffic: PerCpuArray<MapData, nat_common::Traffic>,
    pub published: Arc<Published>,
    pub status: watch::Receiver<Status>,
    pub modes: Arc<Modes>,
    pub adopted: bool,
    pub max_flows: u32,
    /// SNAT addresses and how many external ports (or ICMP identifiers)
    /// each has per protocol: (address, `--port-range`'s, `--low-port-range`'s).
    pub snat: Vec<(Ipv4Addr, u64, u64)>,
    /// NIC names by XDP hook: (int, ext).
    pub nics: (String, String),
    pub version: &'static str,
    pub build: String,
}

type Labels = Vec<(&'static str, String)>;

fn counter_family(reg: &mut Registry, name: &str, help: &str) -> Family<Labels, Counter> {
    let f = Family::<Labels, Counter>::default();
    reg.register(name, help, f.clone());
    f
}

fn gauge_family(reg: &mut Registry, name: &str, help: &str) -> Family<Labels, Gauge> {
    let f = Family::<Labels, Gauge>::default();
    reg.register(name, help, f.clone());
    f
}

fn gauge(reg: &mut Registry, name: &str, help: &str, v: i64) {
    let g = Gauge::<i64>::default();
    g.set(v);
    reg.register(name, help, g);
}

fn counter(reg: &mut Registry, name: &str, help: &str, v: u64) {
    let c = Counter::<u64>::default();
    c.inc_by(v);
    reg.register(name, help, c);
}

fn l(pairs: &[(&'static str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

impl Sources {
    /// The exposition, in the Prometheus text format.
    pub fn render(&self) -> Result<String> {
        let s = Stats::read(&self.stats)?;
        let mut reg = Registry::default();
        let packets = counter_family(
            &mut reg,
            "nat_packets",
            "Packets counted by each program (hook) for each reason, summed over CPUs: \
             kind=verdict counts each packet once per hook, kind=event what happened on the way",
        );
        for (h, (_, hook)) in HOOKS.iter().enumerate() {
            for (r, label) in LABELS {
                let kind = match stats::kind(*r) {
                    Some(Kind::Event) => "event",
                    _ => "verdict",
                };
                packets
                    .get_or_create(&l(&[("hook", hook), ("reason", label), ("kind", kind)]))
                    .inc_by(s.get(h, *r));
            }
        }
        let total = |reasons: &[u32]| -> u64 {
            (0..HOOKS.len())
                .map(|h| reasons.iter().map(|r| s.get(h, *r)).sum::<u64>())
                .sum()
        };
        counter(
            &mut reg,
            "nat_connection_attempts",
            "New sessions the dataplane created (event_new_flow)",
            total(&[stats::EV_NEW_FLOW]),
        );
        counter(
            &mut reg,
            "nat_port_allocation_errors",
            "Packets of new flows dropped because every external port was taken (drop_no_free_port)",
            total(&[stats::DROP_NO_PORT]),
        );
        let refused = counter_family(
            &mut reg,
            "nat_refused_flows",
            "New flows refused, by reason (table_full: drop_table_full, no_free_port: \
             drop_no_free_port, filtered: drop_filtered, unsolicited: drop_unsolicited)",
        );
        for (reason, r) in [
            ("table_full", stats::DROP_TABLE_FULL),
            ("no_free_port", stats::DROP_NO_PORT),
            ("filtered", stats::DROP_FILTERED),
            ("unsolicited", stats::DROP_UNSOLICITED),
        ] {
            refused
                .get_or_create(&l(&[("reason", reason)]))
                .inc_by(total(&[r]));
        }
        let dropped = counter_family(
            &mut reg,
            "nat_dropped_packets",
            "Packets dropped, by reason (every drop_* verdict, summed over hooks)",
        );
        for (r, label) in LABELS {
            if label.starts_with("drop_") && stats::kind(*r) == Some(Kind::Verdict) {
                dropped
                    .get_or_create(&l(&[("reason", label)]))
                    .inc_by(total(&[*r]));
            }
        }
        let forwarded = counter_family(
            &mut reg,
            "nat_forwarded_packets",
            "Packets translated and sent on (every forwarded verdict), by direction: outbound \
             what the --int programs sent on (hairpinned packets included), inbound the --ext ones'",
        );
        // By the hook that sent it on: the --int hooks send outbound
        // (hairpinned packets too), the --ext hooks inbound.
        let (mut out, mut inb) = (0, 0);
        for (h, (hook, _)) in HOOKS.iter().enumerate() {
            let n: u64 = stats::FORWARDED.iter().map(|r| s.get(h, *r)).sum();
            if stats::direction(*hook) == stats::DIR_OUTBOUND {
                out += n;
            } else {
                inb += n;
            }
        }
        forwarded
            .get_or_create(&l(&[("direction", "outbound")]))
            .inc_by(out);
        forwarded
            .get_or_create(&l(&[("direction", "inbound")]))
            .inc_by(inb);
        let packets = counter_family(
            &mut reg,
            "nat_traffic_packets",
            "Packets translated and sent on by the main paths (XDP and TC redirects, first \
             fragments, packets the kernel fragments), by direction and protocol",
        );
        let bytes = counter_family(
            &mut reg,
            "nat_traffic_bytes",
            "Bytes (whole frames as they left) of nat_traffic_packets, by direction and protocol",
        );
        for (dir, proto, t) in crate::stats::read_traffic(&self.traffic)? {
            let labels = l(&[("direction", dir), ("protocol", proto)]);
            packets.get_or_create(&labels).inc_by(t.packets);
            bytes.get_or_create(&labels).inc_by(t.bytes);
        }
        self.sweeper_metrics(&mut reg);
        self.state_metrics(&mut reg);
        let mut text = String::new();
        prometheus_text::encode(&mut text, &reg).context("encoding the metrics")?;
        Ok(text)
    }

    fn sweeper_metrics(&self, reg: &mut Registry) {
        let last = self.published.last.lock().ok().and_then(|l| l.clone());
        let sessions = gauge_family(
            reg,
            "nat_sessions",
            "Sessions in the table at the sweeper's last pass, by protocol and state \
             (tcp: opening, established, closing; udp, icmp: answered, unanswered)",
        );
        let bindings = gauge_family(
            reg,
            "nat_bindings",
            "Bindings (one external port each) at the sweeper's last pass, by protocol and \
             state (active: used by a session; held: released, reserved for its endpoint)",
        );
        let in_use = gauge_family(
            reg,
            "nat_external_ports_in_use",
            "External ports (ICMP: identifiers) bound at the sweeper's last pass, held ones \
             included, by SNAT address, protocol and range (main: --port-range, for inside \
             ports from 1024; low: --low-port-range)",
        );
        let free = gauge_family(
            reg,
            "nat_external_ports_free",
            "External ports (ICMP: identifiers) free at the sweeper's last pass, by SNAT \
             address, protocol and range (main, low)",
        );
        let summary = last.unwrap_or_default();
        let mut total_sessions = 0u64;
        for (proto, states) in STATES {
            for st in states {
                let n = summary.sessions.get(&(proto, *st)).copied().unwrap_or(0);
                total_sessions += n;
                sessions
                    .get_or_create(&l(&[("protocol", proto_name(proto)), ("state", st)]))
                    .set(n as i64);
            }
        }
        let mut per_addr: BTreeMap<(u32, u8, bool), u64> = BTreeMap::new();
        for proto in [IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP] {
            for (held, state) in [(false, "active"), (true, "held")] {
                let n: u64 = summary
                    .bindings
                    .iter()
                    .filter(|((p, _, _, h), _)| *p == proto && *h == held)
                    .map(|(_, n)| n)
                    .sum();
                bindings
                    .get_or_create(&l(&[("protocol", proto_name(proto)), ("state", state)]))
                    .set(n as i64);
            }
        }
        for ((proto, addr, low, _), n) in &summary.bindings {
            *per_addr.entry((*addr, *proto, *low)).or_default() += n;
        }
        for (addr, main_ports, low_ports) in &self.snat {
            let raw = u32::from_ne_bytes(addr.octets());
            let a = addr.to_string();
            for proto in [IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP] {
                for (low, range, ports) in [(false, "main", main_ports), (true, "low", low_ports)] {
                    let used = per_addr.get(&(raw, proto, low)).copied().unwrap_or(0);
                    let labels = l(&[
                        ("snat_address", &a),
                        ("protocol", proto_name(proto)),
                        ("range", range),
                    ]);
                    in_use.get_or_create(&labels).set(used as i64);
                    free.get_or_create(&labels)
                        .set(ports.saturating_sub(used) as i64);
                }
            }
        }
        gauge(
            reg,
            "nat_table_max_sessions",
            "Size of the session table (--max-flows)",
            self.max_flows as i64,
        );
        let fill = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        fill.set(total_sessions as f64 / self.max_flows.max(1) as f64);
        reg.register(
            "nat_table_fill_ratio",
            "Sessions over --max-flows at the sweeper's last pass (0 to 1)",
            fill,
        );
        let p = &self.published;
        counter(
            reg,
            "nat_sessions_expired",
            "Sessions the sweeper removed for being idle past their timeout, since this loader started",
            p.expired.load(Ordering::Relaxed),
        );
        counter(
            reg,
            "nat_sessions_evicted",
            "Sessions the sweeper evicted under table pressure, since this loader started",
            p.evicted.load(Ordering::Relaxed),
        );
        gauge(
            reg,
            "nat_table_pressure",
            "1 while the table is under pressure (see README, Table pressure)",
            p.pressed.load(Ordering::Relaxed) as i64,
        );
        reg.register(
            "nat_sweep_duration_seconds",
            "How long each sweeper pass took",
            p.sweep_seconds.clone(),
        );
    }

    fn state_metrics(&self, reg: &mut Registry) {
        let status = self.status.borrow().clone();
        gauge(
            reg,
            "nat_healthy",
            "1 while the health verdict is healthy (the probe port accepts)",
            status.is_healthy() as i64,
        );
        let health = gauge_family(
            reg,
            "nat_health_status",
            "The health verdict (healthy, unhealthy, draining) with its reason; 1 for the current one",
        );
        let (word, reason) = match &status {
            Status::Healthy => ("healthy", ""),
            Status::Unhealthy(r) => ("unhealthy", r.as_str()),
            Status::Draining => ("draining", "draining"),
        };
        health
            .get_or_create(&l(&[("status", word), ("reason", reason)]))
            .set(1);
        gauge(
            reg,
            "nat_draining",
            "1 while draining (SIGTERM or a scheduled event): probe closed, forwarding goes on",
            (status == Status::Draining) as i64,
        );
        gauge(
            reg,
            "nat_dataplane_adopted",
            "1 if this loader adopted a pinned dataplane (a restart or handover), 0 if it started one",
            self.adopted as i64,
        );
        let egress = gauge_family(
            reg,
            "nat_xdp_egress_mode",
            "How each NIC's XDP program forwards (redirect: native; redirect_skb: generic mode; \
             to_tc: the egress NIC cannot take XDP frames): 1 for the current mode",
        );
        for (hook, nic) in [
            (stats::HOOK_XDP_INT, &self.nics.0),
            (stats::HOOK_XDP_EXT, &self.nics.1),
        ] {
            let mode = nat_common::xdp_egress_label(self.modes.get(hook));
            egress
                .get_or_create(&l(&[("nic", nic), ("mode", mode)]))
                .set(1);
        }
        let info = gauge_family(
            reg,
            "nat_build_info",
            "The loader's version and build; always 1",
        );
        info.get_or_create(&l(&[("version", self.version), ("build", &self.build)]))
            .set(1);
    }
}

/// The metrics socket for `addr`: see the module doc.
pub fn listener(
    addr: SocketAddrV4,
    int: &str,
    ext_addrs: &[Ipv4Addr],
    allow_ext: bool,
) -> Result<TcpListener> {
    let ip = *addr.ip();
    if !allow_ext && ext_addrs.contains(&ip) {
        bail!(
            "--metrics-listen {addr}: {ip} is an address of --ext, where the metrics must not \
             be reachable (listen on --int's address or 0.0.0.0, or add --metrics-allow-ext)"
        );
    }
    let socket = TcpSocket::new_v4().context("creating the metrics socket")?;
    socket.set_reuseaddr(true)?;
    if !allow_ext && !ip.is_loopback() {
        socket
            .bind_device(Some(int.as_bytes()))
            .with_context(|| format!("binding the metrics socket to {int}"))?;
    }
    socket
        .bind(SocketAddr::V4(addr))
        .and_then(|()| socket.listen(64))
        .with_context(|| format!("listening for metrics scrapes on {addr} (--metrics-listen)"))
}

/// Serves `GET /metrics` until the task is dropped.
pub async fn serve(listener: TcpListener, sources: Arc<Sources>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let sources = Arc::clone(&sources);
                tokio::spawn(async move {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(5), answer(stream, sources)).await;
                });
            }
            Err(e) => {
                warn!(error = %e, "accepting a metrics scrape");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(mut stream: TcpStream, sources: Arc<Sources>) -> std::io::Result<()> {
    let (method, path) = crate::http::request_line(&stream).await?;
    let (code, ctype, body) = match (method.as_str(), path.as_str()) {
        ("GET", "/metrics") => {
            // The map reads are syscalls: off the runtime's one thread.
            let s = Arc::clone(&sources);
            match tokio::task::spawn_blocking(move || s.render()).await {
                Ok(Ok(text)) => ("200 OK", prometheus_text::CONTENT_TYPE, text),
                Ok(Err(e)) => (
                    "500 Internal Server Error",
                    "text/plain",
                    format!("{e:#}\n"),
                ),
                Err(_) => (
                    "500 Internal Server Error",
                    "text/plain",
                    "panicked\n".into(),
                ),
            }
        }
        ("GET", _) => ("404 Not Found", "text/plain", "try /metrics\n".into()),
        _ => ("405 Method Not Allowed", "text/plain", String::new()),
    };
    let head = format!(
        "HTTP/1.0 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

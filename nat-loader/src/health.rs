//! Health: whether this instance can really forward, and the two ways a load
//! balancer asks about it.
//!
//! [`Health::check`] asks the kernel, not our own bookkeeping: our XDP
//! programs and TCX links still attached on both NICs (somebody may have
//! detached them), the maps answering, both links operationally up,
//! forwarding enabled, every SNAT address still on `--ext`, and, from the
//! counters, that the instance forwards what it should
//! ([`crate::blackhole`]: the kernel refusing our XDP redirects, or packets
//! to forward with nothing leaving). Each check also re-reads what each
//! NIC can take and tells XDP ([`crate::egress`]). The TCP [`Probe`]
//! listens only while all that holds, so a probe gets a connection refused
//! (RST) as soon as it does not; [`serve_http`] answers `GET /healthz` with
//! 200 or 503 and the reason, for HTTP probes and a scale set's
//! application-health extension.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use aya::{
    maps::{MapData, PerCpuArray},
    programs::{SchedClassifier, TcAttachType},
};
use futures::TryStreamExt;
use nat_common::stats::{self, HOOK_XDP_EXT, HOOK_XDP_INT};
use netlink_packet_route::link::{
    LinkAttribute, LinkFlags, LinkMessage, LinkXdp, State, XdpAttached,
};
use rtnetlink::Handle;

use crate::{
    blackhole::{self, Problem},
    dataplane::Dataplane,
    egress::{self, XdpRun},
    netif,
    stats::Stats,
    xdp_features::Netdev,
};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::watch,
};
use tracing::{info, warn};

/// How often the loader re-checks its health: a failure shows on the probe
/// port well within a second.
pub const CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// The health of the instance as a load balancer should see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    Healthy,
    /// Not able to forward, and why.
    Unhealthy(String),
    /// Shutting down: forwarding still works for established flows, but
    /// new ones should go elsewhere.
    Draining,
}

impl Status {
    pub fn is_healthy(&self) -> bool {
        *self == Status::Healthy
    }

    pub fn reason(&self) -> &str {
        match self {
            Status::Healthy => "",
            Status::Unhealthy(r) => r,
            Status::Draining => "draining",
        }
    }

    /// The `/healthz` body.
    pub fn json(&self) -> String {
        match self {
            Status::Healthy => r#"{"healthy":true}"#.to_string(),
            other => format!(
                r#"{{"healthy":false,"reason":"{}"}}"#,
                json_escape(other.reason())
            ),
        }
    }
}

fn json_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// One NIC and the ids of our programs that must be attached to it.
#[derive(Clone, Debug)]
pub struct Nic {
    pub name: String,
    pub index: u32,
    pub xdp_prog_id: u32,
    pub tc_prog_id: u32,
}

/// The health check, with what it remembers from tick to tick: what each
/// NIC can take (and so how XDP forwards), the counters' window, which
/// SNAT addresses were missing.
pub struct Health {
    /// `--int`, then `--ext`.
    nics: [Nic; 2],
    netdev: Netdev,
    /// Whether reading the features failed last time (logged once).
    features_failing: bool,
    egress: egress::Control,
    modes: Arc<egress::Modes>,
    detector: blackhole::Detector,
    /// The SNAT addresses that must stay configured on `--ext`, and those
    /// found missing last time.
    snat: Vec<Ipv4Addr>,
    snat_missing: Vec<Ipv4Addr>,
    /// How the SNAT pool follows `--ext`'s addresses (`None`: a fixed
    /// list).
    follow: Option<Follow>,
}

/// What the SNAT pool follows while the gateway runs. (Without
/// `--snat-ip` the pool is the primary address at start, which the health
/// check requires to stay on `--ext`: a new primary is not taken up, the
/// probe fails instead.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Follow {
    /// `--snat-ip auto`: every IPv4 address of `--ext`.
    All,
}

/// The pool's addresses for `follow`, given `--ext`'s addresses in the
/// kernel's order (`None`: keep the pool as it is, `--ext` has none).
pub fn followed(follow: Follow, present: &[Ipv4Addr]) -> Option<Vec<Ipv4Addr>> {
    let wanted: Vec<Ipv4Addr> = match follow {
        Follow::All => present
            .iter()
            .copied()
            .take(nat_common::POOL_MAX as usize)
            .collect(),
    };
    (!wanted.is_empty()).then_some(wanted)
}

impl Health {
    /// `int` and `ext` with this loader's programs; `snat`, the SNAT
    /// addresses that were configured on `ext` at start (an address given
    /// by `--snat-ip` that is not, and whose replies are routed to the
    /// host, is not required); `modes`, where the XDP forwarding modes in
    /// force are published.
    pub fn new(
        int: Nic,
        ext: Nic,
        snat: Vec<Ipv4Addr>,
        modes: Arc<egress::Modes>,
    ) -> Result<Health> {
        Ok(Health {
            nics: [int, ext],
            netdev: Netdev::open()?,
            features_failing: false,
            egress: egress::Control::default(),
            modes,
            detector: blackhole::Detector::default(),
            snat,
            snat_missing: Vec::new(),
            follow: None,
        })
    }

    /// Makes the SNAT pool follow `--ext`'s addresses.
    pub fn following(mut self, follow: Option<Follow>) -> Health {
        self.follow = follow;
        self
    }

    /// Checks everything; the first problem found is the reason. Whatever
    /// it finds, XDP is told what each NIC can take now.
    pub async fn check(&mut self, handle: &Handle, dp: &mut Dataplane) -> Status {
        match self.problems(handle, dp).await {
            Ok(None) => Status::Healthy,
            Ok(Some(reason)) => Status::Unhealthy(reason),
            Err(e) => Status::Unhealthy(format!("health check failed: {e:#}")),
        }
    }

    async fn problems(&mut self, handle: &Handle, dp: &mut Dataplane) -> Result<Option<String>> {
        if let Err(e) = dp.stats.get(&0, 0) {
            return Ok(Some(format!("maps unreachable: {e}")));
        }
        let mut links = Vec::with_capacity(2);
        for nic in &self.nics {
            links.push(link(handle, nic).await?);
        }
        // Every tick, whatever else is wrong: the fallback follows the
        // NICs, and the counters' window stays whole.
        let settled = self.follow_egress(&links, dp);
        let flow = self.forwarding(&links, &dp.stats, settled)?;
        if read_sysctl("net/ipv4/ip_forward")? != "1" {
            return Ok(Some("net.ipv4.ip_forward is off".into()));
        }
        for (nic, link) in self.nics.iter().zip(&links) {
            if let Some(p) = nic_problem(nic, link.as_ref())? {
                return Ok(Some(p));
            }
        }
        if let Some(p) = self.snat_problem(handle, dp).await? {
            return Ok(Some(p));
        }
        Ok(flow)
    }

    /// Reads what each egress NIC can take and tells the XDP program that
    /// forwards to it, when that changed. Returns, per XDP program, whether
    /// it was told.
    fn follow_egress(&mut self, links: &[Option<LinkMessage>], dp: &mut Dataplane) -> [bool; 2] {
        let mut told = [false; 2];
        let [int, ext] = &self.nics;
        let paths = [
            (HOOK_XDP_INT, int, &links[0], ext),
            (HOOK_XDP_EXT, ext, &links[1], int),
        ];
        for (hook, from, from_link, to) in paths {
            let features = match self.netdev.xdp_features(to.index) {
                Ok(f) => {
                    if std::mem::take(&mut self.features_failing) {
                        info!("reading the NICs' xdp-features works again");
                    }
                    f
                }
                Err(e) => {
                    if !std::mem::replace(&mut self.features_failing, true) {
                        warn!(error = %format!("{e:#}"),
                            "cannot read xdp-features; XDP keeps forwarding as it did");
                    }
                    return told;
                }
            };
            let path = egress::Path {
                hook,
                ingress: &from.name,
                run: xdp_run(from, from_link.as_ref()),
                egress: &to.name,
                features,
            };
            if let Some(mode) = self.egress.update(&path, &self.modes) {
                match dp.set_xdp_egress(hook, mode) {
                    Ok(()) => told[hook as usize] = true,
                    Err(e) => warn!(error = %format!("{e:#}"), "telling XDP how to forward"),
                }
            }
        }
        told
    }

    /// Samples the counters and the NICs' sent packets; the problem if the
    /// window shows the instance dropping what it should forward.
    fn forwarding(
        &mut self,
        links: &[Option<LinkMessage>],
        stats: &PerCpuArray<MapData, u64>,
        settled: [bool; 2],
    ) -> Result<Option<String>> {
        let mut sample = blackhole::Sample::default();
        for (i, hook) in [HOOK_XDP_INT, HOOK_XDP_EXT].into_iter().enumerate() {
            sample.refused[i] = Stats::slot_total(stats, hook, stats::DROP_REDIRECT_REFUSED)?;
            sample.redirected[i] = Stats::slot_total(stats, hook, stats::xdp_forwarded(hook))?;
        }
        let refused: u64 = sample.refused.iter().sum();
        sample.to_forward = Stats::sum(stats, &stats::FORWARDED)? + refused;
        let sent: u64 = links.iter().flatten().map(tx_packets).sum();
        sample.left = sent + sample.redirected.iter().sum::<u64>();
        let before = self.detector.problem().cloned();
        let egress = [self.nics[1].name.as_str(), self.nics[0].name.as_str()];
        let Some(problem) = self.detector.observe(sample, settled) else {
            return Ok(None);
        };
        if before.as_ref() != Some(problem) {
            match problem {
                Problem::Refused {
                    refused, attempts, ..
                } => warn!(
                    refused,
                    attempts,
                    "{}: {refused} of {attempts} in the last second",
                    problem.reason(egress)
                ),
                Problem::NothingLeaves { to_forward } => warn!(
                    to_forward,
                    "{}: {to_forward} to forward in the last second",
                    problem.reason(egress)
                ),
            }
        }
        Ok(Some(problem.reason(egress)))
    }

    /// Whether every required SNAT address is still on `--ext`; logs each
    /// change. A pool that follows `--ext` is updated first.
    async fn snat_problem(
        &mut self,
        handle: &Handle,
        dp: &mut Dataplane,
    ) -> Result<Option<String>> {
        if self.snat.is_empty() && self.follow.is_none() {
            return Ok(None);
        }
        let ext = &self.nics[1];
        let present: Vec<Ipv4Addr> = netif::addresses(handle, ext.index)
            .await
            .with_context(|| format!("listing the addresses of {}", ext.name))?
            .into_iter()
            .map(|(a, _)| a)
            .collect();
        // The pool follows --ext: an address that came is active at once,
        // one that went drains (its flows keep it until they end).
        let same =
            |a: &[Ipv4Addr], b: &[Ipv4Addr]| a.len() == b.len() && a.iter().all(|x| b.contains(x));
        if let Some(wanted) = self.follow.and_then(|f| followed(f, &present))
            && !same(&wanted, &self.snat)
        {
            info!(interface = %ext.name, before = ?self.snat, now = ?wanted,
                "the SNAT pool follows the addresses of {}", ext.name);
            let keep = crate::pool::occupied(
                &crate::batch::entries(&dp.maps.bind).context("reading the bindings")?,
            );
            dp.pool
                .apply(&wanted, &keep)
                .context("updating the SNAT pool")?;
            self.snat = wanted;
        }
        let missing = missing(&self.snat, &present);
        if missing != self.snat_missing {
            for a in missing.iter().filter(|a| !self.snat_missing.contains(a)) {
                warn!(snat = %a, interface = %ext.name, present = ?present,
                    "the SNAT address was removed from {}: replies to it no longer reach this host", ext.name);
            }
            for a in self.snat_missing.iter().filter(|a| !missing.contains(a)) {
                info!(snat = %a, interface = %ext.name, "the SNAT address is on {} again", ext.name);
            }
            self.snat_missing = missing;
        }
        Ok(snat_reason(&self.snat_missing, &ext.name))
    }
}

/// The link message of `nic` (`None`: the interface is gone).
async fn link(handle: &Handle, nic: &Nic) -> Result<Option<LinkMessage>> {
    let mut links = handle.link().get().match_index(nic.index).execute();
    match links.try_next().await {
        Ok(l) => Ok(l),
        Err(rtnetlink::Error::NetlinkError(e)) if e.code.map(|c| c.get()) == Some(-ENODEV) => {
            Ok(None)
        }
        Err(e) => Err(e).with_context(|| format!("looking up {}", nic.name)),
    }
}

const ENODEV: i32 = 19;

/// How our XDP program runs on `nic`: generic if the link says so.
fn xdp_run(nic: &Nic, link: Option<&LinkMessage>) -> XdpRun {
    let generic = link.is_some_and(|l| {
        xdp_attrs(l).any(|x| matches!(x, LinkXdp::SkbProgId(id) if *id == nic.xdp_prog_id))
            || xdp_attrs(l).any(|x| matches!(x, LinkXdp::Attached(XdpAttached::SocketBuffer)))
    });
    if generic {
        XdpRun::Generic
    } else {
        XdpRun::Native
    }
}

fn xdp_attrs(link: &LinkMessage) -> impl Iterator<Item = &LinkXdp> {
    link.attributes
        .iter()
        .filter_map(|a| match a {
            LinkAttribute::Xdp(x) => Some(x),
            _ => None,
        })
        .flatten()
}

/// Packets `link` sent.
fn tx_packets(link: &LinkMessage) -> u64 {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Stats64(s) => Some(s.tx_packets),
            _ => None,
        })
        .unwrap_or(0)
}

/// What is wrong with `nic` (its link message `link`, `None` if gone).
fn nic_problem(nic: &Nic, link: Option<&LinkMessage>) -> Result<Option<String>> {
    let key = format!("net/ipv4/conf/{}/forwarding", nic.name);
    if read_sysctl(&key)? != "1" {
        return Ok(Some(format!("forwarding is off on {}", nic.name)));
    }
    let Some(link) = link else {
        return Ok(Some(format!("{} is gone", nic.name)));
    };
    if !link.header.flags.contains(LinkFlags::Up) {
        return Ok(Some(format!("{} is down", nic.name)));
    }
    let oper = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::OperState(s) => Some(*s),
        _ => None,
    });
    // Unknown is what drivers without carrier reporting say; then the
    // RUNNING flag (carrier) is all there is.
    let carrier = link.header.flags.contains(LinkFlags::Running);
    match oper {
        Some(State::Up) => {}
        Some(State::Unknown) | None if carrier => {}
        other => {
            return Ok(Some(format!(
                "{} has no carrier (operstate {other:?})",
                nic.name
            )));
        }
    }
    let xdp = xdp_attrs(link).any(|x| {
        matches!(x, LinkXdp::ProgId(id) | LinkXdp::DrvProgId(id) | LinkXdp::SkbProgId(id)
            if *id == nic.xdp_prog_id)
    });
    if !xdp {
        return Ok(Some(format!(
            "our XDP program is not attached to {}",
            nic.name
        )));
    }
    let tcx = SchedClassifier::query_tcx(&nic.name, TcAttachType::Ingress)
        .with_context(|| format!("querying TCX ingress of {}", nic.name))?
        .1
        .iter()
        .any(|p| p.id() == nic.tc_prog_id);
    if !tcx {
        return Ok(Some(format!(
            "our TC program is not attached to {}",
            nic.name
        )));
    }
    Ok(None)
}

/// The addresses of `required` that are not in `present`, in order.
pub fn missing(required: &[Ipv4Addr], present: &[Ipv4Addr]) -> Vec<Ipv4Addr> {
    required
        .iter()
        .filter(|a| !present.contains(a))
        .copied()
        .collect()
}

/// The health reason for SNAT addresses `missing` from `ext`, if any.
pub fn snat_reason(missing: &[Ipv4Addr], ext: &str) -> Option<String> {
    match missing {
        [] => None,
        [a] => Some(format!("SNAT address {a} is no longer configured on {ext}")),
        more => Some(format!(
            "SNAT addresses {} are no longer configured on {ext}",
            more.iter()
                .map(Ipv4Addr::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

fn read_sysctl(key: &str) -> Result<String> {
    let p = std::path::Path::new("/proc/sys").join(key);
    Ok(std::fs::read_to_string(&p)
        .with_context(|| format!("reading {}", p.display()))?
        .trim()
        .to_string())
}

/// The TCP probe port: bound and listening only while healthy.
pub struct Probe {
    port: u16,
    listener: Option<TcpListener>,
}

impl Probe {
    /// Checks that the port can be bound (so a port in use is a startup
    /// error, not a silently failing probe), without listening yet.
    pub fn new(port: u16) -> Result<Probe> {
        bind(port)
            .with_context(|| format!("binding the health probe port {port} (--probe-port)"))?;
        Ok(Probe {
            port,
            listener: None,
        })
    }

    pub fn is_open(&self) -> bool {
        self.listener.is_some()
    }

    /// Opens or closes the listener. Closing resets connections still in
    /// the accept queue; a new probe gets a connection refused.
    pub fn set_open(&mut self, open: bool) {
        match (open, self.listener.is_some()) {
            (true, false) => match bind(self.port).and_then(|s| s.listen(128)) {
                Ok(l) => {
                    info!(port = self.port, "probe port open");
                    self.listener = Some(l);
                }
                // Retried on the next check.
                Err(e) => warn!(port = self.port, error = %e, "cannot open the probe port"),
            },
            (false, true) => {
                self.listener = None;
                info!(port = self.port, "probe port closed");
            }
            _ => {}
        }
    }

    /// Accepts one probe connection (and closes it: accepting is the
    /// answer). Pending forever while closed.
    pub async fn accept(&self) -> std::io::Result<()> {
        match &self.listener {
            Some(l) => l.accept().await.map(drop),
            None => std::future::pending().await,
        }
    }
}

fn bind(port: u16) -> std::io::Result<TcpSocket> {
    let s = TcpSocket::new_v4()?;
    // Re-opening must not wait for the TIME_WAITs of earlier probes.
    s.set_reuseaddr(true)?;
    s.bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?;
    Ok(s)
}

/// Binds the `/healthz` port (at startup, so a port in use is an error).
pub async fn http_listener(port: u16) -> Result<TcpListener> {
    bind(port).and_then(|s| s.listen(128)).with_context(|| {
        format!("listening for HTTP health checks on TCP port {port} (--health-port)")
    })
}

/// Serves `GET /healthz` from `status` until the task is dropped.
pub async fn serve_http(listener: TcpListener, status: watch::Receiver<Status>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let status = status.clone();
                tokio::spawn(async move {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(2), answer(stream, status)).await;
                });
            }
            Err(e) => {
                warn!(error = %e, "accepting an HTTP health check");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// HTTP/1.0, one request per connection: read the request head, answer,
/// close. Enough for load balancer probes and curl.
async fn answer(stream: TcpStream, status: watch::Receiver<Status>) -> std::io::Result<()> {
    let (method, path) = crate::http::request_line(&stream).await?;
    let (code, body) = match (method.as_str(), path.as_str()) {
        ("GET" | "HEAD", "/healthz") => {
            let s = status.borrow().clone();
            let code = if s.is_healthy() {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            (code, s.json())
        }
        ("GET" | "HEAD", _) => ("404 Not Found", r#"{"error":"not found"}"#.to_string()),
        _ => (
            "405 Method Not Allowed",
            r#"{"error":"method not allowed"}"#.to_string(),
        ),
    };
    let mut response = format!(
        "HTTP/1.0 {code}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len() + 1
    );
    if method != "HEAD" {
        response.push_str(&body);
        response.push('\n');
    }
    let mut out = response.as_bytes();
    while !out.is_empty() {
        stream.writable().await?;
        match stream.try_write(out) {
            Ok(n) => out = &out[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_follows_every_address_and_keeps_itself_when_none_is_left() {
        let (a, b) = (Ipv4Addr::new(192, 0, 2, 2), Ipv4Addr::new(192, 0, 2, 3));
        assert_eq!(followed(Follow::All, &[a, b]), Some(vec![a, b]));
        assert_eq!(followed(Follow::All, &[]), None);
        let many: Vec<Ipv4Addr> = (0..100).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect();
        assert_eq!(
            followed(Follow::All, &many).map(|v| v.len()),
            Some(nat_common::POOL_MAX as usize)
        );
    }

    #[test]
    fn a_snat_address_missing_from_ext_is_the_reason_naming_it() {
        let a = Ipv4Addr::new(192, 0, 2, 2);
        let b = Ipv4Addr::new(192, 0, 2, 3);
        let c = Ipv4Addr::new(192, 0, 2, 4);
        assert_eq!(missing(&[a], &[b, a]), Vec::<Ipv4Addr>::new());
        assert_eq!(snat_reason(&missing(&[a], &[b, a]), "ext"), None);
        assert_eq!(missing(&[a, c], &[b]), vec![a, c]);
        assert_eq!(
            snat_reason(&missing(&[a], &[b]), "ext").as_deref(),
            Some("SNAT address 192.0.2.2 is no longer configured on ext")
        );
        assert_eq!(
            snat_reason(&[a, c], "ext").as_deref(),
            Some("SNAT addresses 192.0.2.2, 192.0.2.4 are no longer configured on ext")
        );
    }

    #[test]
    fn healthz_bodies_are_json_with_escaped_reasons() {
        assert_eq!(Status::Healthy.json(), r#"{"healthy":true}"#);
        assert_eq!(
            Status::Draining.json(),
            r#"{"healthy":false,"reason":"draining"}"#
        );
        assert_eq!(
            Status::Unhealthy("a \"b\"\\\n".into()).json(),
            r#"{"healthy":false,"reason":"a \"b\"\\\u000a"}"#
        );
    }
}

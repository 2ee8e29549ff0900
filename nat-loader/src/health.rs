//! Health: whether this instance can really forward, and the two ways a load
//! balancer asks about it.
//!
//! [`check`] asks the kernel, not our own bookkeeping: our XDP programs and
//! TCX links still attached on both NICs (somebody may have detached them),
//! the maps answering, both links operationally up, forwarding enabled.
//! The TCP [`Probe`] listens only while that holds, so a probe gets a
//! connection refused (RST) as soon as it does not; [`serve_http`] answers
//! `GET /healthz` with 200 or 503 and the reason, for HTTP probes and a
//! scale set's application-health extension.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result};
use aya::{
    maps::{MapData, PerCpuArray},
    programs::{SchedClassifier, TcAttachType},
};
use futures::TryStreamExt;
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkXdp, State};
use rtnetlink::Handle;
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

/// Checks everything; the first problem found is the reason.
pub async fn check(handle: &Handle, nics: &[Nic], stats: &PerCpuArray<MapData, u64>) -> Status {
    match problems(handle, nics, stats).await {
        Ok(None) => Status::Healthy,
        Ok(Some(reason)) => Status::Unhealthy(reason),
        Err(e) => Status::Unhealthy(format!("health check failed: {e:#}")),
    }
}

async fn problems(
    handle: &Handle,
    nics: &[Nic],
    stats: &PerCpuArray<MapData, u64>,
) -> Result<Option<String>> {
    if let Err(e) = stats.get(&0, 0) {
        return Ok(Some(format!("maps unreachable: {e}")));
    }
    if read_sysctl("net/ipv4/ip_forward")? != "1" {
        return Ok(Some("net.ipv4.ip_forward is off".into()));
    }
    for nic in nics {
        let key = format!("net/ipv4/conf/{}/forwarding", nic.name);
        if read_sysctl(&key)? != "1" {
            return Ok(Some(format!("forwarding is off on {}", nic.name)));
        }
        let mut links = handle.link().get().match_index(nic.index).execute();
        let Some(link) = links
            .try_next()
            .await
            .with_context(|| format!("looking up {}", nic.name))?
        else {
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
        let xdp = link
            .attributes
            .iter()
            .filter_map(|a| match a {
                LinkAttribute::Xdp(x) => Some(x),
                _ => None,
            })
            .flatten()
            .any(|x| {
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
    }
    Ok(None)
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
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        if buf.len() > 8192 {
            break;
        }
        stream.readable().await?;
        match stream.try_read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    let request = String::from_utf8_lossy(&buf);
    let mut parts = request.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (code, body) = match (method, path) {
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

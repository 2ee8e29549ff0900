//! A real Prometheus server (Debian's `prometheus`) in a lab namespace,
//! scraping the gateway's `/metrics` every second, and the HTTP bits the
//! metrics tests need: PromQL through its `/api/v1/query`, and a plain
//! `GET` from any namespace.

use std::{
    io::{Read, Write},
    net::{SocketAddrV4, TcpStream},
    path::PathBuf,
    process::Stdio,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{Host, Lab, LabChild, netns::Namespaces};

/// Where Prometheus serves its API, inside its namespace.
const API: SocketAddrV4 = SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 9090);

/// Prometheus running in `host`; killed and its directory (config, TSDB)
/// removed on drop, also while unwinding.
pub struct Prometheus {
    child: Option<LabChild>,
    dir: PathBuf,
    role: String,
}

impl Prometheus {
    /// Starts Prometheus in `host` scraping `target`'s `/metrics` every
    /// second, and waits until its API answers.
    pub fn start(lab: &Lab, host: Host, target: SocketAddrV4) -> Result<Prometheus> {
        Prometheus::start_in(lab.namespaces(), host.role(), &[target])
    }

    /// Starts Prometheus in namespace `role` of `ns`, scraping every one
    /// of `targets` every second (as `instance="<addr:port>"`).
    pub fn start_in(ns: &Namespaces, role: &str, targets: &[SocketAddrV4]) -> Result<Prometheus> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "{}{}-prometheus-{}",
            crate::NS_PREFIX,
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data"))
            .with_context(|| format!("creating {}", dir.display()))?;
        let mut p = Prometheus {
            child: None,
            dir,
            role: role.to_string(),
        };
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let targets = targets.join(", ");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: nat\n    static_configs:\n      - targets: [{targets}]\n"
        );
        let config_path = p.dir.join("prometheus.yml");
        std::fs::write(&config_path, config).context("writing prometheus.yml")?;
        let log = std::fs::File::create(p.dir.join("log")).context("prometheus log")?;
        let mut cmd = ns.command(
            role,
            &[
                "prometheus",
                &format!("--config.file={}", config_path.display()),
                &format!("--storage.tsdb.path={}", p.dir.join("data").display()),
                &format!("--web.listen-address={API}"),
            ],
        );
        cmd.stdout(Stdio::null()).stderr(log);
        p.child = Some(ns.spawn_command(&mut cmd).context("starting prometheus")?);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if http_get_in(ns, role, API, "/-/ready").is_ok_and(|(code, _)| code == 200) {
                return Ok(p);
            }
            if Instant::now() > deadline {
                bail!("prometheus did not become ready; its log:\n{}", p.log());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// What Prometheus logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    /// The value of instant query `promql`: the first series' value, or
    /// `None` when the result is empty.
    pub fn query(&self, lab: &Lab, promql: &str) -> Result<Option<f64>> {
        self.query_in(lab.namespaces(), promql)
    }

    /// [`Prometheus::query`] for a Prometheus started with
    /// [`Prometheus::start_in`] in `ns`.
    pub fn query_in(&self, ns: &Namespaces, promql: &str) -> Result<Option<f64>> {
        let path = format!("/api/v1/query?query={}", urlencode(promql));
        let (code, body) = http_get_in(ns, &self.role, API, &path)?;
        let v: serde_json::Value = serde_json::from_str(&body)
            .with_context(|| format!("prometheus answered {code}: {body}"))?;
        if v["status"] != "success" {
            bail!("query {promql}: {body}");
        }
        let result = &v["data"]["result"];
        let first = match v["data"]["resultType"].as_str() {
            Some("vector") => result.get(0).map(|s| &s["value"][1]),
            Some("scalar") => Some(&result[1]),
            _ => bail!("query {promql}: unexpected result {body}"),
        };
        match first {
            None => Ok(None),
            Some(s) => {
                let s = s.as_str().context("a sample value is a string")?;
                Ok(Some(s.parse().with_context(|| format!("sample {s}"))?))
            }
        }
    }

    /// Waits up to `timeout` for `promql` to have a value that `ok`
    /// accepts; returns it, or an error with the last value seen.
    pub fn wait_for(
        &self,
        lab: &Lab,
        promql: &str,
        ok: impl Fn(f64) -> bool,
        timeout: Duration,
    ) -> Result<f64> {
        self.wait_for_in(lab.namespaces(), promql, ok, timeout)
    }

    /// [`Prometheus::wait_for`] in `ns`.
    pub fn wait_for_in(
        &self,
        ns: &Namespaces,
        promql: &str,
        ok: impl Fn(f64) -> bool,
        timeout: Duration,
    ) -> Result<f64> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.query_in(ns, promql) {
                Ok(Some(v)) if ok(v) => return Ok(v),
                Ok(v) => format!("{v:?}"),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() > deadline {
                bail!("{promql}: no acceptable value within {timeout:?}; last: {last}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.terminate(Duration::from_secs(5));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `GET path` from `host` to `to` (HTTP/1.0, 5 s at most): the status
/// code and the body.
pub fn http_get(lab: &Lab, host: Host, to: SocketAddrV4, path: &str) -> Result<(u16, String)> {
    http_get_in(lab.namespaces(), host.role(), to, path)
}

/// [`http_get`] from namespace `role` of `ns`.
pub fn http_get_in(
    ns: &Namespaces,
    role: &str,
    to: SocketAddrV4,
    path: &str,
) -> Result<(u16, String)> {
    let path = path.to_string();
    ns.in_ns(role, move || -> Result<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&to.into(), Duration::from_secs(2))
            .with_context(|| format!("connecting to {to}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {to}\r\n\r\n")?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("no HTTP status from {to}: {head}"))?;
        Ok((code, body.to_string()))
    })?
}

//! Azure Scheduled Events: the platform's notice, minutes ahead, that it
//! will take this VM away (a scale set scaling in, a spot eviction, a
//! reboot or redeploy for maintenance). With `--scheduled-events` the loader
//! polls the instance metadata service and treats such a notice like a
//! SIGTERM that arrives early enough: it drains (probe closed, forwarding
//! on for `--drain-seconds`), then approves the event so the platform goes
//! ahead at once instead of waiting out the notice, and shuts down.
//!
//! Only plain HTTP to the link-local metadata address is spoken, so a small
//! HTTP/1.1 client suffices; the documents are parsed with serde_json.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::watch,
    task::JoinHandle,
};
use tracing::{info, warn};

/// The metadata service's Scheduled Events endpoint.
pub const DEFAULT_URL: &str =
    "http://169.254.169.254/metadata/scheduledevents?api-version=2020-07-01";
/// How often the document is read. The shortest notice (a spot eviction)
/// is 30 s; a second is what Azure's documentation suggests.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// One request's limit: the service is local, an answer is quick or lost.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// An event that takes this VM away.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Departure {
    pub id: String,
    /// Terminate, Preempt, Reboot or Redeploy.
    pub kind: String,
    /// When the platform goes ahead without our approval (RFC 1123 time,
    /// as the service writes it; empty once the event has started).
    pub not_before: String,
}

/// A running watch of the Scheduled Events: a task polls the document every
/// [`POLL_INTERVAL`] and publishes the first event that takes this VM away.
/// Dropping the watch stops the task.
pub struct Watch {
    imds: Imds,
    departure: watch::Receiver<Option<Departure>>,
    task: JoinHandle<()>,
}

impl Watch {
    /// Asks the metadata service at `url` for this VM's name (an error if
    /// it does not answer), then starts polling.
    pub async fn start(url: &str) -> Result<Watch> {
        let imds = Imds::new(url)?;
        let vm = imds.vm_name().await?;
        info!(vm = %vm, url = %url, "watching scheduled events");
        let (tx, departure) = watch::channel(None);
        let task = tokio::spawn(poll(imds.clone(), vm, tx));
        Ok(Watch {
            imds,
            departure,
            task,
        })
    }

    /// The next change of the event that takes this VM away (`None`: there
    /// is no such event any more).
    pub async fn changed(&mut self) -> Option<Departure> {
        if self.departure.changed().await.is_err() {
            // The poller is gone (it never returns; only at shutdown).
            return std::future::pending().await;
        }
        self.departure.borrow_and_update().clone()
    }

    /// Approves event `id`: the platform goes ahead now.
    pub async fn approve(&self, id: &str) -> Result<()> {
        self.imds.approve(id).await
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Publishes the first event of the document that takes VM `vm` away (or
/// `None`), every [`POLL_INTERVAL`]. Read errors are logged once per outage
/// and retried: a metadata service that is briefly away must not take the
/// gateway down.
async fn poll(imds: Imds, vm: String, tx: watch::Sender<Option<Departure>>) {
    let mut tick = tokio::time::interval(POLL_INTERVAL);
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
                let next = departures(&doc, &vm).into_iter().next();
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

/// The events of `doc` (a Scheduled Events document) that take the VM
/// named `vm` away. Freeze (a pause of a few seconds, the VM and its
/// flows stay) is not one: draining for it would move flows for nothing.
pub fn departures(doc: &Value, vm: &str) -> Vec<Departure> {
    let Some(events) = doc.get("Events").and_then(Value::as_array) else {
        return Vec::new();
    };
    events
        .iter()
        .filter(|e| {
            matches!(
                e.get("EventType").and_then(Value::as_str),
                Some("Terminate" | "Preempt" | "Reboot" | "Redeploy")
            )
        })
        .filter(|e| {
            e.get("Resources")
                .and_then(Value::as_array)
                .is_some_and(|r| r.iter().any(|n| n.as_str() == Some(vm)))
        })
        .filter_map(|e| {
            Some(Departure {
                id: e.get("EventId")?.as_str()?.to_string(),
                kind: e.get("EventType")?.as_str()?.to_string(),
                not_before: e
                    .get("NotBefore")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
            })
        })
        .collect()
}

/// The body that approves event `id` (lets the platform start it now).
pub fn approval(id: &str) -> String {
    serde_json::json!({ "StartRequests": [{ "EventId": id }] }).to_string()
}

/// The metadata service as the loader talks to it.
#[derive(Clone, Debug)]
pub struct Imds {
    /// `host:port` to connect to.
    authority: String,
    /// The Scheduled Events path and query.
    events_path: String,
}

impl Imds {
    /// From the Scheduled Events URL (`http://host[:port]/path?query`).
    pub fn new(url: &str) -> Result<Imds> {
        let rest = url
            .strip_prefix("http://")
            .with_context(|| format!("{url}: only http:// URLs (the metadata service's)"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() {
            bail!("{url}: no host");
        }
        let authority = if authority.contains(':') {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        Ok(Imds {
            authority,
            events_path: path.to_string(),
        })
    }

    /// The VM's name as Scheduled Events lists it (compute/name).
    pub async fn vm_name(&self) -> Result<String> {
        let body = self
            .request(
                "GET",
                "/metadata/instance/compute/name?api-version=2021-02-01&format=text",
                None,
            )
            .await
            .context("asking the metadata service for this VM's name")?;
        let name = body.trim().to_string();
        if name.is_empty() {
            bail!("the metadata service gave an empty VM name");
        }
        Ok(name)
    }

    /// The current Scheduled Events document.
    pub async fn events(&self) -> Result<Value> {
        let body = self.request("GET", &self.events_path, None).await?;
        serde_json::from_str(&body).context("the Scheduled Events document is not JSON")
    }

    /// Approves event `id`.
    pub async fn approve(&self, id: &str) -> Result<()> {
        self.request("POST", &self.events_path, Some(&approval(id)))
            .await
            .map(drop)
    }

    async fn request(&self, method: &str, path: &str, body: Option<&str>) -> Result<String> {
        let exchange = async {
            let mut s = TcpStream::connect(&self.authority)
                .await
                .with_context(|| format!("connecting to {}", self.authority))?;
            let body = body.unwrap_or("");
            let head = format!(
                "{method} {path} HTTP/1.1\r\nHost: {}\r\nMetadata: true\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n",
                self.authority,
                body.len()
            );
            s.write_all(head.as_bytes()).await?;
            s.write_all(body.as_bytes()).await?;
            let mut raw = Vec::new();
            s.read_to_end(&mut raw).await?;
            anyhow::Ok(raw)
        };
        let raw = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .with_context(|| format!("{method} {path}: no answer within {REQUEST_TIMEOUT:?}"))??;
        response_body(&raw).with_context(|| format!("{method} {path}"))
    }
}

/// The body of a raw HTTP/1.x response if its status is 2xx (plain,
/// Content-Length or chunked).
pub fn response_body(raw: &[u8]) -> Result<String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("truncated HTTP response")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let body = &raw[split + 4..];
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok())
        .context("no HTTP status line")?;
    if !(200..300).contains(&status) {
        bail!("HTTP status {status}");
    }
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    String::from_utf8(body).context("the answer is not UTF-8")
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("truncated chunk size")?;
        let size = std::str::from_utf8(&b[..eol])?
            .split(';')
            .next()
            .unwrap_or("")
            .trim();
        let size = usize::from_str_radix(size, 16).context("bad chunk size")?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if b.len() < size + 2 {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> Value {
        serde_json::json!({
            "DocumentIncarnation": 3,
            "Events": [
                {"EventId": "f1", "EventType": "Freeze", "ResourceType": "VirtualMachine",
                 "Resources": ["nat_1"], "EventStatus": "Scheduled", "NotBefore": "x"},
                {"EventId": "t1", "EventType": "Terminate", "ResourceType": "VirtualMachine",
                 "Resources": ["nat_0", "nat_1"], "EventStatus": "Scheduled",
                 "NotBefore": "Mon, 19 Sep 2016 18:29:47 GMT"},
                {"EventId": "r2", "EventType": "Reboot", "ResourceType": "VirtualMachine",
                 "Resources": ["nat_2"], "EventStatus": "Scheduled", "NotBefore": ""}
            ]
        })
    }

    #[test]
    fn terminate_of_this_vm_is_a_departure_and_freeze_is_not() {
        let d = departures(&doc(), "nat_1");
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].id, "t1");
        assert_eq!(d[0].kind, "Terminate");
        assert_eq!(d[0].not_before, "Mon, 19 Sep 2016 18:29:47 GMT");
    }

    #[test]
    fn events_of_other_vms_are_not_ours() {
        assert!(departures(&doc(), "nat_9").is_empty());
        assert_eq!(departures(&doc(), "nat_2")[0].kind, "Reboot");
    }

    #[test]
    fn an_empty_or_odd_document_has_no_departures() {
        assert!(departures(&serde_json::json!({"Events": []}), "a").is_empty());
        assert!(departures(&serde_json::json!({"x": 1}), "a").is_empty());
        let no_id = serde_json::json!({"Events": [{"EventType": "Terminate", "Resources": ["a"]}]});
        assert!(departures(&no_id, "a").is_empty());
    }

    #[test]
    fn approval_names_the_event() {
        let v: Value = serde_json::from_str(&approval("t1")).expect("json");
        assert_eq!(v["StartRequests"][0]["EventId"], "t1");
    }

    #[test]
    fn url_gives_authority_and_path() {
        let i = Imds::new(DEFAULT_URL).expect("url");
        assert_eq!(i.authority, "169.254.169.254:80");
        assert_eq!(
            i.events_path,
            "/metadata/scheduledevents?api-version=2020-07-01"
        );
        let i = Imds::new("http://127.0.0.1:8080/se").expect("url");
        assert_eq!(i.authority, "127.0.0.1:8080");
        assert!(Imds::new("https://x/").is_err());
        assert!(Imds::new("http:///x").is_err());
    }

    #[test]
    fn response_bodies_plain_and_chunked() {
        let plain = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok";
        assert_eq!(response_body(plain).expect("plain"), "ok");
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        assert_eq!(response_body(chunked).expect("chunked"), "abcde");
        assert!(response_body(b"HTTP/1.1 404 Not Found\r\n\r\n").is_err());
        assert!(response_body(b"HTTP/1.1 200 OK\r\n").is_err());
        let cut = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n9\r\nabc";
        assert!(response_body(cut).is_err());
    }
}

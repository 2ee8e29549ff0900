//! The failover lab: NAT instances behind an emulated Azure internal load
//! balancer, each running the real loader.
//!
//! ```text
//! client 10.9.0.2 -- lb (10.9.0.1 | 10.1.0.254, lo 168.63.129.16)
//!                     \-- sw br-int -- natI int 10.1.0.(1+I)   (I = 0..n)
//!                         sw br-ext -- natI ext 192.0.2.(2+I) -- router 192.0.2.1 | 198.51.100.1 -- server 198.51.100.10
//! ```
//!
//! The `lb` namespace does what Azure's load balancer does for the NAT
//! instances: its default route is ECMP over the healthy instances' internal
//! addresses with L4 hashing (`fib_multipath_hash_policy=1`), so new flows
//! spread; established flows stay on the instance they started on (the
//! load balancer's flow table: here conntrack marks and a routing table
//! per instance), also when that instance is taken out; and a [`Prober`]
//! connects to each instance's probe port from 168.63.129.16 every second,
//! taking an instance out after two failures and back in after two
//! successes. The instances reach the client's network (an `--internal-cidr`)
//! and answer probes through `lb` (their `--int-gateway`), so policy routing
//! is part of what is tested. Each instance has its own SNAT address on the
//! router's subnet, so the server's replies go back to the right one.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::netns::{Namespaces, connect};
use crate::probers::AZURE_PROBE_IP;
use crate::{EXT_IF, Gateway, INT_IF, SERVER_IP, loader_path};

pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 2);
/// The client's network: an inside prefix beyond the instances' subnet.
pub const CLIENT_NET: &str = "10.9.0.0/24";
/// The load balancer's address on the instances' subnet: their internal
/// gateway, as the subnet's .1 is in Azure.
pub const LB_INT_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 254);
/// The echo service on the server the flows use.
pub const ECHO_PORT: u16 = 7000;
/// The loader's default `--probe-port`.
pub const PROBE_PORT: u16 = 9999;

/// Instance `i`'s internal address (the load balancer's next hop).
pub fn int_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 1, 0, 1 + i as u8)
}

/// Instance `i`'s external (SNAT) address.
pub fn ext_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, 2 + i as u8)
}

/// The instance whose SNAT address is `ip`.
pub fn instance_of(ip: Ipv4Addr, n: usize) -> Option<usize> {
    (0..n).find(|&i| ext_ip(i) == ip)
}

/// How the prober probes: Azure's defaults are 5 s and 2 probes; the
/// issue asks for 1 s.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
pub const PROBE_THRESHOLD: u32 = 2;

/// The lab; dropping it stops the prober, the loaders, the echo server and
/// removes every namespace.
pub struct FailoverLab {
    // Fields drop in this order: threads and loaders before namespaces.
    prober: Option<Prober>,
    gateways: Vec<Option<Gateway>>,
    echo: Option<Echo>,
    ns: Namespaces,
    n: usize,
}

impl FailoverLab {
    /// Builds the lab with `n` instances (no loaders yet).
    pub fn new(n: usize) -> Result<FailoverLab> {
        if !(1..=8).contains(&n) {
            bail!("1 to 8 instances");
        }
        let mut lab = FailoverLab {
            prober: None,
            gateways: (0..n).map(|_| None).collect(),
            echo: None,
            ns: Namespaces::new("f"),
            n,
        };
        lab.build().context("building the failover lab")?;
        Ok(lab)
    }

    fn build(&mut self) -> Result<()> {
        let n = self.n;
        let nats: Vec<String> = (0..n).map(|i| format!("nat{i}")).collect();
        for r in ["client", "lb", "sw", "router", "server"] {
            self.ns.add(r)?;
        }
        for nat in &nats {
            self.ns.add(nat)?;
        }
        let ns = &self.ns;
        ns.veth("client", "eth0", "lb", "lb-c")?;
        ns.veth("lb", "lb-int", "sw", "sw-lb")?;
        ns.veth("router", "r-nat", "sw", "sw-r")?;
        ns.veth("router", "r-srv", "server", "eth0")?;
        let (mut int_ports, mut ext_ports) = (vec!["sw-lb".to_string()], vec!["sw-r".to_string()]);
        for (i, nat) in nats.iter().enumerate() {
            let (pi, px) = (format!("sw-i{i}"), format!("sw-x{i}"));
            ns.veth(nat, "int", "sw", &pi)?;
            ns.veth(nat, "ext", "sw", &px)?;
            int_ports.push(pi);
            ext_ports.push(px);
        }
        for (br, ports) in [("br-int", &int_ports), ("br-ext", &ext_ports)] {
            let ports: Vec<&str> = ports.iter().map(String::as_str).collect();
            ns.bridge("sw", br, &ports)?;
        }
        for (i, nat) in nats.iter().enumerate() {
            // A cloud network delivers a frame only to the VM it is for.
            // A learning bridge floods a frame for a MAC it has forgotten
            // (a port that went down) to every port, and XDP sees frames
            // whatever their destination MAC, so without this the other
            // instances would translate the dead one's traffic.
            // And it knows where each VM is: static entries, which the
            // bridge keeps when a port goes down, so a frame for a stopped
            // instance is dropped and one for a restarted instance
            // arrives without waiting for the bridge to learn its MAC.
            for (p, dev) in [(&int_ports[1 + i], "int"), (&ext_ports[1 + i], "ext")] {
                ns.exec("sw", &["bridge", "link", "set", "dev", p, "flood", "off"])?;
                let mac = ns.read_sys(nat, dev, "address")?;
                let fdb = [
                    "bridge", "fdb", "replace", &mac, "dev", p, "master", "static",
                ];
                ns.exec("sw", &fdb)?;
            }
            ns.addr(nat, "int", &format!("{}/24", int_ip(i)))?;
            ns.addr(nat, "ext", &format!("{}/24", ext_ip(i)))?;
            ns.ip(
                nat,
                &["route", "add", "default", "via", "192.0.2.1", "dev", "ext"],
            )?;
            ns.sysctl(nat, "net/ipv4/ip_forward", "1")?;
        }
        // Endpoints verify every checksum: the last hop before them
        // completes partial ones in software.
        ns.ethtool("lb", "lb-c", &["tx", "off"])?;
        ns.ethtool("router", "r-srv", &["tx", "off"])?;

        ns.addr("client", "eth0", "10.9.0.2/24")?;
        ns.ip("client", &["route", "add", "default", "via", "10.9.0.1"])?;
        ns.addr("lb", "lb-c", "10.9.0.1/24")?;
        ns.addr("lb", "lb-int", "10.1.0.254/24")?;
        ns.addr("lb", "lo", "168.63.129.16/32")?;
        ns.sysctl("lb", "net/ipv4/ip_forward", "1")?;
        ns.sysctl("lb", "net/ipv4/fib_multipath_hash_policy", "1")?;
        // No instance is healthy until probed.
        ns.ip("lb", &["route", "add", "blackhole", "default"])?;
        self.flow_affinity()?;

        ns.addr("router", "r-nat", "192.0.2.1/24")?;
        ns.addr("router", "r-srv", "198.51.100.1/24")?;
        ns.sysctl("router", "net/ipv4/ip_forward", "1")?;
        ns.addr("server", "eth0", "198.51.100.10/24")?;
        ns.ip(
            "server",
            &["route", "add", "default", "via", "198.51.100.1"],
        )?;
        ns.settle()
    }

    /// Flow affinity in `lb`: a new flow's next hop is remembered in its
    /// conntrack mark; later packets from the client follow the mark's
    /// table to the same instance, whatever the ECMP route says now.
    fn flow_affinity(&self) -> Result<()> {
        let ns = &self.ns;
        let mut elements = Vec::new();
        for i in 0..self.n {
            let table = (101 + i).to_string();
            let mark = (1 + i).to_string();
            let hop = int_ip(i).to_string();
            let route = ["route", "add", "default", "via", &hop, "dev", "lb-int"];
            ns.ip("lb", &[&route[..], &["table", &table]].concat())?;
            let rule = ["rule", "add", "fwmark", &mark, "lookup", &table];
            ns.ip("lb", &[&rule[..], &["pref", "100"]].concat())?;
            elements.push(format!("{hop} : {mark}"));
        }
        let ruleset = format!(
            "table ip lb {{\n\
               map hop2mark {{ type ipv4_addr : mark; elements = {{ {} }} }}\n\
               chain pre {{ type filter hook prerouting priority mangle; iifname \"lb-c\" ct state established,related meta mark set ct mark; }}\n\
               chain post {{ type filter hook postrouting priority mangle; ct state new ct mark set rt ip nexthop map @hop2mark; }}\n\
             }}\n",
            elements.join(", ")
        );
        let path = std::env::temp_dir().join(format!("{}-lb.nft", ns.ns("lb")));
        std::fs::write(&path, ruleset).context("writing the nft ruleset")?;
        let r = ns.exec("lb", &["nft", "-f", &path.to_string_lossy()]);
        let _ = std::fs::remove_file(&path);
        r.context("loading the load balancer's nft ruleset (nftables installed?)")?;
        Ok(())
    }

    pub fn instances(&self) -> usize {
        self.n
    }

    pub fn namespaces(&self) -> &Namespaces {
        &self.ns
    }

    /// The loader flags every instance gets: the load balancer is its
    /// internal gateway, the client's network an internal prefix.
    pub fn loader_args(extra: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = [
            "--int-gateway",
            "10.1.0.254",
            "--internal-cidr",
            CLIENT_NET,
            "--stats-interval",
            "0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }

    /// Starts the real loader on instance `i` and waits until it is ready.
    pub fn start_instance(&mut self, i: usize, extra: &[&str]) -> Result<()> {
        let args = FailoverLab::loader_args(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let nat = format!("nat{i}");
        let gw = Gateway::start_in(&self.ns, &nat, &loader_path()?, (INT_IF, EXT_IF), &args)
            .with_context(|| format!("starting the loader of {nat}"))?;
        self.gateways[i] = Some(gw);
        Ok(())
    }

    pub fn gateway(&self, i: usize) -> Option<&Gateway> {
        self.gateways[i].as_ref()
    }

    /// Takes instance `i`'s loader out of the lab (to wait for it, say).
    pub fn take_gateway(&mut self, i: usize) -> Option<Gateway> {
        self.gateways[i].take()
    }

    /// Starts the echo server on the server and the load balancer's prober.
    pub fn start_services(&mut self) -> Result<()> {
        self.echo = Some(Echo::start(&self.ns)?);
        self.prober = Some(Prober::start(&self.ns, self.n)?);
        Ok(())
    }

    pub fn prober(&self) -> &Prober {
        self.prober.as_ref().expect("start_services first")
    }

    /// Waits until the prober has every instance in `want` (and no other).
    pub fn wait_in_rotation(&self, want: &[usize], timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.prober().in_rotation();
            if now == want {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "instances in rotation: {now:?}, wanted {want:?} within {timeout:?}; events:\n{}",
                    self.prober().events_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// "Stops the VM": both of instance `i`'s links lose carrier.
    pub fn links_down(&self, i: usize) -> Result<()> {
        for p in [format!("sw-i{i}"), format!("sw-x{i}")] {
            self.ns.ip("sw", &["link", "set", &p, "down"])?;
        }
        Ok(())
    }

    /// "Starts the VM again".
    pub fn links_up(&self, i: usize) -> Result<()> {
        for p in [format!("sw-i{i}"), format!("sw-x{i}")] {
            self.ns.ip("sw", &["link", "set", &p, "up"])?;
        }
        Ok(())
    }

    fn echo(&self) -> &Echo {
        self.echo.as_ref().expect("start_services first")
    }

    /// One new connection from the client to the echo service: returns the
    /// instance that carried it.
    pub fn new_connection(&self, timeout: Duration) -> Result<usize> {
        let echo = self.echo();
        let id = echo.next_id();
        let n = self.n;
        let seen = Arc::clone(&echo.seen);
        self.ns
            .in_ns("client", move || one_exchange(id, &seen, n, timeout))?
    }

    /// `count` new connections; how many each instance carried.
    pub fn spread(&self, count: usize) -> Result<Vec<usize>> {
        let mut per = vec![0; self.n];
        for _ in 0..count {
            per[self.new_connection(Duration::from_secs(2))?] += 1;
        }
        Ok(per)
    }

    /// Starts `count` long-lived flows, each exchanging a message every
    /// 100 ms until stopped; waits until all are established.
    pub fn long_flows(&self, count: usize) -> Result<LongFlows> {
        let echo = self.echo();
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let mut ids = Vec::new();
        let mut counters = Vec::new();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        for _ in 0..count {
            let id = echo.next_id();
            ids.push(id);
            let stop = Arc::clone(&stop);
            let ready = ready_tx.clone();
            let count = Arc::new(AtomicU64::new(0));
            counters.push(Arc::clone(&count));
            threads.push(
                self.ns
                    .spawn_thread("client", move || long_flow(id, &stop, &count, ready)),
            );
        }
        for _ in 0..count {
            ready_rx
                .recv_timeout(Duration::from_secs(10))
                .context("a long-lived flow did not start")?
                .context("starting a long-lived flow")?;
        }
        let seen = echo.seen.lock().map(|m| m.clone()).unwrap_or_default();
        let instance = ids
            .iter()
            .map(|id| seen.get(id).and_then(|ip| instance_of(*ip, self.n)))
            .collect();
        Ok(LongFlows {
            stop,
            threads,
            counters,
            instance,
            started: Instant::now(),
        })
    }

    /// Attempts a new connection every 50 ms for `duration`; each attempt
    /// gets `timeout`. Returns (start offset, carried by) per attempt.
    pub fn attempts(
        &self,
        duration: Duration,
        timeout: Duration,
    ) -> Result<Vec<(Duration, Option<usize>)>> {
        let start = Instant::now();
        let mut out = Vec::new();
        while start.elapsed() < duration {
            let t = start.elapsed();
            out.push((t, self.new_connection(timeout).ok()));
            let next = t + Duration::from_millis(50);
            if let Some(wait) = next.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        Ok(out)
    }
}

/// The echo server: the first line of a connection is its id; it records
/// which address (instance) the id came from and echoes everything.
struct Echo {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<HashMap<u64, Ipv4Addr>>>,
    next: AtomicU64,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Echo {
    fn start(ns: &Namespaces) -> Result<Echo> {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(HashMap::new()));
        let listener = ns.in_ns("server", || {
            TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, ECHO_PORT))
        })??;
        listener.set_nonblocking(true)?;
        let (s, m) = (Arc::clone(&stop), Arc::clone(&seen));
        let thread = std::thread::spawn(move || -> Result<()> {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, peer)) => {
                        let (s, m) = (Arc::clone(&s), Arc::clone(&m));
                        std::thread::spawn(move || echo_conn(conn, peer, &s, &m));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(())
        });
        Ok(Echo {
            stop,
            seen,
            next: AtomicU64::new(1),
            thread: Some(thread),
        })
    }

    fn next_id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn echo_conn(
    conn: std::net::TcpStream,
    peer: std::net::SocketAddr,
    stop: &AtomicBool,
    seen: &Mutex<HashMap<u64, Ipv4Addr>>,
) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
    let Ok(mut w) = conn.try_clone() else { return };
    let mut r = BufReader::new(conn);
    let mut line = String::new();
    // The id line (retried across read timeouts).
    loop {
        match r.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) if line.ends_with('\n') => break,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
            }
            Err(_) => return,
        }
    }
    if let (Ok(id), std::net::SocketAddr::V4(p)) = (line.trim().parse::<u64>(), peer)
        && let Ok(mut m) = seen.lock()
    {
        m.insert(id, *p.ip());
    }
    if w.write_all(line.as_bytes()).is_ok() {
        crate::streams::echo(&mut r, &mut w, stop);
    }
}

/// Connect, send the id, read it back: the whole path works both ways.
fn one_exchange(
    id: u64,
    seen: &Mutex<HashMap<u64, Ipv4Addr>>,
    n: usize,
    timeout: Duration,
) -> Result<usize> {
    let dst = SocketAddrV4::new(SERVER_IP, ECHO_PORT);
    let mut s = connect(None, dst, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    let msg = format!("{id}\n");
    s.write_all(msg.as_bytes())?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).context("reading the echo")?;
    if back != msg.as_bytes() {
        bail!("echo mismatch");
    }
    let ip = seen
        .lock()
        .ok()
        .and_then(|m| m.get(&id).copied())
        .context("the server did not record the connection")?;
    instance_of(ip, n).with_context(|| format!("the server saw {ip}, not an instance's address"))
}

fn long_flow(
    id: u64,
    stop: &AtomicBool,
    count: &AtomicU64,
    ready: std::sync::mpsc::Sender<Result<()>>,
) -> Result<FlowResult> {
    let start = |id: u64| -> Result<std::net::TcpStream> {
        let dst = SocketAddrV4::new(SERVER_IP, ECHO_PORT);
        let mut s = connect(None, dst, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        let msg = format!("{id}\n");
        s.write_all(msg.as_bytes())?;
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back)?;
        Ok(s)
    };
    let mut s = match start(id) {
        Ok(s) => {
            let _ = ready.send(Ok(()));
            s
        }
        Err(e) => {
            let _ = ready.send(Err(anyhow::anyhow!("{e:#}")));
            return Err(e);
        }
    };
    let t0 = Instant::now();
    let mut exchanges = 0u64;
    let mut payload = [0u8; 64];
    while !stop.load(Ordering::Relaxed) {
        payload[..8].copy_from_slice(&exchanges.to_be_bytes());
        let r = s.write_all(&payload).and_then(|_| {
            let mut back = [0u8; 64];
            s.read_exact(&mut back).map(|_| back)
        });
        match r {
            Ok(back) if back == payload => {
                exchanges += 1;
                count.store(exchanges, Ordering::Relaxed);
            }
            Ok(_) => {
                return Ok(FlowResult {
                    exchanges,
                    broke_at: Some(Instant::now()),
                    error: Some((t0.elapsed(), "echo mismatch".into())),
                });
            }
            Err(e) => {
                return Ok(FlowResult {
                    exchanges,
                    broke_at: Some(Instant::now()),
                    error: Some((t0.elapsed(), e.to_string())),
                });
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(FlowResult {
        exchanges,
        broke_at: None,
        error: None,
    })
}

/// How one long-lived flow ended.
#[derive(Clone, Debug)]
pub struct FlowResult {
    pub exchanges: u64,
    /// When it broke, if it did.
    pub broke_at: Option<Instant>,
    /// When (after the flow started) and how it broke.
    pub error: Option<(Duration, String)>,
}

/// Long-lived flows running in the background.
pub struct LongFlows {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Result<FlowResult>>>,
    counters: Vec<Arc<AtomicU64>>,
    /// The instance that carries each flow.
    pub instance: Vec<Option<usize>>,
    pub started: Instant,
}

impl LongFlows {
    /// Messages each flow has exchanged so far.
    pub fn exchanges(&self) -> Vec<u64> {
        self.counters
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// Stops the flows; each flow's instance and result.
    pub fn finish(self) -> Vec<(Option<usize>, FlowResult)> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .zip(self.instance)
            .map(|(t, inst)| {
                let r = match t.join() {
                    Ok(Ok(r)) => r,
                    Ok(Err(e)) => FlowResult {
                        exchanges: 0,
                        broke_at: Some(Instant::now()),
                        error: Some((Duration::ZERO, format!("{e:#}"))),
                    },
                    Err(_) => FlowResult {
                        exchanges: 0,
                        broke_at: Some(Instant::now()),
                        error: Some((Duration::ZERO, "flow thread panicked".into())),
                    },
                };
                (inst, r)
            })
            .collect()
    }
}

/// A change of the load balancer's view of an instance.
#[derive(Clone, Debug)]
pub struct Event {
    pub at: Instant,
    pub instance: usize,
    pub up: bool,
}

struct ProberState {
    up: Vec<bool>,
    events: Vec<Event>,
}

/// Azure's probe emulated: every [`PROBE_INTERVAL`] a TCP connect from
/// 168.63.129.16 to each instance's probe port; [`PROBE_THRESHOLD`]
/// results in a row change the instance's state, and the load balancer's
/// ECMP route is rewritten over the instances that are up.
pub struct Prober {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Result<()>>>,
    state: Arc<Mutex<ProberState>>,
}

impl Prober {
    fn start(ns: &Namespaces, n: usize) -> Result<Prober> {
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(Mutex::new(ProberState {
            up: vec![false; n],
            events: Vec::new(),
        }));
        let lb = ns.ns("lb");
        let mut threads = Vec::new();
        for i in 0..n {
            let (stop, state, lb) = (Arc::clone(&stop), Arc::clone(&state), lb.clone());
            threads.push(ns.spawn_thread("lb", move || probe_loop(i, &lb, &stop, &state)));
        }
        Ok(Prober {
            stop,
            threads,
            state,
        })
    }

    /// The instances in the load balancer's rotation now.
    pub fn in_rotation(&self) -> Vec<usize> {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (0..s.up.len()).filter(|&i| s.up[i]).collect()
    }

    pub fn events(&self) -> Vec<Event> {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.events.clone()
    }

    /// The first event for `instance` going `up` (or down) at or after `t`.
    pub fn event_after(&self, instance: usize, up: bool, t: Instant) -> Option<Instant> {
        self.events()
            .into_iter()
            .find(|e| e.instance == instance && e.up == up && e.at >= t)
            .map(|e| e.at)
    }

    pub fn events_text(&self) -> String {
        let ev = self.events();
        let Some(first) = ev.first().map(|e| e.at) else {
            return "  (none)".into();
        };
        ev.iter()
            .map(|e| {
                format!(
                    "  +{:>6.2}s nat{} {}",
                    (e.at - first).as_secs_f64(),
                    e.instance,
                    if e.up { "up: added" } else { "down: removed" }
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn probe_loop(i: usize, lb: &str, stop: &AtomicBool, state: &Mutex<ProberState>) -> Result<()> {
    let (mut ok_run, mut fail_run) = (0u32, 0u32);
    let src = SocketAddrV4::new(AZURE_PROBE_IP, 0);
    let dst = SocketAddrV4::new(int_ip(i), PROBE_PORT);
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        let ok = connect(Some(src), dst, PROBE_TIMEOUT).is_ok();
        if ok {
            ok_run += 1;
            fail_run = 0;
        } else {
            fail_run += 1;
            ok_run = 0;
        }
        {
            let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
            let change = if !s.up[i] && ok_run >= PROBE_THRESHOLD {
                Some(true)
            } else if s.up[i] && fail_run >= PROBE_THRESHOLD {
                Some(false)
            } else {
                None
            };
            if let Some(up) = change {
                s.up[i] = up;
                let healthy: Vec<usize> = (0..s.up.len()).filter(|&j| s.up[j]).collect();
                set_route(lb, &healthy)?;
                s.events.push(Event {
                    at: Instant::now(),
                    instance: i,
                    up,
                });
            }
        }
        while t.elapsed() < PROBE_INTERVAL && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

/// The load balancer's default route: ECMP over `healthy`, or a blackhole.
fn set_route(lb: &str, healthy: &[usize]) -> Result<()> {
    let mut args: Vec<String> = ["-n", lb, "route", "replace"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if healthy.is_empty() {
        args.extend(["blackhole".into(), "default".into()]);
    } else {
        args.push("default".into());
        for &i in healthy {
            args.extend([
                "nexthop".into(),
                "via".into(),
                int_ip(i).to_string(),
                "dev".into(),
                "lb-int".into(),
            ]);
        }
    }
    crate::netns::run(std::process::Command::new("ip").args(&args))?;
    Ok(())
}

/// What a failover drill measured (see [`drill`]).
#[derive(Clone, Debug)]
pub struct DrillReport {
    /// New connections per instance before the failure.
    pub spread_before: Vec<usize>,
    pub victim: usize,
    /// From the victim's links going down until the prober took it out.
    pub removed_after: Duration,
    /// From the links going down until new connections succeed again (every
    /// attempt from then on succeeded).
    pub failover: Duration,
    /// New connection attempts during the failure window, and how many failed.
    pub attempts: usize,
    pub failed_attempts: usize,
    /// Long-lived flows through the surviving instances, and those that broke.
    pub survivors: usize,
    pub survivors_broken: Vec<String>,
    /// Long-lived flows through the victim, and how many broke (lost with
    /// it, as with a VM).
    pub victims: usize,
    pub victims_broken: usize,
    /// From the links coming back until the prober added it again.
    pub rejoined_after: Duration,
    /// New connections per instance after the rejoin.
    pub spread_after: Vec<usize>,
    pub events: String,
}

/// The failover drill: flows spread over all instances; `victim`'s links
/// go down (a stopped VM) while long-lived flows run and new connections
/// are attempted every 50 ms; then it comes back and must get new flows
/// again. `lab` must have all instances started and in rotation.
pub fn drill(lab: &FailoverLab, victim: usize, flows: usize) -> Result<DrillReport> {
    let n = lab.instances();
    let spread_before = lab.spread(30).context("spreading new connections")?;
    let long = lab.long_flows(flows)?;
    std::thread::sleep(Duration::from_millis(500));

    let t0 = Instant::now();
    lab.links_down(victim)?;
    let attempts = lab.attempts(Duration::from_secs(5), Duration::from_millis(250))?;
    let removed = lab
        .prober()
        .event_after(victim, false, t0)
        .with_context(|| format!("the prober never took nat{victim} out"))?;
    let last_fail = attempts.iter().rposition(|(_, by)| by.is_none());
    let failover = match last_fail {
        Some(k) if k + 1 < attempts.len() => attempts[k + 1].0,
        Some(_) => bail!("new connections still fail 5 s after nat{victim} died"),
        None => Duration::ZERO,
    };
    let failed_attempts = attempts.iter().filter(|(_, by)| by.is_none()).count();

    let t1 = Instant::now();
    lab.links_up(victim)?;
    let all: Vec<usize> = (0..n).collect();
    lab.wait_in_rotation(&all, Duration::from_secs(10))?;
    let rejoined = lab
        .prober()
        .event_after(victim, true, t1)
        .context("no rejoin event")?;
    let spread_after = lab.spread(30)?;

    let results = long.finish();
    let mut survivors = 0;
    let mut survivors_broken = Vec::new();
    let mut victims = 0;
    let mut victims_broken = 0;
    for (k, (inst, r)) in results.iter().enumerate() {
        match inst {
            Some(i) if *i == victim => {
                victims += 1;
                victims_broken += usize::from(r.error.is_some());
            }
            Some(i) => {
                survivors += 1;
                if let Some((at, e)) = &r.error {
                    survivors_broken.push(format!(
                        "flow {k} via nat{i} broke after {at:.2?} ({} exchanges): {e}",
                        r.exchanges
                    ));
                }
            }
            None => survivors_broken.push(format!("flow {k}: instance unknown")),
        }
    }
    Ok(DrillReport {
        spread_before,
        victim,
        removed_after: removed - t0,
        failover,
        attempts: attempts.len(),
        failed_attempts,
        survivors,
        survivors_broken,
        victims,
        victims_broken,
        rejoined_after: rejoined - t1,
        spread_after,
        events: lab.prober().events_text(),
    })
}

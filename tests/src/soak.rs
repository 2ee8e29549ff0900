//! The soak (`cargo xtask soak [--minutes N]`, and a short mode in the
//! tests): mixed traffic through the real loader in a lab for a long
//! while, with the loader handed over (SIGUSR2, then a new loader adopts),
//! killed (SIGKILL, then a new loader adopts), the gateway's links flapped
//! (their peers down for a second) and the table pressed (a flood of new
//! flows up to 90 % of `--max-flows`), one after the other at intervals.
//!
//! The traffic: TCP echo streams checking every byte ([`EchoStreams`]);
//! new UDP flows at a steady rate (a new socket, so a new source port,
//! for each datagram); big UDP datagrams that the sender fragments, echoed
//! whole and checked; pings.
//!
//! What passes:
//!
//! - **No stream corrupted or broken:** every TCP stream runs to the end
//!   with every byte as sent, and no UDP echo (small or fragmented) comes
//!   back different from what was sent. Datagrams may be lost while a
//!   link is down: counted, and at least 80 % of each kind answered.
//! - **No map entry leaked.** A leak is an entry nothing will remove: (1)
//!   a session without its binding both ways or half a binding
//!   ([`Tables::inconsistencies`]) that is still there in a second look 2 s
//!   later (the dataplane and the sweeper change the tables while they are
//!   read, so a single snapshot can catch a pair half-made), checked every
//!   10 s and at the end; (2) anything left in the tables once the traffic
//!   has stopped and every timeout and hold has passed (the soak runs the
//!   loader with 5-second timeouts and a 2-second port hold, so the tables
//!   must be empty within 30 s).
//! - **Loader memory flat:** each loader process's RSS is sampled every
//!   second; one that ran at least 30 s is flat when the median of its
//!   last five samples is at most 2 MiB above the median of its samples
//!   from its 5th to its 15th second (after start-up).

use std::{
    fmt,
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    Bpffs, CLIENT2_IP, EchoStreams, Gateway, Host, Lab, ROUTER_NAT_IF, SERVER_IP, SW_NAT_PORT,
    StreamReport, flood::syn_flood, ping, tables::Tables,
};

/// How long, and how often something happens to the gateway.
#[derive(Clone, Debug)]
pub struct Plan {
    pub duration: Duration,
    /// Between two events ([`Event`]), in turn.
    pub every: Duration,
    /// The last events end this long before the traffic stops, so the last
    /// loader runs long enough for its memory to be judged.
    pub quiet_end: Duration,
    pub max_flows: u32,
    pub streams: usize,
}

impl Plan {
    /// About a minute and a half in all, each kind of event once: the
    /// test suite's run.
    pub fn short() -> Plan {
        Plan {
            duration: Duration::from_secs(75),
            every: Duration::from_secs(8),
            quiet_end: Duration::from_secs(32),
            max_flows: 2048,
            streams: 6,
        }
    }

    /// `minutes` of it, an event a minute.
    pub fn minutes(minutes: u64) -> Plan {
        Plan {
            duration: Duration::from_secs(minutes * 60),
            every: Duration::from_secs(60),
            quiet_end: Duration::from_secs(40),
            max_flows: 8192,
            streams: 12,
        }
    }
}

/// What happens to the gateway, in this order, round and round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// SIGUSR2 (the loader exits, the dataplane stays), a new loader adopts.
    Handover,
    /// `ext`'s peer down for a second, then up.
    FlapExt,
    /// SIGKILL, a new loader adopts.
    Kill,
    /// `int`'s peer down for a second, then up.
    FlapInt,
    /// New TCP flows, each a SYN, up to 90 % of `--max-flows`.
    Flood,
}

impl Event {
    const CYCLE: [Event; 5] = [
        Event::Handover,
        Event::FlapExt,
        Event::Kill,
        Event::FlapInt,
        Event::Flood,
    ];
}

/// One loader process's memory over its life.
#[derive(Clone, Debug)]
pub struct LoaderMemory {
    pub pid: u32,
    /// (seconds since the process was first sampled, RSS in KiB)
    pub samples: Vec<(f64, u64)>,
}

impl LoaderMemory {
    fn median(mut v: Vec<u64>) -> Option<u64> {
        v.sort_unstable();
        v.get(v.len() / 2).copied()
    }

    pub fn lifetime(&self) -> f64 {
        self.samples.last().map_or(0.0, |s| s.0)
    }

    /// (settled, last) medians in KiB, for a loader that ran long enough
    /// to judge (see the module's docs).
    pub fn judged(&self) -> Option<(u64, u64)> {
        if self.lifetime() < 30.0 {
            return None;
        }
        let settled: Vec<u64> = self
            .samples
            .iter()
            .filter(|(t, _)| (5.0..15.0).contains(t))
            .map(|s| s.1)
            .collect();
        let last: Vec<u64> = self.samples.iter().rev().take(5).map(|s| s.1).collect();
        Some((Self::median(settled)?, Self::median(last)?))
    }

    pub fn flat(&self) -> Option<bool> {
        self.judged().map(|(a, b)| b <= a + 2048)
    }
}

/// What a run saw.
#[derive(Debug, Default)]
pub struct Summary {
    pub elapsed: Duration,
    /// (seconds into the run, event, how it went)
    pub events: Vec<(f64, Event, String)>,
    pub streams: Vec<StreamReport>,
    pub udp: Counts,
    pub fragmented: Counts,
    pub pings: Counts,
    pub flooded: u64,
    pub loaders: Vec<LoaderMemory>,
    pub most_sessions: usize,
    /// Inconsistencies seen in one snapshot, gone in the second look.
    pub transient: usize,
    /// Inconsistencies still there in the second look: leaks.
    pub leaks: Vec<String>,
    /// What the tables held once traffic stopped and every timeout passed.
    pub left: Option<String>,
    pub drained_in: Option<Duration>,
}

/// Requests sent, answered as sent, and answered with something else.
#[derive(Debug, Default)]
pub struct Counts {
    pub sent: AtomicU64,
    pub answered: AtomicU64,
    pub corrupted: AtomicU64,
}

impl Counts {
    fn get(&self) -> (u64, u64, u64) {
        (
            self.sent.load(Ordering::Relaxed),
            self.answered.load(Ordering::Relaxed),
            self.corrupted.load(Ordering::Relaxed),
        )
    }

    fn ratio(&self) -> f64 {
        let (s, a, _) = self.get();
        if s == 0 { 0.0 } else { a as f64 / s as f64 }
    }
}

impl Summary {
    /// Why the run failed, if it did (empty: passed).
    pub fn failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        for s in &self.streams {
            if let Some(e) = &s.error {
                f.push(format!("TCP stream {} broke: {e}", s.id));
            }
        }
        for (what, c) in [
            ("UDP", &self.udp),
            ("fragmented UDP", &self.fragmented),
            ("ping", &self.pings),
        ] {
            let (sent, _, corrupted) = c.get();
            if corrupted > 0 {
                f.push(format!(
                    "{what}: {corrupted} answers differ from the request"
                ));
            }
            if sent == 0 || c.ratio() < 0.8 {
                f.push(format!("{what}: {:.1} % answered", 100.0 * c.ratio()));
            }
        }
        f.extend(self.leaks.iter().map(|l| format!("leak: {l}")));
        if let Some(left) = &self.left {
            f.push(format!("tables not drained: {left}"));
        }
        for l in &self.loaders {
            if l.flat() == Some(false) {
                let (a, b) = l.judged().unwrap_or_default();
                f.push(format!(
                    "loader {} grew from {a} KiB to {b} KiB of RSS",
                    l.pid
                ));
            }
        }
        if !self.loaders.iter().any(|l| l.flat().is_some()) {
            f.push("no loader ran long enough to judge its memory".into());
        }
        f
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "soak: {:.0} s", self.elapsed.as_secs_f64())?;
        writeln!(f, "| at (s) | event | outcome |")?;
        writeln!(f, "|---|---|---|")?;
        for (t, e, how) in &self.events {
            writeln!(f, "| {t:.0} | {e:?} | {how} |")?;
        }
        writeln!(f)?;
        writeln!(f, "| traffic | sent | answered | corrupted | note |")?;
        writeln!(f, "|---|---|---|---|---|")?;
        let trips: u64 = self.streams.iter().map(|s| s.round_trips).sum();
        let broken = self.streams.iter().filter(|s| s.error.is_some()).count();
        let gap = self
            .streams
            .iter()
            .map(|s| s.max_gap)
            .max()
            .unwrap_or_default();
        writeln!(
            f,
            "| TCP streams ({}) | {trips} round trips | {trips} | {broken} broken | longest pause {gap:.1?} |",
            self.streams.len()
        )?;
        for (what, c) in [
            ("UDP, a new flow each", &self.udp),
            ("UDP 3000 B, fragmented", &self.fragmented),
            ("ping", &self.pings),
        ] {
            let (s, a, x) = c.get();
            writeln!(
                f,
                "| {what} | {s} | {a} ({:.1} %) | {x} | |",
                100.0 * c.ratio()
            )?;
        }
        writeln!(f, "| SYN flood | {} | | | new flows |", self.flooded)?;
        writeln!(f)?;
        writeln!(
            f,
            "| loader pid | ran (s) | RSS settled (KiB) | RSS last (KiB) | RSS max (KiB) | flat |"
        )?;
        writeln!(f, "|---|---|---|---|---|---|")?;
        for l in &self.loaders {
            let max = l.samples.iter().map(|s| s.1).max().unwrap_or(0);
            let (a, b) = l.judged().map_or(("-".into(), "-".into()), |(a, b)| {
                (a.to_string(), b.to_string())
            });
            let flat = match l.flat() {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "too short to judge",
            };
            writeln!(
                f,
                "| {} | {:.0} | {a} | {b} | {max} | {flat} |",
                l.pid,
                l.lifetime()
            )?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "tables: at most {} sessions; {} transient inconsistencies, {} leaks; {}",
            self.most_sessions,
            self.transient,
            self.leaks.len(),
            match (&self.left, self.drained_in) {
                (None, Some(d)) => format!("empty {d:.1?} after the traffic stopped"),
                (Some(l), _) => format!("NOT drained: {l}"),
                _ => "not checked".into(),
            }
        )?;
        let failures = self.failures();
        if failures.is_empty() {
            writeln!(f, "soak: passed")
        } else {
            writeln!(f, "soak: FAILED")?;
            for x in failures {
                writeln!(f, "  - {x}")?;
            }
            Ok(())
        }
    }
}

/// Set by the binary's SIGINT/SIGTERM handler: the run ends early, cleanly.
pub static STOP: AtomicBool = AtomicBool::new(false);

const UDP_ECHO: u16 = 9000;
const STREAM_PORT: u16 = 7000;
const FLOOD_PORTS: [u16; 4] = [7101, 7102, 7103, 7104];

fn loader_args(plan: &Plan, pins: &Path) -> Vec<String> {
    format!(
        "--bpffs-dir {} --max-flows {} --sweep-interval 1 --udp-timeout 5 --icmp-timeout 5 \
         --tcp-transitory-timeout 5 --port-hold 2 --stats-interval 0",
        pins.display(),
        plan.max_flows
    )
    .split_whitespace()
    .map(String::from)
    .collect()
}

fn start_loader(lab: &Lab, args: &[String]) -> Result<Gateway> {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    Gateway::start(lab, &a)
}

/// The RSS of process `pid`, KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Runs the soak; the [`Summary`] says whether it passed.
pub fn run(plan: &Plan) -> Result<Summary> {
    let bpffs = Bpffs::new()?;
    let pins: PathBuf = bpffs.pin_dir();
    let lab = Lab::new()?;
    let args = loader_args(plan, &pins);
    let mut gw = start_loader(&lab, &args)?;
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let mut summary = Summary::default();

    // Loader memory, whichever loader runs.
    let current = Arc::new(Mutex::new(gw.pid()));
    let memory: Arc<Mutex<Vec<LoaderMemory>>> = Arc::default();
    let sampler = {
        let (current, memory, stop) = (current.clone(), memory.clone(), stop.clone());
        std::thread::spawn(move || sample_memory(&current, &memory, &stop))
    };

    let counts = (Counts::default(), Counts::default(), Counts::default());
    std::thread::scope(|scope| -> Result<()> {
        traffic(scope, &lab, &stop, &counts)?;
        let streams = EchoStreams::start(
            &lab,
            Host::Client1,
            Host::Server,
            SocketAddrV4::new(SERVER_IP, STREAM_PORT),
            plan.streams,
        );
        let streams = match streams {
            Ok(s) => s,
            Err(e) => {
                stop.store(true, Ordering::Relaxed);
                return Err(e);
            }
        };
        let events_until = plan.duration.saturating_sub(plan.quiet_end);
        let mut next = plan.every;
        let mut n = 0;
        let mut next_check = Duration::from_secs(10);
        while start.elapsed() < plan.duration && !STOP.load(Ordering::Relaxed) {
            let now = start.elapsed();
            if now >= next && now < events_until {
                let e = Event::CYCLE[n % Event::CYCLE.len()];
                n += 1;
                let how = event(e, &lab, &args, &mut gw, plan, &mut summary)
                    .unwrap_or_else(|err| format!("FAILED: {err:#}"));
                *current.lock().unwrap_or_else(|p| p.into_inner()) = gw.pid();
                // The gateway forwards again: every stream makes progress.
                let back = Instant::now();
                let how = match streams.wait_for_round_trips(1, Duration::from_secs(30)) {
                    Ok(()) => format!("{how}; streams going again after {:.1?}", back.elapsed()),
                    Err(err) => format!("{how}; {err:#}"),
                };
                eprintln!("soak: {:.0} s: {e:?}: {how}", now.as_secs_f64());
                summary.events.push((now.as_secs_f64(), e, how));
                next += plan.every;
            }
            if now >= next_check {
                check_tables(&pins, &mut summary);
                next_check += Duration::from_secs(10);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        stop.store(true, Ordering::Relaxed);
        summary.streams = streams.finish();
        Ok(())
    })?;
    summary.elapsed = start.elapsed();
    check_tables(&pins, &mut summary);
    let quiet = Instant::now();
    loop {
        let t = Tables::pinned(&pins)?;
        if t.is_empty() {
            summary.drained_in = Some(quiet.elapsed());
            break;
        }
        if quiet.elapsed() > Duration::from_secs(30) {
            summary.left = Some(format!(
                "{} sessions, {} bindings, {} reverse bindings",
                t.sessions.len(),
                t.bind.len(),
                t.bind_rev.len()
            ));
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let _ = sampler.join();
    summary.loaders = memory.lock().map(|m| m.clone()).unwrap_or_default();
    (summary.udp, summary.fragmented, summary.pings) = counts;
    gw.stop().context("stopping the last loader")?;
    Ok(summary)
}

fn sample_memory(
    current: &Mutex<Option<u32>>,
    memory: &Mutex<Vec<LoaderMemory>>,
    stop: &AtomicBool,
) {
    let mut born: Option<(u32, Instant)> = None;
    while !stop.load(Ordering::Relaxed) {
        let pid = *current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pid) = pid
            && let Some(kib) = rss_kib(pid)
        {
            if born.is_none_or(|(p, _)| p != pid) {
                born = Some((pid, Instant::now()));
                if let Ok(mut m) = memory.lock() {
                    m.push(LoaderMemory {
                        pid,
                        samples: vec![],
                    });
                }
            }
            let t = born.map_or(0.0, |(_, b)| b.elapsed().as_secs_f64());
            if let Ok(mut m) = memory.lock()
                && let Some(l) = m.last_mut()
            {
                l.samples.push((t, kib));
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Snapshot of the pinned tables; whatever is inconsistent is looked at
/// again 2 s later, and what is still there is a leak.
fn check_tables(pins: &Path, summary: &mut Summary) {
    let Ok(first) = Tables::pinned(pins) else {
        return;
    };
    summary.most_sessions = summary.most_sessions.max(first.sessions.len());
    let seen = first.inconsistencies();
    if seen.is_empty() {
        return;
    }
    std::thread::sleep(Duration::from_secs(2));
    let again = Tables::pinned(pins)
        .map(|t| t.inconsistencies())
        .unwrap_or_default();
    for i in seen {
        if again.contains(&i) {
            summary.leaks.push(i.to_string());
        } else {
            summary.transient += 1;
        }
    }
}

/// Does `e`; says how it went.
fn event(
    e: Event,
    lab: &Lab,
    args: &[String],
    gw: &mut Gateway,
    plan: &Plan,
    summary: &mut Summary,
) -> Result<String> {
    match e {
        Event::Handover | Event::Kill => {
            let (signal, want) = if e == Event::Handover {
                (libc::SIGUSR2, Some(75))
            } else {
                (libc::SIGKILL, None)
            };
            let status = gw.signal_and_wait(signal)?;
            if status.code() != want {
                bail!("the loader exited with {status:?}");
            }
            // A moment with no loader at all: the pinned dataplane forwards.
            std::thread::sleep(Duration::from_millis(500));
            let t = Instant::now();
            *gw = start_loader(lab, args)?;
            let ready = gw
                .wait_for_log(&["nat-loader ready"], Duration::from_secs(1))
                .unwrap_or_default();
            if !ready.contains("adopted=true") {
                bail!("the new loader did not adopt: {ready}");
            }
            Ok(format!(
                "{status}, new loader adopted in {:.1?}",
                t.elapsed()
            ))
        }
        Event::FlapExt | Event::FlapInt => {
            let (host, dev) = if e == Event::FlapExt {
                (Host::Router, ROUTER_NAT_IF)
            } else {
                (Host::Sw, SW_NAT_PORT)
            };
            lab.exec(host, &["ip", "link", "set", dev, "down"])?;
            std::thread::sleep(Duration::from_secs(1));
            lab.exec(host, &["ip", "link", "set", dev, "up"])?;
            lab.namespaces().settle()?;
            Ok(format!("{host}'s {dev} down for 1 s"))
        }
        Event::Flood => {
            let count = plan.max_flows * 9 / 10;
            let r = syn_flood(
                lab,
                Host::Client2,
                CLIENT2_IP,
                SERVER_IP,
                &FLOOD_PORTS,
                count,
                20_000,
            )?;
            summary.flooded += r.sent;
            Ok(format!("{} new flows at {:.0}/s", r.sent, r.rate()))
        }
    }
}

/// The UDP echo server, and the UDP, fragmented UDP and ping senders,
/// on threads of `scope` until `stop`.
fn traffic<'s>(
    scope: &'s std::thread::Scope<'s, '_>,
    lab: &'s Lab,
    stop: &'s AtomicBool,
    counts: &'s (Counts, Counts, Counts),
) -> Result<()> {
    let echo = lab.udp_socket(
        Host::Server,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, UDP_ECHO),
    )?;
    echo.set_read_timeout(Some(Duration::from_millis(200)))?;
    let dst = SocketAddrV4::new(SERVER_IP, UDP_ECHO);
    scope.spawn(move || {
        let mut buf = vec![0u8; 65536];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, from)) = echo.recv_from(&mut buf) {
                let _ = echo.send_to(&buf[..n], from);
            }
        }
    });
    // New flows at a steady rate: a new socket (source port) each time.
    scope.spawn(move || {
        let mut seq = 0u64;
        while !stop.load(Ordering::Relaxed) {
            seq += 1;
            let any = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0);
            if let Ok(sock) = lab.udp_socket(Host::Client2, any) {
                exchange(&sock, dst, &request(seq, 64), &counts.0);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    // Datagrams bigger than the MTU: fragments both ways.
    let frag_sock = lab.udp_socket(Host::Client1, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
    scope.spawn(move || {
        let mut seq = 0u64;
        while !stop.load(Ordering::Relaxed) {
            seq += 1;
            exchange(&frag_sock, dst, &request(seq, 3000), &counts.1);
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    scope.spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            counts.2.sent.fetch_add(1, Ordering::Relaxed);
            if ping(lab, Host::Client2, SERVER_IP, 1, Duration::from_secs(1))
                .is_ok_and(|r| r.all_replied())
            {
                counts.2.answered.fetch_add(1, Ordering::Relaxed);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    Ok(())
}

/// `len` bytes: the sequence number, then a pattern of it.
fn request(seq: u64, len: usize) -> Vec<u8> {
    let mut r = vec![0u8; len];
    r[..8].copy_from_slice(&seq.to_be_bytes());
    let mut x = seq ^ 0x9e37_79b9_7f4a_7c15;
    for b in r[8..].iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    r
}

/// Sends `req` and waits up to 1 s for its echo: answered, or corrupted
/// if an echo of this request (or of none sent) differs from it. Late
/// echoes of earlier requests are skipped.
fn exchange(sock: &UdpSocket, dst: SocketAddrV4, req: &[u8], c: &Counts) {
    c.sent.fetch_add(1, Ordering::Relaxed);
    if sock.send_to(req, dst).is_err() {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut buf = vec![0u8; 65536];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let _ = sock.set_read_timeout(Some(left.max(Duration::from_millis(1))));
        match sock.recv(&mut buf) {
            Ok(n) if buf[..n] == *req => {
                c.answered.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ok(n) => {
                let seq = buf
                    .get(..8)
                    .map(|b| u64::from_be_bytes(b.try_into().unwrap_or_default()));
                let own = u64::from_be_bytes(req[..8].try_into().unwrap_or_default());
                let late = seq.is_some_and(|s| s < own && buf[..n] == request(s, req.len()));
                if !late {
                    c.corrupted.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return,
            Err(_) => return,
        }
    }
}

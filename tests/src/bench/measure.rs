//! The measurements of one topology: 64-byte UDP forwarding rate with the
//! gateway's CPU time, TCP throughput, new connections per second and
//! round-trip latency under light load.

use std::{
    io::{Read, Write},
    net::{SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    process::{Child, Stdio},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::{
    generator::{self, Blast},
    topo::{Role, SINK_IP, Topo, pin, task_cpu_ns},
};

/// Where the work runs: the gateway's NAPI threads on one CPU, everything
/// else (generator, sink, their NAPI threads) on the other.
#[derive(Clone, Copy, Debug)]
pub struct Cpus {
    pub gw: usize,
    pub other: usize,
}

impl Cpus {
    pub fn detect() -> Cpus {
        let n = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        if n >= 2 {
            Cpus { gw: 1, other: 0 }
        } else {
            Cpus { gw: 0, other: 0 }
        }
    }
}

/// One window of the UDP blast.
#[derive(Clone, Copy, Debug, Default)]
pub struct PpsSample {
    /// Packets per second that reached the sink.
    pub pps: f64,
    /// Packets per second the generator handed to the gateway.
    pub offered_pps: f64,
    /// CPU time of the gateway's NAPI threads per forwarded packet.
    pub cpu_ns_per_pkt: f64,
    /// Cross-check: system+irq+softirq time of the gateway's CPU per
    /// forwarded packet (includes anything else that ran there).
    pub cpu_stat_ns_per_pkt: f64,
    /// Fraction of the window the gateway's NAPI threads were on a CPU:
    /// well below 1 means the generator, not the gateway, set the rate.
    pub gw_busy: f64,
}

/// Flows of the 64-byte blast: enough that the session lookups miss the
/// cache the way a busy gateway's do (the blast of the earlier,
/// trafgen-driven runs used as many).
pub const BLAST_FLOWS: u64 = 28_560;

/// A process started in its own process group ([`spawn_group`]); the whole
/// group is SIGINTed, then killed, when dropped.
struct Running(Child);

fn spawn_group(cmd: &mut std::process::Command) -> std::io::Result<Running> {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0).spawn().map(Running)
}

impl Drop for Running {
    fn drop(&mut self) {
        // The group id is the leader's pid; the leader is our unreaped
        // child, so neither can have been reused.
        let group = -(self.0.id() as libc::pid_t);
        if let Ok(None) = self.0.try_wait() {
            unsafe { libc::kill(group, libc::SIGINT) };
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.0.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        // Children that outlived their parent, and a parent that ignored
        // SIGINT.
        unsafe { libc::kill(group, libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

/// Blasts 64-byte UDP over `flows` flows from the generator (on
/// `cpus.other`, flat out) and measures a `secs` window after `warmup`.
pub fn pps(t: &Topo, cpus: Cpus, flows: u64, warmup: f64, secs: f64) -> Result<PpsSample> {
    let gw_threads = t.pin_napi(cpus.gw, cpus.other)?;
    let snap = || -> Result<(Instant, u64, u64, u64, u64)> {
        Ok((
            Instant::now(),
            t.sink_count()?,
            t.offered_count()?,
            gw_threads.iter().map(|&p| task_cpu_ns(p)).sum(),
            super::topo::cpu_kernel_ns(cpus.gw),
        ))
    };
    let stop = AtomicBool::new(false);
    let (a, b) = std::thread::scope(|s| -> Result<_> {
        // Runs past the window; stopped by `stop` once it is measured.
        let blast = Blast::flat_out(flows, warmup + secs + 5.0);
        let stop = &stop;
        let generator = s.spawn(move || generator::blast_until(t, cpus.other, blast, stop));
        let measured = (|| -> Result<_> {
            super::nap(warmup)?;
            if generator.is_finished() {
                bail!("the generator stopped during the warm-up");
            }
            let a = snap()?;
            super::nap(secs)?;
            Ok((a, snap()?))
        })();
        stop.store(true, Ordering::Relaxed);
        let sent = generator
            .join()
            .map_err(|_| anyhow::anyhow!("the generator panicked"))?;
        sent?;
        measured
    })?;
    let dt = (b.0 - a.0).as_secs_f64();
    let pkts = b.1.saturating_sub(a.1);
    if pkts == 0 {
        bail!("{}: no packet reached the sink", t.variant.key());
    }
    Ok(PpsSample {
        pps: pkts as f64 / dt,
        offered_pps: b.2.saturating_sub(a.2) as f64 / dt,
        cpu_ns_per_pkt: b.3.saturating_sub(a.3) as f64 / pkts as f64,
        cpu_stat_ns_per_pkt: b.4.saturating_sub(a.4) as f64 / pkts as f64,
        gw_busy: b.3.saturating_sub(a.3) as f64 / (dt * 1e9),
    })
}

/// iperf3 server in the sink, started once per topology.
pub struct IperfServer(#[allow(dead_code)] Running);

pub const IPERF_PORT: u16 = 5201;

pub fn iperf_server(t: &Topo, cpus: Cpus) -> Result<IperfServer> {
    let cpu = cpus.other.to_string();
    let port = IPERF_PORT.to_string();
    let mut cmd = t.command(
        Role::Sink,
        &["taskset", "-c", &cpu, "iperf3", "-s", "-p", &port],
    );
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let server = spawn_group(&mut cmd).context("starting iperf3 -s")?;
    // Ready when the port accepts.
    let dst = SocketAddrV4::new(SINK_IP, IPERF_PORT);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let up = t.in_ns(Role::Sink, || {
            TcpStream::connect_timeout(&dst.into(), Duration::from_millis(200)).is_ok()
        })?;
        if up {
            return Ok(IperfServer(server));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("iperf3 server in {} did not start", t.ns(Role::Sink))
}

/// One iperf3 run of `secs` from the generator: Gbit/s received.
pub fn tcp_gbps(t: &Topo, cpus: Cpus, secs: u32) -> Result<f64> {
    t.pin_napi(cpus.gw, cpus.other)?;
    let cpu = cpus.other.to_string();
    let secs_s = secs.to_string();
    let port = IPERF_PORT.to_string();
    let out = t.exec(
        Role::Gen,
        &[
            "taskset",
            "-c",
            &cpu,
            "iperf3",
            "-c",
            &SINK_IP.to_string(),
            "-p",
            &port,
            "-t",
            &secs_s,
            "-J",
        ],
    )?;
    let v: serde_json::Value = serde_json::from_str(&out).context("iperf3 -J output")?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("no throughput in iperf3 output: {out}"))?;
    Ok(bps / 1e9)
}

/// Short TCP connections (connect, 1-byte request, 1-byte response,
/// close) from `workers` threads for `secs`: completed connections per
/// second. Clients close with RST (SO_LINGER 0), so neither end piles up
/// TIME_WAIT sockets; each connection still costs every NAT a new flow.
pub fn conn_rate(t: &Topo, cpus: Cpus, workers: usize, secs: f64) -> Result<f64> {
    const PORTS: u16 = 8;
    const BASE: u16 = 8000;
    t.pin_napi(cpus.gw, cpus.other)?;
    let listeners: Vec<TcpListener> = (0..PORTS)
        .map(|i| {
            t.in_ns(Role::Sink, || -> Result<TcpListener> {
                let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
                s.set_reuse_address(true)?;
                s.bind(&SockAddr::from(SocketAddrV4::new(SINK_IP, BASE + i)))?;
                s.listen(1024)?;
                // accept() honours the receive timeout: lets the acceptor
                // notice the end of the run.
                s.set_read_timeout(Some(Duration::from_millis(100)))?;
                Ok(s.into())
            })?
        })
        .collect::<Result<_>>()?;
    let stop = AtomicBool::new(false);
    let done = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    let first_error = std::sync::Mutex::new(None::<String>);
    let gen_path = t.ns_path(Role::Gen);
    let other = cpus.other;
    let elapsed = std::thread::scope(|s| -> Result<f64> {
        for l in &listeners {
            let stop = &stop;
            s.spawn(move || {
                let _ = pin(0, other);
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((mut c, _)) = l.accept() {
                        let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
                        let mut b = [0u8; 1];
                        if c.read_exact(&mut b).is_ok() {
                            let _ = c.write_all(&b);
                        }
                    }
                }
            });
        }
        let start = Instant::now();
        let deadline = start + Duration::from_secs_f64(secs);
        let clients: Vec<_> = (0..workers)
            .map(|w| {
                let (done, failed, gen_path, first_error) =
                    (&done, &failed, &gen_path, &first_error);
                s.spawn(move || -> Result<()> {
                    crate::netns::enter_netns(gen_path)?;
                    pin(0, other)?;
                    let mut n = w as u16;
                    while Instant::now() < deadline && super::check_interrupted().is_ok() {
                        n = n.wrapping_add(1);
                        let dst = SocketAddrV4::new(SINK_IP, BASE + n % PORTS);
                        match one_connection(dst) {
                            Ok(()) => {
                                done.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                if let Ok(mut f) = first_error.lock() {
                                    f.get_or_insert_with(|| format!("{e:#}"));
                                }
                            }
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        let mut result = Ok(());
        for c in clients {
            match c.join() {
                Ok(r) => result = result.and(r),
                Err(p) => std::panic::resume_unwind(p),
            }
        }
        let elapsed = start.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        result.map(|()| elapsed)
    })?;
    let done = done.load(Ordering::Relaxed);
    let failed = failed.load(Ordering::Relaxed);
    let first_error = first_error.into_inner().ok().flatten().unwrap_or_default();
    if done == 0 {
        bail!(
            "{}: no TCP connection completed ({failed} failed, first: {first_error})",
            t.variant.key()
        );
    }
    if failed * 100 > done {
        bail!(
            "{}: {failed} of {} connections failed (first: {first_error})",
            t.variant.key(),
            done + failed
        );
    }
    Ok(done as f64 / elapsed)
}

fn one_connection(dst: SocketAddrV4) -> Result<()> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    s.set_linger(Some(Duration::ZERO))?;
    s.connect_timeout(&SockAddr::from(dst), Duration::from_secs(1))
        .with_context(|| format!("connecting to {dst}"))?;
    let mut c: TcpStream = s.into();
    c.set_read_timeout(Some(Duration::from_secs(1)))?;
    c.write_all(&[1]).context("sending the request")?;
    let mut b = [0u8; 1];
    c.read_exact(&mut b).context("reading the response")?;
    Ok(())
}

/// `n` UDP request/response round trips, one at a time: (p50, p99) in µs.
pub fn latency(t: &Topo, cpus: Cpus, n: usize) -> Result<(f64, f64)> {
    const PORT: u16 = 7007;
    t.pin_napi(cpus.gw, cpus.other)?;
    let server = t.in_ns(Role::Sink, || -> Result<UdpSocket> {
        let s = UdpSocket::bind(SocketAddrV4::new(SINK_IP, PORT))?;
        s.set_read_timeout(Some(Duration::from_millis(100)))?;
        Ok(s)
    })??;
    let client = t.in_ns(Role::Gen, || -> Result<UdpSocket> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        s.connect(SocketAddrV4::new(SINK_IP, PORT))?;
        Ok(s)
    })??;
    let stop = AtomicBool::new(false);
    let other = cpus.other;
    let rtts = std::thread::scope(|s| -> Result<Vec<f64>> {
        let stop_ref = &stop;
        let server = &server;
        s.spawn(move || {
            let _ = pin(0, other);
            let mut buf = [0u8; 64];
            while !stop_ref.load(Ordering::Relaxed) {
                if let Ok((len, from)) = server.recv_from(&mut buf) {
                    let _ = server.send_to(&buf[..len], from);
                }
            }
        });
        let r = (|| -> Result<Vec<f64>> {
            pin(0, other)?;
            let mut rtts = Vec::with_capacity(n);
            let mut buf = [0u8; 64];
            let mut lost = 0;
            for i in 0..(n as u64) {
                let msg = i.to_be_bytes();
                let start = Instant::now();
                client.send(&msg)?;
                loop {
                    match client.recv(&mut buf) {
                        Ok(len) if buf[..len] == msg => {
                            rtts.push(start.elapsed().as_secs_f64() * 1e6);
                            break;
                        }
                        // A late answer to an earlier, timed-out request.
                        Ok(_) => continue,
                        Err(_) => {
                            lost += 1;
                            break;
                        }
                    }
                }
                if lost > n / 100 + 1 {
                    bail!("{}: {lost} round trips lost", t.variant.key());
                }
            }
            Ok(rtts)
        })();
        stop.store(true, Ordering::Relaxed);
        r
    })?;
    let mut rtts = rtts;
    rtts.sort_by(|a, b| a.total_cmp(b));
    Ok((percentile(&rtts, 0.50), percentile(&rtts, 0.99)))
}

/// The `q` quantile of sorted `v` (nearest rank).
pub fn percentile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

/// Restores `kernel.bpf_stats_enabled` when dropped: run-time statistics
/// cost every program run two clock reads, so they are on only while
/// [`prog_ns_per_run`] measures.
pub struct BpfStats {
    old: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    pub fn enable() -> Result<BpfStats> {
        let old = std::fs::read_to_string(BPF_STATS)
            .context("reading kernel.bpf_stats_enabled")?
            .trim()
            .to_string();
        std::fs::write(BPF_STATS, "1").context("enabling kernel.bpf_stats_enabled")?;
        Ok(BpfStats { old })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(BPF_STATS, &self.old) {
            eprintln!("nat-bench: could not restore kernel.bpf_stats_enabled: {e}");
        }
    }
}

/// One program's run-time statistics (bpf_stats).
#[derive(Clone, Debug)]
pub struct ProgStats {
    pub name: String,
    pub runs: u64,
    pub ns: u64,
}

/// Every loaded program's run-time statistics, by id (needs
/// bpf_stats_enabled for the counts to move).
pub fn prog_stats_all() -> Result<std::collections::HashMap<u32, ProgStats>> {
    let out = std::process::Command::new("bpftool")
        .args(["prog", "show", "-j"])
        .output()
        .context("running bpftool")?;
    if !out.status.success() {
        bail!(
            "bpftool prog show: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(v.as_array()
        .map(|progs| {
            progs
                .iter()
                .filter_map(|p| {
                    Some((
                        p["id"].as_u64()? as u32,
                        ProgStats {
                            name: p["name"].as_str().unwrap_or("?").to_string(),
                            runs: p["run_cnt"].as_u64().unwrap_or(0),
                            ns: p["run_time_ns"].as_u64().unwrap_or(0),
                        },
                    ))
                })
                .collect()
        })
        .unwrap_or_default())
}

/// A program's time in one window: ns per run (bpf_stats) and runs per
/// packet delivered to the sink.
#[derive(Clone, Debug)]
pub struct ProgTime {
    pub name: String,
    pub ns_per_run: f64,
    pub runs_per_pkt: f64,
}

impl ProgTime {
    /// `ns (runs per packet)`, as the reports show it.
    pub fn cell(&self) -> String {
        format!("{:.0} ({:.2})", self.ns_per_run, self.runs_per_pkt)
    }
}

/// One more window with bpf_stats on: each program that ran, its ns per
/// run and runs per packet delivered (the counts bracket the warm-up too,
/// so both sides of the ratio do).
pub fn program_times(
    t: &Topo,
    cpus: Cpus,
    flows: u64,
    warmup: f64,
    secs: f64,
) -> Result<(PpsSample, Vec<ProgTime>)> {
    program_times_of(t, || pps(t, cpus, flows, warmup, secs))
}

/// Runs `window` with bpf_stats on and returns what it returned with each
/// program that ran meanwhile: ns per run and runs per packet the sink
/// counted over the same span.
pub fn program_times_of<R>(
    t: &Topo,
    window: impl FnOnce() -> Result<R>,
) -> Result<(R, Vec<ProgTime>)> {
    let _stats = BpfStats::enable()?;
    let (a, sink_a) = (prog_stats_all()?, t.sink_count()?);
    let r = window()?;
    let (b, sink_b) = (prog_stats_all()?, t.sink_count()?);
    Ok((r, per_packet(&a, &b, sink_b.saturating_sub(sink_a) as f64)))
}

/// Programs that ran between snapshots `a` and `b`: name, ns per run, runs
/// per forwarded packet.
fn per_packet(
    a: &std::collections::HashMap<u32, ProgStats>,
    b: &std::collections::HashMap<u32, ProgStats>,
    pkts: f64,
) -> Vec<ProgTime> {
    let mut out: Vec<ProgTime> = b
        .iter()
        .filter_map(|(id, after)| {
            let before = a.get(id).map_or((0, 0), |s| (s.runs, s.ns));
            let runs = after.runs.saturating_sub(before.0);
            let ns = after.ns.saturating_sub(before.1);
            (runs > 0).then(|| ProgTime {
                name: after.name.clone(),
                ns_per_run: ns as f64 / runs as f64,
                runs_per_pkt: runs as f64 / pkts.max(1.0),
            })
        })
        .collect();
    out.sort_by(|x, y| x.name.cmp(&y.name));
    out
}

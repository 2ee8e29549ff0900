//! Traffic generators and probes. Everything here is bounded by a deadline
//! and reports a timeout as an error.

use crate::netns::output_with_timeout;
use crate::{Host, Lab, SERVER_IP};
use anyhow::{Context, Result, bail, ensure};
use sha2::{Digest, Sha256};
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A conversation from a client in one namespace to a server in another.
#[derive(Clone, Debug)]
pub struct Flow {
    /// Where the client socket lives.
    pub from: Host,
    /// Where the server socket lives.
    pub to: Host,
    /// The address the client sends to.
    pub dst: SocketAddrV4,
    /// Source address to bind the client to (None: chosen by the kernel).
    pub src_ip: Option<Ipv4Addr>,
    /// Source port to bind the client to (None: ephemeral).
    pub src_port: Option<u16>,
    /// The server's bind address (None: `0.0.0.0:<dst port>`).
    pub listen: Option<SocketAddrV4>,
    /// Bound on the whole conversation, setup included.
    pub timeout: Duration,
}

impl Flow {
    /// A flow with an ephemeral source and a 10 s timeout.
    pub fn new(from: Host, to: Host, dst: SocketAddrV4) -> Flow {
        Flow {
            from,
            to,
            dst,
            src_ip: None,
            src_port: None,
            listen: None,
            timeout: Duration::from_secs(10),
        }
    }

    /// A flow from `from` to the server's `port` (the usual one).
    pub fn to_server(from: Host, port: u16) -> Flow {
        Flow::new(from, Host::Server, SocketAddrV4::new(SERVER_IP, port))
    }

    pub fn src_ip(mut self, ip: Ipv4Addr) -> Flow {
        self.src_ip = Some(ip);
        self
    }

    pub fn src_port(mut self, port: u16) -> Flow {
        self.src_port = Some(port);
        self
    }

    pub fn listen_on(mut self, addr: SocketAddrV4) -> Flow {
        self.listen = Some(addr);
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Flow {
        self.timeout = timeout;
        self
    }

    fn listen_addr(&self) -> SocketAddrV4 {
        self.listen
            .unwrap_or(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, self.dst.port()))
    }

    fn bind_addr(&self) -> Option<SocketAddrV4> {
        match (self.src_ip, self.src_port) {
            (None, None) => None,
            (ip, port) => Some(SocketAddrV4::new(
                ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
                port.unwrap_or(0),
            )),
        }
    }
}

/// What a successful [`tcp_transfer`] saw. Both directions were verified
/// byte for byte (SHA-256) before this is returned.
#[derive(Clone, Debug)]
pub struct TcpReport {
    /// The client socket's own address (before translation).
    pub client_addr: SocketAddr,
    /// The client's address as the server saw it (after translation).
    pub server_saw: SocketAddr,
    /// The server socket's own address.
    pub server_addr: SocketAddr,
    /// The server's address as the client saw it.
    pub client_saw: SocketAddr,
    /// Bytes sent client to server and verified by the server.
    pub bytes_to_server: usize,
    /// Bytes sent server to client and verified by the client.
    pub bytes_to_client: usize,
    pub elapsed: Duration,
}

/// Sends `bytes` of pseudo-random data from client to server over one TCP
/// connection, then (after the client's FIN) the same amount back, so both
/// directions of the connection carry data and a half-closed connection
/// must keep working. The server returns the SHA-256 of what it got and
/// both streams are checked; any mismatch, error or timeout is an error.
pub fn tcp_transfer(lab: &Lab, flow: &Flow, bytes: usize) -> Result<TcpReport> {
    let start = Instant::now();
    let deadline = start + flow.timeout;
    let listener = lab.tcp_listener(flow.to, flow.listen_addr())?;
    let abort = AtomicBool::new(false);
    let seed = next_seed();

    let (client_result, server_result) = std::thread::scope(|s| {
        let server = s.spawn(|| tcp_server(&listener, deadline, &abort, seed ^ 0x5eed, bytes));
        let client = tcp_client(lab, flow, deadline, seed, bytes);
        if client.is_err() {
            abort.store(true, Ordering::Relaxed);
        }
        let server = server
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        (client, server)
    });
    let what = format!("TCP {} -> {} ({})", flow.from, flow.to, flow.dst);
    let client = client_result.with_context(|| format!("{what}: client"))?;
    let server = server_result.with_context(|| format!("{what}: server"))?;

    ensure!(
        server.received == bytes,
        "{what}: server got {} of {bytes} bytes",
        server.received
    );
    ensure!(
        server.received_digest == client.sent_digest,
        "{what}: data corrupted client -> server"
    );
    ensure!(
        client.received == bytes,
        "{what}: client got {} of {bytes} bytes",
        client.received
    );
    ensure!(
        client.received_digest == server.sent_digest,
        "{what}: data corrupted server -> client"
    );
    Ok(TcpReport {
        client_addr: client.local,
        server_saw: server.peer,
        server_addr: server.local,
        client_saw: client.peer,
        bytes_to_server: server.received,
        bytes_to_client: client.received,
        elapsed: start.elapsed(),
    })
}

/// One end of a [`tcp_transfer`]: its addresses, the digest of what it
/// sent, and the byte count and digest of what it received.
struct TcpSide {
    local: SocketAddr,
    peer: SocketAddr,
    sent_digest: [u8; 32],
    received: usize,
    received_digest: [u8; 32],
}

impl TcpSide {
    /// `ends` are the connection's (local, peer) addresses, taken while it
    /// is open.
    fn new(
        (local, peer): (SocketAddr, SocketAddr),
        sent_digest: [u8; 32],
        (received, received_digest): (usize, [u8; 32]),
    ) -> TcpSide {
        TcpSide {
            local,
            peer,
            sent_digest,
            received,
            received_digest,
        }
    }
}

fn tcp_client(
    lab: &Lab,
    flow: &Flow,
    deadline: Instant,
    seed: u64,
    bytes: usize,
) -> Result<TcpSide> {
    let mut stream =
        lab.tcp_connect(flow.from, flow.bind_addr(), flow.dst, remaining(deadline)?)?;
    let ends = (stream.local_addr()?, stream.peer_addr()?);
    let sent_digest = send_stream(&mut stream, deadline, seed, bytes).context("sending")?;
    stream.shutdown(Shutdown::Write)?;

    let mut echoed = [0u8; 32];
    read_exact_until(&mut stream, &mut echoed, deadline).context("reading the server's digest")?;
    ensure!(
        echoed == sent_digest,
        "server's digest of the data differs from what was sent"
    );
    let received = recv_stream(&mut stream, deadline).context("receiving")?;
    Ok(TcpSide::new(ends, sent_digest, received))
}

fn tcp_server(
    listener: &TcpListener,
    deadline: Instant,
    abort: &AtomicBool,
    seed: u64,
    bytes: usize,
) -> Result<TcpSide> {
    let (mut stream, peer) = accept_until(listener, deadline, abort)?
        .context("no connection arrived before the deadline")?;
    let ends = (stream.local_addr()?, peer);
    let received = recv_stream(&mut stream, deadline).context("receiving")?;
    write_until(&mut stream, &received.1, deadline).context("sending digest")?;
    let sent_digest = send_stream(&mut stream, deadline, seed, bytes).context("sending")?;
    stream.shutdown(Shutdown::Write)?;
    Ok(TcpSide::new(ends, sent_digest, received))
}

/// What a successful [`udp_exchange`] saw.
#[derive(Clone, Debug)]
pub struct UdpReport {
    /// The client socket's own address (before translation).
    pub client_addr: SocketAddr,
    /// Source address of every request the server got, in arrival order
    /// (after translation).
    pub server_saw: Vec<SocketAddr>,
    /// Requests sent; each got its own correct reply.
    pub answered: usize,
    pub elapsed: Duration,
}

impl UdpReport {
    /// The one source address the server saw, if all requests had the same.
    pub fn single_source(&self) -> Option<SocketAddr> {
        let first = *self.server_saw.first()?;
        self.server_saw.iter().all(|&a| a == first).then_some(first)
    }
}

/// Sends `datagrams` requests, one at a time, from a connected UDP socket in
/// `flow.from`; a server in `flow.to` echoes each to its source. Fails unless
/// every request gets its own reply (from `flow.dst`, which a connected
/// socket enforces) before the deadline.
pub fn udp_exchange(lab: &Lab, flow: &Flow, datagrams: usize) -> Result<UdpReport> {
    let start = Instant::now();
    let deadline = start + flow.timeout;
    let server = lab.udp_socket(flow.to, flow.listen_addr())?;
    let bind = flow
        .bind_addr()
        .unwrap_or(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0));
    let client = lab.udp_socket(flow.from, bind)?;
    client
        .connect(flow.dst)
        .with_context(|| format!("UDP connect to {}", flow.dst))?;
    let client_addr = client.local_addr()?;
    let done = AtomicBool::new(false);
    let seed = next_seed();

    let (answered, server_saw) = std::thread::scope(|s| {
        let echo = s.spawn(|| udp_echo(&server, deadline, &done));
        let answered = udp_requests(&client, deadline, seed, datagrams);
        done.store(true, Ordering::Relaxed);
        let saw = echo.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        (answered, saw)
    });
    let what = format!(
        "UDP {} ({client_addr}) -> {} ({})",
        flow.from, flow.to, flow.dst
    );
    let server_saw = server_saw.with_context(|| format!("{what}: server"))?;
    let answered = answered.with_context(|| {
        format!(
            "{what}: server got {} request(s) from {:?}",
            server_saw.len(),
            dedup(&server_saw)
        )
    })?;
    Ok(UdpReport {
        client_addr,
        server_saw,
        answered,
        elapsed: start.elapsed(),
    })
}

fn udp_requests(client: &UdpSocket, deadline: Instant, seed: u64, n: usize) -> Result<usize> {
    let mut rng = Rng::new(seed);
    let mut buf = [0u8; 2048];
    for i in 0..n {
        let mut request = vec![0u8; 64];
        request[..8].copy_from_slice(&(i as u64).to_be_bytes());
        rng.fill(&mut request[8..]);
        client
            .send(&request)
            .with_context(|| format!("sending request {i}"))?;
        loop {
            client
                .set_read_timeout(Some(remaining(deadline).with_context(|| {
                    format!("no reply to request {i} ({i} of {n} answered)")
                })?))?;
            match client.recv(&mut buf) {
                Ok(len) if buf[..len] == request[..] => break,
                // A late reply to an earlier request; keep waiting.
                Ok(_) => continue,
                Err(e) if is_timeout(&e) => continue,
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("waiting for reply {i} ({i} of {n} answered)"));
                }
            }
        }
    }
    Ok(n)
}

/// Echoes datagrams until `done` or the deadline; returns their sources.
fn udp_echo(server: &UdpSocket, deadline: Instant, done: &AtomicBool) -> Result<Vec<SocketAddr>> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 2048];
    // Short reads so `done` is noticed promptly.
    server.set_read_timeout(Some(Duration::from_millis(50)))?;
    while !done.load(Ordering::Relaxed) && Instant::now() < deadline {
        match server.recv_from(&mut buf) {
            Ok((len, from)) => {
                seen.push(from);
                server.send_to(&buf[..len], from)?;
            }
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(seen)
}

/// Sends `count` copies of `payload` from `from` (optionally bound to `src`)
/// to `dst` and returns without waiting for anything: the sending half of
/// "does this arrive?" tests.
pub fn udp_send(
    lab: &Lab,
    from: Host,
    src: Option<SocketAddrV4>,
    dst: SocketAddrV4,
    payload: &[u8],
    count: usize,
) -> Result<()> {
    let socket = lab.udp_socket(
        from,
        src.unwrap_or(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)),
    )?;
    for _ in 0..count {
        socket
            .send_to(payload, dst)
            .with_context(|| format!("sending UDP from {from} to {dst}"))?;
    }
    Ok(())
}

/// Collects every datagram that reaches `socket` during `duration`.
pub fn recv_all_within(
    socket: &UdpSocket,
    duration: Duration,
) -> Result<Vec<(SocketAddr, Vec<u8>)>> {
    let deadline = Instant::now() + duration;
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    while let Ok(left) = remaining(deadline) {
        socket.set_read_timeout(Some(left))?;
        match socket.recv_from(&mut buf) {
            Ok((len, from)) => got.push((from, buf[..len].to_vec())),
            Err(e) if is_timeout(&e) => {}
            // ICMP errors for earlier sends from this socket are not arrivals.
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(got)
}

/// Binds UDP `0.0.0.0:port` in `host` and returns what arrives within
/// `duration`. The socket exists only once this is running, so a sender must
/// start after it (e.g. from another thread after a short delay); to avoid
/// that race, bind first with [`Lab::udp_socket`] and use [`recv_all_within`].
pub fn udp_listen_for(
    lab: &Lab,
    host: Host,
    port: u16,
    duration: Duration,
) -> Result<Vec<(SocketAddr, Vec<u8>)>> {
    let socket = lab.udp_socket(host, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))?;
    recv_all_within(&socket, duration)
}

/// Waits up to `duration` for a connection on `listener`; returns the peer
/// of the first one (and closes it), or None if nothing connected.
pub fn accept_within(listener: &TcpListener, duration: Duration) -> Result<Option<SocketAddr>> {
    let never = AtomicBool::new(false);
    Ok(accept_until(listener, Instant::now() + duration, &never)?.map(|(_, peer)| peer))
}

/// Listens on TCP `0.0.0.0:port` in `host` for `duration`; returns the peer
/// of the first accepted connection, or None. Same race as
/// [`udp_listen_for`]; [`Lab::tcp_listener`] + [`accept_within`] avoid it.
pub fn tcp_accepts_within(
    lab: &Lab,
    host: Host,
    port: u16,
    duration: Duration,
) -> Result<Option<SocketAddr>> {
    let listener = lab.tcp_listener(host, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))?;
    accept_within(&listener, duration)
}

/// What [`ping`] saw.
#[derive(Clone, Debug)]
pub struct PingReport {
    pub transmitted: u32,
    pub received: u32,
    /// ping's full output, for failure messages.
    pub output: String,
}

impl PingReport {
    pub fn all_replied(&self) -> bool {
        self.transmitted > 0 && self.received == self.transmitted
    }
}

/// Pings `dst` from `from` `count` times (0.2 s apart) with the `ping`
/// command. Lost replies are a result, not an error; an error means ping
/// could not run or printed no summary (e.g. no route at all).
pub fn ping(
    lab: &Lab,
    from: Host,
    dst: Ipv4Addr,
    count: u32,
    timeout: Duration,
) -> Result<PingReport> {
    let secs = timeout.as_secs().max(1).to_string();
    let count_arg = count.to_string();
    let dst_arg = dst.to_string();
    // -w makes ping stop by itself; the kill timeout is only a backstop.
    let argv = [
        "ping", "-n", "-q", "-c", &count_arg, "-i", "0.2", "-W", &secs, "-w", &secs, &dst_arg,
    ];
    let out = output_with_timeout(
        &mut lab.command(from, &argv),
        timeout + Duration::from_secs(2),
    )
    .with_context(|| format!("ping {dst} from {from}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let output = format!("{stdout}{stderr}");
    let summary = stdout
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .with_context(|| format!("ping {dst} from {from} gave no summary: {output}"))?;
    // "5 packets transmitted, 5 received, 0% packet loss, time 803ms"
    let number_before = |word: &str| -> Option<u32> {
        let words: Vec<&str> = summary.split_whitespace().collect();
        let i = words.iter().position(|w| w.trim_end_matches(',') == word)?;
        words.get(i.checked_sub(1)?)?.parse().ok()
    };
    let (Some(transmitted), Some(received)) = (
        summary
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok()),
        number_before("received"),
    ) else {
        bail!("cannot parse ping summary {summary:?}");
    };
    Ok(PingReport {
        transmitted,
        received,
        output,
    })
}

fn accept_until(
    listener: &TcpListener,
    deadline: Instant,
    abort: &AtomicBool,
) -> Result<Option<(TcpStream, SocketAddr)>> {
    // Non-blocking polling: a blocking accept cannot be bounded in time.
    listener.set_nonblocking(true)?;
    let result = loop {
        match listener.accept() {
            Ok((stream, peer)) => break Some((stream, peer)),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if abort.load(Ordering::Relaxed) || Instant::now() >= deadline {
                    break None;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e).context("accept"),
        }
    };
    listener.set_nonblocking(false)?;
    if let Some((stream, _)) = &result {
        stream.set_nonblocking(false)?;
    }
    Ok(result)
}

/// Writes the pseudo-random stream for `seed`; returns its SHA-256.
fn send_stream(
    stream: &mut TcpStream,
    deadline: Instant,
    seed: u64,
    bytes: usize,
) -> Result<[u8; 32]> {
    let mut rng = Rng::new(seed);
    let mut hash = Sha256::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        rng.fill(&mut chunk[..n]);
        hash.update(&chunk[..n]);
        write_until(stream, &chunk[..n], deadline)
            .with_context(|| format!("after {} of {bytes} bytes", bytes - left))?;
        left -= n;
    }
    Ok(hash.finalize().into())
}

/// Reads to EOF; returns the byte count and SHA-256.
fn recv_stream(stream: &mut TcpStream, deadline: Instant) -> Result<(usize, [u8; 32])> {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        stream.set_read_timeout(Some(
            remaining(deadline).with_context(|| format!("after {total} bytes"))?,
        ))?;
        match stream.read(&mut buf) {
            Ok(0) => return Ok((total, hash.finalize().into())),
            Ok(n) => {
                hash.update(&buf[..n]);
                total += n;
            }
            Err(e) if is_timeout(&e) || e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e).with_context(|| format!("after {total} bytes")),
        }
    }
}

fn write_until(stream: &mut TcpStream, mut data: &[u8], deadline: Instant) -> Result<()> {
    while !data.is_empty() {
        stream.set_write_timeout(Some(remaining(deadline)?))?;
        match stream.write(data) {
            Ok(0) => bail!("connection closed while writing"),
            Ok(n) => data = &data[n..],
            Err(e) if is_timeout(&e) || e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn read_exact_until(stream: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> Result<()> {
    let mut got = 0;
    while got < buf.len() {
        stream.set_read_timeout(Some(remaining(deadline)?))?;
        match stream.read(&mut buf[got..]) {
            Ok(0) => bail!("connection closed after {got} of {} bytes", buf.len()),
            Ok(n) => got += n,
            Err(e) if is_timeout(&e) || e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Time left before `deadline`; an error once it has passed (socket
/// timeouts of zero would mean "block forever").
fn remaining(deadline: Instant) -> Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        bail!("timed out");
    }
    Ok(left)
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

fn dedup(addrs: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for a in addrs {
        if !out.contains(a) {
            out.push(*a);
        }
    }
    out
}

/// Distinct seeds per conversation, so a stale packet from an earlier test
/// can never pass for current data.
fn next_seed() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ (u64::from(std::process::id()) << 32) ^ COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// xorshift64*: fast, deterministic filler; not for cryptography.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

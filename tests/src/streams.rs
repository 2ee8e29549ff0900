//! Long-lived TCP echo streams through the gateway, each verifying every
//! byte and timing the gaps between its successful round trips: the tool
//! for "does a flow survive X, and how long does it stall".

use std::{
    io::{Read, Write},
    net::{SocketAddrV4, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{Host, Lab};

/// Bytes per round trip.
const MSG: usize = 512;
/// Pause between round trips, so 20 streams do not hog a shared machine.
const PACE: Duration = Duration::from_millis(10);
/// A round trip slower than this breaks the stream.
const STALL: Duration = Duration::from_secs(30);

/// What one stream did.
#[derive(Clone, Debug)]
pub struct StreamReport {
    pub id: usize,
    pub round_trips: u64,
    /// The longest time between two successful round trips (includes the
    /// 10 ms pause the stream makes between round trips).
    pub max_gap: Duration,
    /// The longest single round trip (write to echo fully read back).
    pub max_rtt: Duration,
    /// Why the stream stopped early, if it did.
    pub error: Option<String>,
}

/// `n` client→server streams, each sending numbered, patterned messages
/// that the server echoes and the client checks byte for byte.
pub struct EchoStreams {
    stop: Arc<AtomicBool>,
    counts: Vec<Arc<AtomicU64>>,
    clients: Vec<JoinHandle<StreamReport>>,
    server: Option<JoinHandle<()>>,
    server_stop: Arc<AtomicBool>,
}

impl EchoStreams {
    /// Opens `n` streams from `from` to an echo server listening at `dst`
    /// in `to`; all are connected and have made one round trip when this
    /// returns.
    pub fn start(lab: &Lab, from: Host, to: Host, dst: SocketAddrV4, n: usize) -> Result<Self> {
        let listener = lab.tcp_listener(to, dst)?;
        listener.set_nonblocking(true)?;
        let server_stop = Arc::new(AtomicBool::new(false));
        let server = {
            let stop = Arc::clone(&server_stop);
            std::thread::spawn(move || echo_server(listener, stop))
        };
        let stop = Arc::new(AtomicBool::new(false));
        let mut streams = EchoStreams {
            stop: Arc::clone(&stop),
            counts: Vec::new(),
            clients: Vec::new(),
            server: Some(server),
            server_stop,
        };
        for id in 0..n {
            let sock = lab
                .tcp_connect(from, None, dst, Duration::from_secs(5))
                .with_context(|| format!("stream {id}: connecting"))?;
            sock.set_read_timeout(Some(STALL))?;
            sock.set_write_timeout(Some(STALL))?;
            sock.set_nodelay(true)?;
            let count = Arc::new(AtomicU64::new(0));
            streams.counts.push(Arc::clone(&count));
            let stop = Arc::clone(&stop);
            streams
                .clients
                .push(std::thread::spawn(move || client(id, sock, stop, count)));
        }
        streams.wait_for_round_trips(1, Duration::from_secs(10))?;
        Ok(streams)
    }

    /// Round trips completed so far, per stream.
    pub fn counts(&self) -> Vec<u64> {
        self.counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// Waits until every stream has made `more` round trips beyond what it
    /// had when called; fails naming the streams that did not.
    pub fn wait_for_round_trips(&self, more: u64, timeout: Duration) -> Result<()> {
        let base = self.counts();
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.counts();
            let behind: Vec<usize> = (0..now.len())
                .filter(|&i| now[i] < base[i] + more)
                .collect();
            if behind.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "streams {behind:?} made fewer than {more} round trips in {timeout:?} \
                     (before {base:?}, now {now:?})"
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops every stream and returns what each did.
    pub fn finish(mut self) -> Vec<StreamReport> {
        self.stop.store(true, Ordering::Relaxed);
        let reports = self
            .clients
            .drain(..)
            .enumerate()
            .map(|(id, h)| {
                h.join().unwrap_or_else(|_| StreamReport {
                    id,
                    round_trips: 0,
                    max_gap: Duration::ZERO,
                    max_rtt: Duration::ZERO,
                    error: Some("client thread panicked".into()),
                })
            })
            .collect();
        self.server_stop.store(true, Ordering::Relaxed);
        if let Some(s) = self.server.take() {
            let _ = s.join();
        }
        reports
    }
}

impl Drop for EchoStreams {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.server_stop.store(true, Ordering::Relaxed);
    }
}

fn pattern(id: usize, seq: u64, buf: &mut [u8; MSG]) {
    buf[..8].copy_from_slice(&(id as u64).to_be_bytes());
    buf[8..16].copy_from_slice(&seq.to_be_bytes());
    let mut x = (id as u64) << 32 ^ seq ^ 0x9e37_79b9_7f4a_7c15;
    for b in buf[16..].iter_mut() {
        // xorshift: cheap bytes that differ per stream and message.
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

fn client(
    id: usize,
    mut sock: TcpStream,
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
) -> StreamReport {
    let mut report = StreamReport {
        id,
        round_trips: 0,
        max_gap: Duration::ZERO,
        max_rtt: Duration::ZERO,
        error: None,
    };
    let mut out = [0u8; MSG];
    let mut back = [0u8; MSG];
    // Timing starts after the first round trip: 20 threads starting at
    // once would otherwise measure their own start-up.
    let mut last_ok: Option<Instant> = None;
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        pattern(id, seq, &mut out);
        let sent = Instant::now();
        let result = sock
            .write_all(&out)
            .and_then(|()| sock.read_exact(&mut back));
        if let Err(e) = result {
            report.error = Some(format!("round trip {seq}: {e}"));
            break;
        }
        if back != out {
            report.error = Some(format!("round trip {seq}: echoed data differs"));
            break;
        }
        let now = Instant::now();
        if let Some(last) = last_ok {
            report.max_rtt = report.max_rtt.max(now - sent);
            report.max_gap = report.max_gap.max(now - last);
        }
        last_ok = Some(now);
        seq += 1;
        report.round_trips = seq;
        count.store(seq, Ordering::Relaxed);
        std::thread::sleep(PACE);
    }
    report
}

fn echo_server(listener: TcpListener, stop: Arc<AtomicBool>) {
    let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((sock, _)) => {
                let _ = sock.set_nonblocking(false);
                let _ = sock.set_read_timeout(Some(Duration::from_millis(200)));
                let _ = sock.set_nodelay(true);
                let stop = Arc::clone(&stop);
                let h = std::thread::spawn(move || echo(&mut &sock, &mut &sock, &stop));
                if let Ok(mut c) = conns.lock() {
                    c.push(h);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    if let Ok(mut c) = conns.lock() {
        for h in c.drain(..) {
            let _ = h.join();
        }
    }
}

/// Writes back to `w` what arrives from `r`, until the end of the stream,
/// an error or `stop`. `r` needs a read timeout for `stop` to be noticed.
pub(crate) fn echo(r: &mut impl Read, w: &mut impl Write, stop: &AtomicBool) {
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        match r.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if w.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

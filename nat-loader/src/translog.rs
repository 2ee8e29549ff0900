//! The translation log (`--translation-log PATH`): one JSON line per
//! binding created (from the dataplane, through the `TRANSLOG` ring
//! buffer), released and freed (from the sweeper), and per new flow
//! refused for want of a port, so that "which inside host had external
//! port P at time T" is one `grep`:
//!
//! ```text
//! {"time":"2026-12-06T11:20:00.123456Z","event":"binding_created","protocol":"udp","inside":"10.1.0.11:40000","external":"192.0.2.2:40001"}
//! ```
//!
//! `binding_released`: its last session ended; the port stays reserved for
//! that inside endpoint (RFC 6888 hold). `binding_freed`: the hold is over,
//! the port may go to another endpoint. `port_exhausted`: a new flow of
//! that inside endpoint found no free port (at most one line per endpoint
//! and second). Records lost to a full ring are counted
//! (`event_translog_lost`) and logged. `--translation-log journal` writes
//! the same lines to the loader's log instead (target `nat_translog`,
//! which systemd puts in the journal).

use std::{
    collections::HashMap,
    fs::{File, OpenOptions},
    io::{BufWriter, Write},
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::{self, Receiver, Sender},
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use aya::maps::{MapData, PerCpuArray, RingBuf};
use nat_common::{TRANSLOG_CREATED, TRANSLOG_NO_PORT, TranslogEvent, stats};
use tracing::warn;

use crate::{
    stats::Stats,
    summary::{Change, SweepRecord, proto_name},
};

/// The writer thread.
pub struct TranslogThread {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn sock(raw_addr: u32, raw_port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(raw_addr.to_ne_bytes()),
        u16::from_be(raw_port),
    )
}

/// `t` as RFC 3339 in UTC, microseconds.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_micros()
    )
}

/// One JSON line.
pub fn line(
    time: SystemTime,
    event: &str,
    proto: u8,
    inside: SocketAddrV4,
    external: Option<SocketAddrV4>,
) -> String {
    let mut v = serde_json::json!({
        "time": rfc3339(time),
        "event": event,
        "protocol": proto_name(proto),
        "inside": inside.to_string(),
    });
    if let (Some(e), Some(o)) = (external, v.as_object_mut()) {
        o.insert("external".into(), e.to_string().into());
    }
    v.to_string()
}

/// The wall-clock time of a CLOCK_MONOTONIC stamp.
fn wall_time(ts_ns: u64) -> SystemTime {
    let ago = crate::monotonic_ns().saturating_sub(ts_ns);
    SystemTime::now() - Duration::from_nanos(ago)
}

/// Where the lines go: the file, or the log (`journal`).
enum Out {
    File(BufWriter<File>),
    Journal(Vec<u8>),
}

impl Write for Out {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Out::File(f) => f.write(buf),
            Out::Journal(pending) => {
                pending.extend_from_slice(buf);
                while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                    let l: Vec<u8> = pending.drain(..=end).collect();
                    let l = String::from_utf8_lossy(&l[..l.len() - 1]).into_owned();
                    tracing::info!(target: "nat_translog", "{l}");
                }
                Ok(buf.len())
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Out::File(f) => f.flush(),
            Out::Journal(_) => Ok(()),
        }
    }
}

/// The path that means "the loader's log".
pub const JOURNAL: &str = "journal";

struct Writer {
    out: Out,
    path: PathBuf,
    /// When each inside endpoint's last `port_exhausted` line was written.
    exhausted: HashMap<(u8, u32, u16), Instant>,
    lost: u64,
}

impl Writer {
    fn dataplane(&mut self, e: &TranslogEvent) -> std::io::Result<()> {
        let inside = sock(e.inside_addr, e.inside_port);
        let time = wall_time(e.ts_ns);
        match e.kind {
            TRANSLOG_CREATED => {
                let ext = sock(e.ext_addr, e.ext_port);
                writeln!(
                    self.out,
                    "{}",
                    line(time, "binding_created", e.proto, inside, Some(ext))
                )
            }
            TRANSLOG_NO_PORT => {
                let key = (e.proto, e.inside_addr, e.inside_port);
                let now = Instant::now();
                if self
                    .exhausted
                    .get(&key)
                    .is_some_and(|t| now.duration_since(*t) < Duration::from_secs(1))
                {
                    return Ok(());
                }
                self.exhausted.insert(key, now);
                if self.exhausted.len() > 65_536 {
                    self.exhausted
                        .retain(|_, t| now.duration_since(*t) < Duration::from_secs(1));
                }
                writeln!(
                    self.out,
                    "{}",
                    line(time, "port_exhausted", e.proto, inside, None)
                )
            }
            _ => Ok(()),
        }
    }

    fn sweep(&mut self, (change, ek, v): &SweepRecord) -> std::io::Result<()> {
        let (a, p) = v.addr_port();
        let event = match change {
            Change::Released => "binding_released",
            Change::Freed => "binding_freed",
        };
        writeln!(
            self.out,
            "{}",
            line(
                SystemTime::now(),
                event,
                ek.proto,
                sock(a, p),
                Some(sock(ek.addr, ek.port))
            )
        )
    }

    fn check_lost(&mut self, stats_map: &PerCpuArray<MapData, u64>) {
        let Ok(lost) = Stats::sum(stats_map, &[stats::EV_TRANSLOG_LOST]) else {
            return;
        };
        if lost > self.lost {
            warn!(
                lost = lost - self.lost,
                path = %self.path.display(),
                "translation log: records lost, the ring buffer was full (event_translog_lost)"
            );
        }
        self.lost = lost;
    }
}

impl TranslogThread {
    /// Opens `path` for appending and starts the thread that reads `ring`
    /// and `sweeps` into it.
    pub fn spawn(
        path: &Path,
        mut ring: RingBuf<MapData>,
        sweeps: Receiver<SweepRecord>,
        stats_map: PerCpuArray<MapData, u64>,
    ) -> Result<TranslogThread> {
        let out = if path == Path::new(JOURNAL) {
            Out::Journal(Vec::new())
        } else {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening the translation log {}", path.display()))?;
            Out::File(BufWriter::new(file))
        };
        let mut w = Writer {
            out,
            path: path.to_path_buf(),
            exhausted: HashMap::new(),
            lost: Stats::sum(&stats_map, &[stats::EV_TRANSLOG_LOST]).unwrap_or(0),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("translog".into())
            .spawn(move || {
                let mut last_check = Instant::now();
                loop {
                    let done = stopping.load(Ordering::Relaxed);
                    let mut failed = None;
                    while let Some(item) = ring.next() {
                        if item.len() >= std::mem::size_of::<TranslogEvent>() {
                            let e: TranslogEvent = bytemuck::pod_read_unaligned(
                                &item[..std::mem::size_of::<TranslogEvent>()],
                            );
                            if let Err(err) = w.dataplane(&e) {
                                failed = Some(err);
                            }
                        }
                    }
                    while let Ok(r) = sweeps.try_recv() {
                        if let Err(err) = w.sweep(&r) {
                            failed = Some(err);
                        }
                    }
                    if let Err(err) = w.out.flush() {
                        failed = Some(err);
                    }
                    if let Some(err) = failed {
                        warn!(error = %err, path = %w.path.display(), "writing the translation log");
                    }
                    if last_check.elapsed() >= Duration::from_secs(5) || done {
                        w.check_lost(&stats_map);
                        last_check = Instant::now();
                    }
                    if done {
                        return;
                    }
                    // Wakes when the ring has data, at the latest after
                    // 200 ms (the sweeper's records, the stop flag).
                    let mut pfd = libc::pollfd {
                        fd: ring.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    unsafe { libc::poll(&mut pfd, 1, 200) };
                }
            })
            .context("starting the translation log thread")?;
        Ok(TranslogThread {
            stop,
            thread: Some(thread),
        })
    }

    /// Writes what is pending and ends the thread.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            warn!("the translation log thread panicked");
        }
    }
}

impl Drop for TranslogThread {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A channel for the sweeper's records.
pub fn channel() -> (Sender<SweepRecord>, Receiver<SweepRecord>) {
    mpsc::channel()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_utc_with_microseconds() {
        let t = UNIX_EPOCH + Duration::new(1_796_556_000, 123_456_000);
        assert_eq!(rfc3339(t), "2026-12-06T11:20:00.123456Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        // A leap day.
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(t), "2000-02-29T00:00:00.000000Z");
    }

    #[test]
    fn a_line_names_the_event_protocol_and_both_endpoints() {
        let l = line(
            UNIX_EPOCH,
            "binding_created",
            nat_common::IPPROTO_UDP,
            "10.1.0.11:5000".parse().expect("addr"),
            Some("192.0.2.2:40001".parse().expect("addr")),
        );
        let v: serde_json::Value = serde_json::from_str(&l).expect("json");
        assert_eq!(v["event"], "binding_created");
        assert_eq!(v["protocol"], "udp");
        assert_eq!(v["inside"], "10.1.0.11:5000");
        assert_eq!(v["external"], "192.0.2.2:40001");
        assert_eq!(v["time"], "1970-01-01T00:00:00.000000Z");
    }
}

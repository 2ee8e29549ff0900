//! The benchmark's traffic generator: `bench_gen` (nat-ebpf fwd.rs) run
//! through BPF_PROG_RUN with live frames (BPF_F_TEST_XDP_LIVE_FRAMES,
//! Linux ≥ 5.18) from a thread in the generator's namespace. Each run is a
//! copy of one 60-byte template frame (64 on the wire) that the program
//! turns into the next flow's packet ([`nat_common::bench::gen_tuple`]) and
//! redirects into the gateway's veth. No socket and no skb on the way: one
//! CPU generates several times what the gateway under test forwards, so the
//! rates measure the gateway, not the generator (trafgen, which this
//! replaced, topped out below the gateways on 2 cores).
//!
//! The sink's NAPI thread shares the generator's CPU and must never wait
//! for it, or the sink would drop what the gateway forwarded: it runs
//! SCHED_FIFO (`Topo::pin_napi`), the generator at normal priority.

use std::{
    net::Ipv4Addr,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use aya::{
    programs::{ProgramError, TestRun, TestRunAttrs, TestRunOptions},
    sys::SyscallError,
};
use nat_common::{IPPROTO_UDP, bench::gen_tuple};

use super::topo::{Role, SINK_IP, Topo, pin};
use crate::packet::{internet_checksum, l4_checksum};

/// Frames the kernel runs between two flushes of the redirects: well under
/// the 256 frames a veth's ring holds.
const BATCH: u32 = 64;

/// One run of the generator.
#[derive(Clone, Copy, Debug)]
pub struct Blast {
    /// Flows to cycle through; 0: every packet a new flow.
    pub flows: u64,
    /// Index to start at; `None` goes on from where the last run stopped.
    pub first: Option<u64>,
    /// Packets per second; `None`: as fast as the CPU sends.
    pub rate: Option<f64>,
    /// Stop after this long ...
    pub secs: f64,
    /// ... or after this many packets.
    pub packets: Option<u64>,
}

impl Blast {
    /// As fast as possible over `flows` flows for `secs`.
    pub fn flat_out(flows: u64, secs: f64) -> Blast {
        Blast {
            flows,
            first: None,
            rate: None,
            secs,
            packets: None,
        }
    }
}

/// Sends `b` from CPU `cpu`; returns the packets generated (all of them
/// handed to the gateway's veth; those its full ring refused are the
/// gateway's loss, as a NIC's full ring would be).
pub fn blast(t: &Topo, cpu: usize, b: Blast) -> Result<u64> {
    blast_until(t, cpu, b, &AtomicBool::new(false))
}

/// [`blast`], ending early once `stop` is set.
///
/// The generating thread spends the run in one BPF_PROG_RUN call (each
/// call costs an RCU grace period on the way out); this thread watches the
/// clock and the count and ends the call with a signal, which the kernel's
/// run loop checks between batches.
pub fn blast_until(t: &Topo, cpu: usize, b: Blast, stop: &AtomicBool) -> Result<u64> {
    install_wakeup_handler()?;
    let frame = template(t);
    t.gen_start(&b, &frame)?;
    let prog = t.gen_prog()?;
    let deadline = Instant::now() + Duration::from_secs_f64(b.secs.min(1e6));
    let done = AtomicBool::new(false);
    std::thread::scope(|s| -> Result<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (frame, done) = (&frame, &done);
        let runner = s.spawn(move || {
            t.in_ns(Role::Gen, move || -> Result<()> {
                // SAFETY: gettid and pthread_self have no preconditions.
                pin(unsafe { libc::gettid() }, cpu)?;
                let _ = tx.send(unsafe { libc::pthread_self() } as usize);
                while !done.load(Ordering::Relaxed) {
                    let r = prog.test_run(TestRunOptions {
                        data_in: Some(frame),
                        repeat: u32::MAX,
                        attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
                        ..Default::default()
                    });
                    match r {
                        Ok(_) => {}
                        Err(ProgramError::SyscallError(SyscallError { io_error, .. }))
                            if io_error.raw_os_error() == Some(libc::EINTR) => {}
                        Err(e) => {
                            return Err(e).context(
                                "BPF_PROG_RUN of bench_gen with live frames (needs Linux 5.18 or later)",
                            );
                        }
                    }
                }
                Ok(())
            })?
        });
        let thread = rx.recv().ok();
        let watched = (|| -> Result<()> {
            loop {
                std::thread::sleep(Duration::from_millis(2));
                super::check_interrupted()?;
                if runner.is_finished()
                    || stop.load(Ordering::Relaxed)
                    || Instant::now() >= deadline
                    || b.packets
                        .is_some_and(|n| t.gen_sent().is_ok_and(|s| s >= n))
                {
                    return Ok(());
                }
            }
        })();
        done.store(true, Ordering::Relaxed);
        // A signal that lands between two calls interrupts nothing: repeat
        // until the thread is out.
        while !runner.is_finished() {
            if let Some(th) = thread {
                // SAFETY: the thread is alive until `runner` finishes.
                unsafe { libc::pthread_kill(th as libc::pthread_t, libc::SIGUSR1) };
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let ran = runner
            .join()
            .map_err(|_| anyhow::anyhow!("the generator panicked"))?;
        watched.and(ran)
    })?;
    t.gen_sent()
}

/// A handler for SIGUSR1 that does nothing, installed without SA_RESTART:
/// the signal's only job is to end the generator's BPF_PROG_RUN call.
fn install_wakeup_handler() -> Result<()> {
    extern "C" fn wake(_: libc::c_int) {}
    static ONCE: std::sync::Once = std::sync::Once::new();
    let mut err = None;
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction with an empty mask and an
        // async-signal-safe handler (it does nothing).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = wake as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()) != 0 {
                err = Some(std::io::Error::last_os_error());
            }
        }
    });
    match err {
        Some(e) => Err(e).context("installing the generator's SIGUSR1 handler"),
        None => Ok(()),
    }
}

/// The frame `bench_gen` rewrites: Ethernet from the generator's NIC to
/// the gateway's, IPv4 with DF and TTL 64, UDP with 18 bytes of zeros and
/// complete checksums (a NIC delivers complete checksums; the XDP
/// variants' fast path needs them), addressed as flow 0.
fn template(t: &Topo) -> Vec<u8> {
    let flow = gen_tuple(0, 0);
    let src = Ipv4Addr::new(10, 1, 0, flow.src_last);
    let mut udp = Vec::with_capacity(26);
    udp.extend_from_slice(&flow.sport.to_be_bytes());
    udp.extend_from_slice(&flow.dport.to_be_bytes());
    udp.extend_from_slice(&26u16.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(&[0; 18]);
    let check = match l4_checksum(src, SINK_IP, IPPROTO_UDP, &udp) {
        // 0 means "no checksum" in UDP (RFC 768).
        0 => 0xffff,
        c => c,
    };
    udp[6..8].copy_from_slice(&check.to_be_bytes());
    let mut ip = vec![0x45, 0, 0, 46, 0, 0, 0x40, 0, 64, IPPROTO_UDP, 0, 0];
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&SINK_IP.octets());
    let check = internet_checksum(&ip);
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    let mut frame = Vec::with_capacity(60);
    frame.extend_from_slice(&t.gw_int.mac);
    frame.extend_from_slice(&t.gen_if.mac);
    frame.extend_from_slice(&0x0800u16.to_be_bytes());
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&udp);
    frame
}

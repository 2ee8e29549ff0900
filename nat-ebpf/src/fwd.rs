//! Benchmark-only programs (`cargo xtask bench`), built into their own
//! object (`nat-bench-ebpf`, see bench.rs) and never attached by the
//! loader: the forward-only XDP program that is the ceiling of a topology
//! (route lookup, MACs, TTL, redirect; no NAT), the sink's counter that
//! counts and drops the benchmark's UDP blast at the receiving end, and the
//! generator, which writes the blast and hands it to the gateway as raw
//! frames, the way a NIC delivers them, instead of as a socket's skbs.

use aya_ebpf::{
    EbpfContext,
    bindings::xdp_action::{XDP_ABORTED, XDP_DROP, XDP_PASS},
    helpers::{bpf_ktime_get_ns, bpf_redirect},
    macros::{map, xdp},
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};
use nat_common::{
    IPPROTO_UDP,
    bench::{GEN_FRAME_LEN, GenConfig, gen_due, gen_tuple, sink_counts},
    csum,
};

use crate::{
    fib::{self, Route},
    parse::{ETH_HLEN, Frame, IP_CHECK, IP_TTL, ipv4, read, write},
};

/// Packet counters: index 0 what [`bench_sink`] counted at the sink, index 1
/// what [`bench_gen`] handed to the gateway (the offered load).
#[map(name = "BENCH_SINK")]
static BENCH_SINK: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

#[inline(always)]
fn count(i: u32) {
    if let Some(c) = BENCH_SINK.get_ptr_mut(i) {
        // Per-CPU slot: no other CPU writes it.
        unsafe { *c += 1 };
    }
}

/// The generator's state ([`GenConfig`]), set by the benchmark.
#[map(name = "BENCH_GEN")]
static BENCH_GEN: Array<GenConfig> = Array::with_max_entries(1, 0);

// Offsets in the generator's 60-byte frame (Ethernet, IPv4 without
// options, UDP): the fields `bench_gen` rewrites.
const GEN_IP_CHECK: usize = ETH_HLEN + IP_CHECK;
/// The low 16 bits of the source address.
const GEN_SRC_LOW: usize = ETH_HLEN + 14;
const GEN_SPORT: usize = ETH_HLEN + 20;
const GEN_DPORT: usize = ETH_HLEN + 22;
const GEN_UDP_CHECK: usize = ETH_HLEN + 26;

/// The generator, never attached: the benchmark runs it through
/// BPF_PROG_RUN with live frames (BPF_F_TEST_XDP_LIVE_FRAMES), each run a
/// copy of one template frame that this program turns into packet `next`
/// of the run ([`gen_tuple`]) and redirects into the gateway's veth, which
/// receives it as a raw XDP frame, the way a NIC delivers it; or drops,
/// when the run's pace or limit says it is not due ([`gen_due`]). One
/// syscall runs until the benchmark interrupts it: each call costs an RCU
/// grace period (the live mode's page pool is torn down), tens of ms on
/// this VM, so pacing happens here, not between calls.
#[xdp]
pub fn bench_gen(ctx: XdpContext) -> u32 {
    generate(Frame::xdp(&ctx)).unwrap_or(XDP_ABORTED)
}

#[inline(always)]
fn generate(f: Frame) -> Option<u32> {
    let cfg = BENCH_GEN.get_ptr_mut(0)?;
    // One generating thread at a time: plain read-modify-writes suffice.
    let c = unsafe { &mut *cfg };
    let now = unsafe { bpf_ktime_get_ns() };
    if c.start_ns == 0 {
        c.start_ns = now;
    }
    if !gen_due(c, now) {
        // Early (or done): this frame is not sent; the run goes on.
        return Some(XDP_DROP);
    }
    let i = c.next;
    c.next = i.wrapping_add(1);
    c.sent += 1;
    let (flows, ifindex) = (c.flows, c.ifindex);
    // Within the map value: GEN_FRAME_LEN < its 64 bytes.
    let frame =
        unsafe { core::ptr::read_unaligned(c.frame.as_ptr() as *const [u8; GEN_FRAME_LEN]) };
    write(f, 0, frame)?;
    let t = gen_tuple(i, flows);
    // Flow 0's fields, made flow i's; the checksums follow (RFC 1624).
    let ip_check: u16 = read(f, GEN_IP_CHECK)?;
    let udp_check: u16 = read(f, GEN_UDP_CHECK)?;
    let old_src: u16 = read(f, GEN_SRC_LOW)?;
    let old_sport: u16 = read(f, GEN_SPORT)?;
    let old_dport: u16 = read(f, GEN_DPORT)?;
    let src = u16::from_be_bytes([0, t.src_last]).to_be();
    let sport = t.sport.to_be();
    let dport = t.dport.to_be();
    let udp = csum::replace2(udp_check, old_src, src);
    let udp = csum::replace2(udp, old_sport, sport);
    let udp = csum::replace2(udp, old_dport, dport);
    write(f, GEN_IP_CHECK, csum::replace2(ip_check, old_src, src))?;
    write(f, GEN_SRC_LOW, src)?;
    write(f, GEN_SPORT, sport)?;
    write(f, GEN_DPORT, dport)?;
    write(f, GEN_UDP_CHECK, csum::udp_sent(udp))?;
    count(1);
    Some(unsafe { bpf_redirect(ifindex, 0) } as u32)
}

/// Forwards IPv4 like the kernel would, minus everything else the kernel
/// does: the cheapest forwarding this topology allows.
#[xdp]
pub fn xdp_fwd_only(ctx: XdpContext) -> u32 {
    forward(&ctx, Frame::xdp(&ctx)).unwrap_or(XDP_PASS)
}

#[inline(always)]
fn forward(ctx: &XdpContext, f: Frame) -> Option<u32> {
    let ip = ipv4(f, f.data_end - f.data).ok()?;
    // The kernel answers expiring packets with ICMP Time Exceeded.
    if ip.ttl <= 1 {
        return None;
    }
    let iif = unsafe { (*ctx.ctx).ingress_ifindex };
    let Route::Resolved {
        ifindex,
        smac,
        dmac,
    } = fib::lookup(
        ctx.as_ptr(),
        iif,
        ip.proto,
        ip.saddr,
        0,
        ip.daddr,
        0,
        ip.tot_len,
    )
    else {
        return None;
    };
    let l3 = ETH_HLEN;
    let check: u16 = read(f, l3 + IP_CHECK)?;
    let old: u16 = read(f, l3 + IP_TTL)?;
    write::<u8>(f, l3 + IP_TTL, ip.ttl - 1)?;
    let new: u16 = read(f, l3 + IP_TTL)?;
    write(f, l3 + IP_CHECK, csum::replace2(check, old, new))?;
    write(f, 0, dmac)?;
    write(f, 6, smac)?;
    Some(unsafe { bpf_redirect(ifindex, 0) } as u32)
}

/// On the endpoints' interfaces: an XDP program, any, makes a veth take
/// frames redirected into it on its XDP receive path (without one, this
/// kernel delivered them to sockets milliseconds late).
#[xdp]
pub fn bench_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

/// On the benchmark sink's interface: counts and drops UDP to the
/// benchmark's ports ([`sink_counts`]), so measuring the forwarded rate
/// costs the receiving side little (and provokes no ICMP port
/// unreachable). Everything else (pings, TCP, the latency test's UDP)
/// goes on to the kernel. XDP: on 2 cores the sink shares its CPU with the
/// generator, and taking every frame into an skb for a TC counter capped
/// what it could count near what the XDP variants forward. The kernel
/// variants hand it skbs, which the veth runs through XDP all the same.
#[xdp]
pub fn bench_sink(ctx: XdpContext) -> u32 {
    let f = Frame::xdp(&ctx);
    let Ok(ip) = ipv4(f, f.data_end - f.data) else {
        return XDP_PASS;
    };
    if ip.proto != IPPROTO_UDP {
        return XDP_PASS;
    }
    // Constant offset from the parsed header start, checked as a whole.
    let Some(dport) = read::<[u8; 4]>(f, ip.l4_off).map(|h| u16::from_be_bytes([h[2], h[3]]))
    else {
        return XDP_PASS;
    };
    if !sink_counts(dport) {
        return XDP_PASS;
    }
    count(0);
    XDP_DROP
}

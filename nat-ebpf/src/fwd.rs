//! Benchmark-only programs (`cargo xtask bench`), built into their own
//! object (`nat-bench-ebpf`, see bench.rs) and never attached by the loader: the forward-only XDP program that is the ceiling of a topology
//! (route lookup, MACs, TTL, redirect; no NAT), the sink's counter that
//! counts and drops the benchmark's UDP blast at the receiving end, and the
//! generator's redirect that hands the blast to the gateway as raw frames,
//! the way a NIC delivers them, instead of as a socket's skbs.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        TC_ACT_OK, TC_ACT_SHOT,
        xdp_action::{XDP_DROP, XDP_PASS},
    },
    helpers::bpf_redirect,
    macros::{classifier, map, xdp},
    maps::{Array, PerCpuArray},
    programs::{TcContext, XdpContext},
};
use nat_common::{BENCH_SINK_PORT, IPPROTO_UDP, csum};

use crate::{
    fib::{self, Route},
    parse::{ETH_HLEN, Frame, IP_CHECK, IP_TTL, ipv4, read, write},
};

/// Packet counters: index 0 what [`bench_sink`] counted at the sink, index 1
/// what [`bench_redirect`] handed to the gateway (the offered load).
#[map(name = "BENCH_SINK")]
static BENCH_SINK: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

#[inline(always)]
fn count(i: u32) {
    if let Some(c) = BENCH_SINK.get_ptr_mut(i) {
        // Per-CPU slot: no other CPU writes it.
        unsafe { *c += 1 };
    }
}

/// Target ifindex of [`bench_redirect`] (index 0), set by the benchmark.
#[map(name = "BENCH_REDIRECT")]
static BENCH_REDIRECT: Array<u32> = Array::with_max_entries(1, 0);

/// In the generator: sends every frame arriving here out of the interface
/// in `BENCH_REDIRECT`, untouched. A frame redirected into a veth reaches
/// the peer as an XDP frame, not an skb.
#[xdp]
pub fn bench_redirect(_ctx: XdpContext) -> u32 {
    match BENCH_REDIRECT.get(0) {
        Some(&ifindex) if ifindex != 0 => {
            count(1);
            unsafe { bpf_redirect(ifindex, 0) as u32 }
        }
        _ => XDP_DROP,
    }
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

/// On the benchmark sink (TC ingress): counts and drops UDP to
/// [`BENCH_SINK_PORT`], so measuring the forwarded rate costs the receiving
/// side little (and provokes no ICMP port unreachable). Everything else goes
/// on to the kernel. TC rather than XDP: the sink then costs the same
/// whether the gateway hands it skbs (kernel variants) or XDP frames.
#[classifier]
pub fn bench_sink(ctx: TcContext) -> i32 {
    let f = Frame {
        data: ctx.data(),
        data_end: ctx.data_end(),
    };
    let Ok(ip) = ipv4(f, ctx.len() as usize) else {
        return TC_ACT_OK;
    };
    if ip.proto != IPPROTO_UDP {
        return TC_ACT_OK;
    }
    // Constant offset from the parsed header start, checked as a whole.
    let Some(dport) = read::<[u8; 4]>(f, ip.l4_off).map(|h| u16::from_be_bytes([h[2], h[3]]))
    else {
        return TC_ACT_OK;
    };
    if dport != BENCH_SINK_PORT {
        return TC_ACT_OK;
    }
    count(0);
    TC_ACT_SHOT
}

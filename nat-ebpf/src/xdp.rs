//! XDP programs: the fast path. A packet is either translated and redirected
//! here, dropped, passed to the kernel, or passed untouched to the TC program
//! of the same NIC when finishing it needs the skb (a possibly partial
//! checksum, an unresolved neighbour, an MTU problem).

use aya_ebpf::{
    EbpfContext,
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::bpf_redirect,
    macros::xdp,
    programs::XdpContext,
};
use nat_common::stats;
use nat_common::stats::{HOOK_XDP_EXT, HOOK_XDP_INT};

use crate::{
    maps::config,
    nat::{self, Decision, Egress, Hook},
    no_port,
    parse::{self, Frame, write},
    rewrite,
    stats::count,
};

/// On `--int`: source NAT of outbound packets.
#[xdp]
pub fn nat_xdp_int(ctx: XdpContext) -> u32 {
    let cfg = config();
    let f = Frame::xdp(&ctx);
    if !parse::for_us(f, &cfg.int_mac) {
        count(HOOK_XDP_INT, stats::PASS_OTHER_HOST);
        return XDP_PASS;
    }
    let d = nat::outbound(
        ctx.as_ptr(),
        f,
        f.data_end - f.data,
        cfg,
        Hook::Xdp,
        HOOK_XDP_INT,
    );
    // Out of ports: TC answers with ICMP (RFC 5508 REQ-8) unless the rate
    // limit is spent.
    let d = match d {
        Decision::Drop(stats::DROP_NO_PORT) => no_port::xdp(cfg, HOOK_XDP_INT),
        d => d,
    };
    finish(f, d, cfg.ext_ifindex, HOOK_XDP_INT, stats::XDP_OUT_FWD)
}

/// On `--ext`: reverse translation of replies.
#[xdp]
pub fn nat_xdp_ext(ctx: XdpContext) -> u32 {
    let cfg = config();
    let f = Frame::xdp(&ctx);
    if !parse::for_us(f, &cfg.ext_mac) {
        count(HOOK_XDP_EXT, stats::PASS_OTHER_HOST);
        return XDP_PASS;
    }
    let d = nat::inbound(
        ctx.as_ptr(),
        f,
        f.data_end - f.data,
        cfg,
        Hook::Xdp,
        HOOK_XDP_EXT,
    );
    finish(f, d, cfg.int_ifindex, HOOK_XDP_EXT, stats::XDP_IN_FWD)
}

#[inline(always)]
fn finish(f: Frame, d: Decision, egress_if: u32, hook: u32, fwd_reason: u32) -> u32 {
    let (action, reason) = match d {
        Decision::Pass(r) | Decision::ToTc(r) => (XDP_PASS, r),
        // Never produced for XDP (errors are handed to TC).
        Decision::IcmpErrorIn | Decision::IcmpErrorOut => (XDP_PASS, stats::XDP_TO_TC_ICMP_ERROR),
        // Never produced for XDP (fragments are handed to TC).
        Decision::Fragment => (XDP_PASS, stats::XDP_TO_TC_FRAGMENT),
        Decision::Drop(r) => (XDP_DROP, r),
        Decision::Translate(rw, route) => match nat::egress(route, egress_if) {
            Egress::Redirect {
                ifindex,
                smac,
                dmac,
            } => match rewrite::xdp(f, &rw).and_then(|()| macs(f, smac, dmac)) {
                Some(()) => (unsafe { bpf_redirect(ifindex, 0) } as u32, fwd_reason),
                None => (XDP_DROP, stats::DROP_INTERNAL),
            },
            Egress::Neigh { .. } => (XDP_PASS, stats::XDP_TO_TC_NO_NEIGH),
            Egress::TooBig => (XDP_PASS, stats::XDP_TO_TC_FIB),
            // Never produced for XDP (hairpin packets are handed to TC).
            Egress::Hairpin => (XDP_PASS, stats::XDP_TO_TC_HAIRPIN),
            Egress::Pass(r) => (XDP_PASS, r),
            Egress::Drop(r) => (XDP_DROP, r),
        },
    };
    count(hook, reason);
    action
}

#[inline(always)]
fn macs(f: Frame, smac: [u8; 6], dmac: [u8; 6]) -> Option<()> {
    write(f, 0, dmac)?;
    write(f, 6, smac)
}

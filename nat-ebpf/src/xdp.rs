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
use nat_common::stats::{HOOK_XDP_EXT, HOOK_XDP_INT};
use nat_common::{IPPROTO_TCP, csum, stats};

use crate::{
    maps::config,
    nat::{self, Decision, Egress, Hook, Rewrite},
    no_port,
    parse::{self, ETH_HLEN, Frame, IP_CHECK, IP_TTL, TCP_HLEN, UDP_HLEN, ptr_at, read, write},
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
            } => match rewrite(f, &rw, smac, dmac) {
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

/// Rewrites address, port, TTL, checksums and MACs in place. Every field was
/// bounds-checked by the parser; the checks here only satisfy the verifier.
#[inline(always)]
fn rewrite(f: Frame, rw: &Rewrite, smac: [u8; 6], dmac: [u8; 6]) -> Option<()> {
    let l3 = ETH_HLEN;
    let ip_check: u16 = read(f, l3 + IP_CHECK)?;
    let ttl_word_old: u16 = read(f, l3 + IP_TTL)?;
    write::<u8>(f, l3 + IP_TTL, rw.ttl - 1)?;
    let ttl_word_new: u16 = read(f, l3 + IP_TTL)?;
    let ip_check = csum::ip_after(
        ip_check,
        rw.old_addr,
        rw.new_addr,
        ttl_word_old,
        ttl_word_new,
    );
    let l4_check = csum::l4_after(
        rw.proto,
        rw.l4_check,
        rw.old_addr,
        rw.new_addr,
        rw.old_port,
        rw.new_port,
    );
    write(f, rw.addr_off, rw.new_addr)?;
    write(f, l3 + IP_CHECK, ip_check)?;
    // One checked pointer to the L4 header, constant offsets from it (see
    // parse::TCP_HLEN).
    let (port_at, check_at) = rw.l4_fields();
    let h = if rw.proto == IPPROTO_TCP {
        ptr_at::<[u8; TCP_HLEN]>(f, rw.l4_off)? as *mut u8
    } else {
        ptr_at::<[u8; UDP_HLEN]>(f, rw.l4_off)? as *mut u8
    };
    // SAFETY: both offsets are constants inside the checked header.
    unsafe {
        core::ptr::write_unaligned(h.add(port_at) as *mut u16, rw.new_port);
        core::ptr::write_unaligned(h.add(check_at) as *mut u16, l4_check);
    }
    write(f, 0, dmac)?;
    write(f, 6, smac)
}

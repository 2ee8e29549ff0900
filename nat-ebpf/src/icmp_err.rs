//! ICMP error translation (RFC 5508 REQ-3..6, RFC 5382 REQ-9, RFC 4787
//! REQ-12): a Destination Unreachable (Fragmentation Needed included), Time
//! Exceeded or Parameter Problem about a translated packet goes back to the
//! inside host with the quoted packet restored to what that host sent, so
//! traceroute and path MTU discovery work through the gateway.
//!
//! Errors are rare, so they take the TC path only (XDP hands them over):
//! the skb helpers load and store at variable offsets and fix checksums
//! without hand-written bounds proofs. Both checksums the RFC asks about
//! are verified first; no error ever creates, refreshes or ends a session.
//!
//! Errors from outside are translated by `nat_tc_ext` itself
//! ([`inbound`]); errors from inside by a program of their own,
//! `nat_tc_icmp_out`, tail-called by `nat_tc_int`, which has no stack to
//! spare for them.

use aya_ebpf::{
    EbpfContext,
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use nat_common::{
    BindKey, CtKey, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, NatConfig, csum,
    stats::{self, HOOK_TC_EXT, HOOK_TC_INT},
};

use crate::{
    conntrack,
    csum::skb_sum,
    fib, forward,
    maps::{CT_FWD, NAT_BIND_REV, config},
    parse::{self, ETH_HLEN, Frame, ICMP_ECHO_REQUEST, IP_CHECK, IP_DADDR, IP_SADDR, Ipv4},
    pool, rewrite,
    stats::count,
};

/// Longest ICMP message whose checksum is verified (and so translated):
/// RFC 1812 routers quote at most 576 bytes in all; this leaves room for
/// RFC 4884 extensions.
const MAX_ICMP_LEN: usize = 1480;

/// The quoted packet of an inbound error: our translated outbound packet,
/// `snat:ext_port -> remote:rport`.
struct Quoted {
    ip: usize,
    ihl: usize,
    l4: usize,
    proto: u8,
    remote: u32,
    ext_port: u16,
    rport: u16,
    /// Offset of the port (or echo identifier) in the quoted L4 header.
    port_at: usize,
}

/// Tail-called by `nat_tc_int` with an ICMP error from inside ([`outbound`]).
/// Counts at `nat_tc_int`'s hook.
#[classifier]
pub fn nat_tc_icmp_out(ctx: TcContext) -> i32 {
    let (action, reason) = match try_nat_tc_icmp_out(&ctx) {
        Ok(r) => r,
        Err(reason) => (TC_ACT_SHOT, reason),
    };
    count(HOOK_TC_INT, reason);
    action
}

#[inline(always)]
fn try_nat_tc_icmp_out(ctx: &TcContext) -> Result<(i32, u32), u32> {
    let f = Frame::tc(ctx);
    let ip = parse::ipv4(f, ctx.len() as usize).map_err(|_| stats::DROP_MALFORMED)?;
    outbound(ctx, &ip, config())
}

/// An ICMP error that arrived on `--ext` addressed to the SNAT address:
/// `nat_tc_ext`'s part. Returns the TC verdict and the reason to count.
#[inline(always)]
pub fn inbound(ctx: &TcContext, f: Frame, cfg: &NatConfig) -> (i32, u32) {
    // Parsed again rather than carried in the decision: a bigger decision
    // makes the compiler copy undefined enum fields, which the verifier
    // rejects.
    let r = match parse::ipv4(f, ctx.len() as usize) {
        Ok(ip) => try_inbound(ctx, &ip, cfg),
        Err(_) => Err(stats::DROP_MALFORMED),
    };
    match r {
        Ok(r) => r,
        Err(reason) => (TC_ACT_SHOT, reason),
    }
}

#[inline(always)]
fn load<T>(ctx: &TcContext, off: usize) -> Result<T, u32> {
    ctx.load(off).map_err(|_| stats::DROP_MALFORMED)
}

#[inline(always)]
fn quoted(ctx: &TcContext, ip: &Ipv4) -> Result<Quoted, u32> {
    let end = ETH_HLEN + ip.tot_len as usize;
    let q = ip.l4_off + 8;
    let vihl: u8 = load(ctx, q)?;
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || ihl < 20 {
        return Err(stats::DROP_MALFORMED);
    }
    let l4 = q + ihl;
    // RFC 792: the quote holds at least 8 bytes of the L4 header.
    if l4 + 8 > end {
        return Err(stats::DROP_MALFORMED);
    }
    let proto: u8 = load(ctx, q + 9)?;
    let (ext_port, rport, port_at) = match proto {
        IPPROTO_TCP | IPPROTO_UDP => (load(ctx, l4)?, load(ctx, l4 + 2)?, 0),
        IPPROTO_ICMP => {
            let t: u8 = load(ctx, l4)?;
            if t != ICMP_ECHO_REQUEST {
                return Err(stats::DROP_ICMP_ERROR_UNTRACKED);
            }
            (load(ctx, l4 + 4)?, 0, 4)
        }
        _ => return Err(stats::DROP_ICMP_ERROR_UNTRACKED),
    };
    Ok(Quoted {
        ip: q,
        ihl,
        l4,
        proto,
        remote: load(ctx, q + IP_DADDR)?,
        ext_port,
        rport,
        port_at,
    })
}

/// RFC 5508 REQ-3: an error whose ICMP checksum or quoted IP header
/// checksum does not verify is dropped; so is one too long to check, and
/// one whose TTL runs out here.
#[inline(always)]
fn verify(ctx: &TcContext, ip: &Ipv4, q: &Quoted) -> Result<(), u32> {
    let icmp_len = ip.tot_len as usize - (ip.l4_off - ETH_HLEN);
    if icmp_len > MAX_ICMP_LEN {
        return Err(stats::DROP_ICMP_ERROR_UNTRACKED);
    }
    let icmp = skb_sum::<MAX_ICMP_LEN>(ctx, ip.l4_off, icmp_len).ok_or(stats::DROP_MALFORMED)?;
    let quoted_ip = skb_sum::<60>(ctx, q.ip, q.ihl.min(60)).ok_or(stats::DROP_MALFORMED)?;
    if csum::fold(icmp) != 0xffff || csum::fold(quoted_ip) != 0xffff {
        return Err(stats::DROP_BAD_CHECKSUM);
    }
    if ip.ttl <= 1 {
        return Err(stats::DROP_TTL_EXPIRED);
    }
    Ok(())
}

#[inline(always)]
fn try_inbound(ctx: &TcContext, ip: &Ipv4, cfg: &NatConfig) -> Result<(i32, u32), u32> {
    let q = quoted(ctx, ip)?;
    let snat: u32 = load(ctx, q.ip + IP_SADDR)?;
    // About the gateway's own traffic (or another address): the kernel's.
    if !pool::may_own(snat) {
        return Ok((TC_ACT_OK, stats::PASS_LOCAL));
    }
    let Some(b) = (unsafe { NAT_BIND_REV.get(BindKey::new(q.proto, snat, q.ext_port)) }) else {
        return Ok((TC_ACT_OK, stats::PASS_LOCAL));
    };
    let (inside, iport) = (b.addr, b.port);
    let session = CtKey::new(q.proto, inside, iport, q.remote, q.rport);
    if unsafe { CT_FWD.get(session) }.is_none() {
        return Err(stats::DROP_ICMP_ERROR_UNTRACKED);
    }
    verify(ctx, ip, &q)?;
    let route = fib::lookup(
        ctx.as_ptr(),
        cfg.ext_ifindex,
        IPPROTO_ICMP,
        ip.saddr,
        0,
        inside,
        0,
        0,
    );
    forward::send(
        ctx,
        forward::egress(route, cfg.int_ifindex),
        stats::TC_IN_ICMP_ERROR_FWD,
        (HOOK_TC_EXT, IPPROTO_ICMP),
        || rewrite_in(ctx, ip, &q, inside, iport),
        |_, _| {},
    )
}

/// Outer destination → inside host; quoted source address and port →
/// what the inside host sent; every checksum (outer IP, quoted IP, quoted
/// L4 when quoted, ICMP) kept right.
#[inline(always)]
fn rewrite_in(ctx: &TcContext, ip: &Ipv4, q: &Quoted, inside: u32, iport: u16) -> Result<(), i64> {
    let snat = ip.daddr;
    let icmp_check = ip.l4_off + 2;
    // Outer header.
    rewrite::ip_addr(ctx, ETH_HLEN + IP_DADDR, snat, inside)?;
    rewrite::decrement_ttl(ctx, ip.ttl)?;
    // Quoted IP header: its source, and its checksum; the ICMP checksum
    // covers both.
    let q_check = q.ip + IP_CHECK;
    let q_check_old: u16 = ctx.load(q_check)?;
    ctx.store(q.ip + IP_SADDR, &inside, 0)?;
    ctx.l3_csum_replace(q_check, snat as u64, inside as u64, 4)?;
    let q_check_new: u16 = ctx.load(q_check)?;
    ctx.l3_csum_replace(icmp_check, snat as u64, inside as u64, 4)?;
    ctx.l3_csum_replace(icmp_check, q_check_old as u64, q_check_new as u64, 2)?;
    // Quoted port (or echo identifier).
    ctx.store(q.l4 + q.port_at, &iport, 0)?;
    ctx.l3_csum_replace(icmp_check, q.ext_port as u64, iport as u64, 2)?;
    // Quoted L4 checksum, when the quote reaches it.
    let end = ETH_HLEN + ip.tot_len as usize;
    let at = match q.proto {
        IPPROTO_TCP => q.l4 + 16,
        IPPROTO_UDP => q.l4 + 6,
        _ => q.l4 + 2,
    };
    if at + 2 <= end {
        let old: u16 = ctx.load(at)?;
        let new = csum::l4_after(q.proto, old, snat, inside, q.ext_port, iport);
        if new != old {
            ctx.store(at, &new, 0)?;
            ctx.l3_csum_replace(icmp_check, old as u64, new as u64, 2)?;
        }
    }
    Ok(())
}

/// An ICMP error from inside (an inside host or router) about a packet
/// that came in through the gateway: RFC 5508 REQ-5. The quoted packet is
/// `remote:rport -> inside:iport` as the inside host got it; it goes out
/// restored to `remote:rport -> snat:ext_port`, from the SNAT address. When
/// the "remote" is itself the SNAT address (a hairpinned packet, REQ-7),
/// the error goes back inside to the sender, both ends restored.
#[inline(always)]
fn outbound(ctx: &TcContext, ip: &Ipv4, cfg: &NatConfig) -> Result<(i32, u32), u32> {
    let q = quoted(ctx, ip)?;
    if q.proto == IPPROTO_ICMP {
        // Inside hosts never get echo requests through the gateway.
        return Err(stats::DROP_ICMP_ERROR_UNTRACKED);
    }
    // Named for an inbound quote by quoted(); here the quote's source is
    // the remote and its destination the inside endpoint.
    let (rport, inside, iport) = (q.ext_port, q.remote, q.rport);
    let remote: u32 = load(ctx, q.ip + IP_SADDR)?;
    let session = CtKey::new(q.proto, inside, iport, remote, rport);
    let Some(s) = (unsafe { CT_FWD.get(session) }) else {
        return Err(stats::DROP_ICMP_ERROR_UNTRACKED);
    };
    let (snat, ext_port) = conntrack::external(s);
    // Hairpinned: the "remote" is another inside host's external endpoint.
    let owner = if pool::may_own(remote) {
        unsafe { NAT_BIND_REV.get(BindKey::new(q.proto, remote, rport)) }.map(|b| (b.addr, b.port))
    } else {
        None
    };
    let hairpin = owner.is_some();
    let (sender, sender_port) = owner.unwrap_or((remote, rport));
    verify(ctx, ip, &q)?;
    let (dst, egress_if, from) = if hairpin {
        // No source for the lookup: the SNAT address's policy rule would
        // pick --ext's table.
        (sender, cfg.int_ifindex, 0)
    } else {
        (ip.daddr, cfg.ext_ifindex, snat)
    };
    let route = fib::lookup(
        ctx.as_ptr(),
        cfg.int_ifindex,
        IPPROTO_ICMP,
        from,
        0,
        dst,
        0,
        0,
    );
    let rw = OutRewrite {
        snat,
        ext_port,
        inside,
        iport,
        hairpin,
        sender,
        sender_port,
        rport,
    };
    forward::send(
        ctx,
        forward::egress(route, egress_if),
        stats::TC_OUT_ICMP_ERROR_FWD,
        (HOOK_TC_INT, IPPROTO_ICMP),
        || rewrite_out(ctx, ip, &q, &rw),
        |_, _| {},
    )
}

struct OutRewrite {
    snat: u32,
    ext_port: u16,
    inside: u32,
    iport: u16,
    hairpin: bool,
    sender: u32,
    sender_port: u16,
    rport: u16,
}

/// Replaces a 4-byte address at `at` inside the quote, keeping the quoted
/// IP checksum and the ICMP checksum right.
#[inline(always)]
fn quoted_addr(
    ctx: &TcContext,
    q: &Quoted,
    icmp_check: usize,
    at: usize,
    old: u32,
    new: u32,
) -> Result<(), i64> {
    let q_check = q.ip + IP_CHECK;
    let q_check_old: u16 = ctx.load(q_check)?;
    ctx.store(at, &new, 0)?;
    ctx.l3_csum_replace(q_check, old as u64, new as u64, 4)?;
    let q_check_new: u16 = ctx.load(q_check)?;
    ctx.l3_csum_replace(icmp_check, old as u64, new as u64, 4)?;
    ctx.l3_csum_replace(icmp_check, q_check_old as u64, q_check_new as u64, 2)
}

#[inline(always)]
fn rewrite_out(ctx: &TcContext, ip: &Ipv4, q: &Quoted, rw: &OutRewrite) -> Result<(), i64> {
    let icmp_check = ip.l4_off + 2;
    // Outer header: from the SNAT address (to the sender, when hairpinned).
    rewrite::ip_addr(ctx, ETH_HLEN + IP_SADDR, ip.saddr, rw.snat)?;
    if rw.hairpin {
        rewrite::ip_addr(ctx, ETH_HLEN + IP_DADDR, ip.daddr, rw.sender)?;
    }
    rewrite::decrement_ttl(ctx, ip.ttl)?;
    // The quote: its destination back to the external endpoint...
    quoted_addr(ctx, q, icmp_check, q.ip + IP_DADDR, rw.inside, rw.snat)?;
    ctx.store(q.l4 + 2, &rw.ext_port, 0)?;
    ctx.l3_csum_replace(icmp_check, rw.iport as u64, rw.ext_port as u64, 2)?;
    // ...and, hairpinned, its source back to the sender's own endpoint.
    if rw.hairpin {
        quoted_addr(ctx, q, icmp_check, q.ip + IP_SADDR, rw.snat, rw.sender)?;
        ctx.store(q.l4, &rw.sender_port, 0)?;
        ctx.l3_csum_replace(icmp_check, rw.rport as u64, rw.sender_port as u64, 2)?;
    }
    // The quoted L4 checksum, when the quote reaches it.
    let end = ETH_HLEN + ip.tot_len as usize;
    let at = if q.proto == IPPROTO_TCP {
        q.l4 + 16
    } else {
        q.l4 + 6
    };
    if at + 2 <= end {
        let old: u16 = ctx.load(at)?;
        if !(q.proto == IPPROTO_UDP && old == 0) {
            let mut new = csum::l4_after(q.proto, old, rw.inside, rw.snat, rw.iport, rw.ext_port);
            if rw.hairpin {
                // Both ends of a hairpinned quote: the second update starts
                // from the first one's (for UDP, a 0 already sent as 0xffff:
                // the same one's complement value).
                new = csum::l4_after(q.proto, new, rw.snat, rw.sender, rw.rport, rw.sender_port);
            }
            ctx.store(at, &new, 0)?;
            ctx.l3_csum_replace(icmp_check, old as u64, new as u64, 2)?;
        }
    }
    Ok(())
}

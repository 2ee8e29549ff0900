//! The translation decision, shared by the XDP and TC programs: parse → look
//! up (or create) the flow → decide the rewrite and the route. Applying the
//! rewrite and forwarding differ per hook and live in xdp.rs and tc.rs.

use aya_ebpf::{cty::c_void, helpers::bpf_ktime_get_ns};
use nat_common::{
    CtKey, IPPROTO_ICMP, IPPROTO_TCP, NatConfig, csum, stats,
    tcp::{self, DIR_IN, DIR_OUT},
};

use crate::{
    conntrack,
    fib::{self, Route},
    maps::CT_FWD,
    parse::{self, Frame, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, IP_DADDR, IP_SADDR, Ipv4, L4, Stop},
    rewrite::Rewrite,
};

/// Which hook is deciding: XDP sees frames without the skb's checksum
/// state, so it hands packets whose L4 checksum may be partial to TC.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Xdp,
    Tc,
    /// TC, in the fragment program (frag.rs): first fragments are
    /// translated like whole packets.
    TcFragment,
}

pub enum Decision {
    /// Leave the packet to the kernel, untouched.
    Pass(u32),
    /// Drop it.
    Drop(u32),
    /// XDP only: hand the untouched packet to the TC program.
    ToTc(u32),
    /// Translate it and forward along `route`.
    Translate(Rewrite, Route),
    /// TC only: an ICMP error addressed to the SNAT address, for
    /// icmp_err to translate back.
    IcmpErrorIn,
    /// TC only: an ICMP error from an inside host about a packet it got
    /// through the gateway, for icmp_err to translate out.
    IcmpErrorOut,
    /// TC only: an IP fragment, for the fragment program (frag.rs).
    Fragment,
}

/// Everything about a packet both directions need.
struct Parsed {
    ip: Ipv4,
    l4: L4,
}

/// What the common parse needs to know about the direction it parses.
#[derive(Clone, Copy)]
struct Side {
    iif: u32,
    /// The ICMP query type this direction translates.
    wanted_icmp: u8,
    /// The drop reason for a packet of no protocol we translate.
    not_ours: u32,
    /// Inbound: ICMP errors addressed here are ours to translate (else 0).
    icmp_errors_for: u32,
    /// Outbound: the SNAT address, for ICMP errors from inside (else 0).
    icmp_errors_out_snat: u32,
    hook: Hook,
}

/// Common parse; `Err` is the final decision for a packet that is not ours
/// to translate.
#[inline(always)]
fn parse(ctx: *mut c_void, f: Frame, pkt_len: usize, side: &Side) -> Result<Parsed, Decision> {
    let Side {
        iif,
        wanted_icmp,
        not_ours,
        icmp_errors_for,
        icmp_errors_out_snat,
        hook,
    } = *side;
    let ip = match parse::ipv4(f, pkt_len) {
        Ok(ip) => ip,
        Err(Stop::NotIpv4) => return Err(Decision::Pass(stats::PASS_NOT_IPV4)),
        Err(Stop::Malformed) => return Err(Decision::Drop(stats::DROP_MALFORMED)),
    };
    // Traffic for the gateway itself is never translated; deciding that
    // costs a FIB lookup, so it is asked only of packets we would not
    // translate anyway.
    let local_or = |reason: u32, local_reason: u32| {
        if fib::is_local(ctx, iif, ip.saddr, ip.daddr) {
            Decision::Pass(local_reason)
        } else {
            Decision::Drop(reason)
        }
    };
    if ip.frag != 0 {
        match hook {
            Hook::Xdp => return Err(Decision::ToTc(stats::XDP_TO_TC_FRAGMENT)),
            Hook::Tc => return Err(Decision::Fragment),
            // The first fragment carries the L4 header: it is translated
            // like a whole packet (its L4 checksum covers the whole
            // datagram, and the incremental update only depends on the
            // changed fields).
            Hook::TcFragment if ip.frag & parse::FRAG_OFFSET == 0 => {}
            // frag.rs translates following fragments itself.
            Hook::TcFragment => return Err(Decision::Drop(stats::DROP_INTERNAL)),
        }
    }
    let l4 = match parse::l4(f, &ip) {
        Ok(Some(l4)) => l4,
        Ok(None) => return Err(local_or(not_ours, stats::PASS_LOCAL)),
        Err(reason) => return Err(Decision::Drop(reason)),
    };
    if ip.proto == IPPROTO_ICMP && l4.icmp_type != wanted_icmp {
        if parse::icmp_is_error(l4.icmp_type) {
            if icmp_errors_for != 0 && ip.daddr == icmp_errors_for {
                return Err(Decision::IcmpErrorIn);
            }
            // From inside: to a remote, or hairpinned to the SNAT address;
            // an error for the gateway itself is the kernel's.
            if icmp_errors_out_snat != 0
                && (ip.daddr == icmp_errors_out_snat
                    || !fib::is_local(ctx, iif, ip.saddr, ip.daddr))
            {
                return Err(Decision::IcmpErrorOut);
            }
        }
        return Err(local_or(not_ours, stats::PASS_ICMP_OTHER));
    }
    Ok(Parsed { ip, l4 })
}

/// Whether XDP must leave this packet to TC because its L4 checksum may be
/// partial (see nat_common::csum::maybe_partial).
#[inline(always)]
fn maybe_partial(p: &Parsed) -> bool {
    let l4_len = p.ip.tot_len - (p.ip.l4_off - parse::ETH_HLEN) as u16;
    csum::l4_maybe_partial(p.ip.proto, p.l4.check, p.ip.saddr, p.ip.daddr, l4_len)
}

/// Whether XDP must leave this packet to TC to clamp its MSS option
/// (`--mss-clamp`: TCP SYN and SYN-ACK; TC does the option walk).
#[inline(always)]
fn mss_clamp_wanted(p: &Parsed, cfg: &NatConfig) -> bool {
    cfg.mss_clamp != 0 && p.ip.proto == IPPROTO_TCP && p.l4.tcp_flags & tcp::TCP_SYN != 0
}

/// Packets from `--int`: source NAT.
#[inline(always)]
pub fn outbound(
    ctx: *mut c_void,
    f: Frame,
    pkt_len: usize,
    cfg: &NatConfig,
    hook: Hook,
    stat_hook: u32,
) -> Decision {
    let side = Side {
        iif: cfg.int_ifindex,
        wanted_icmp: ICMP_ECHO_REQUEST,
        not_ours: stats::DROP_UNSUPPORTED,
        icmp_errors_for: 0,
        icmp_errors_out_snat: cfg.snat_addr,
        hook,
    };
    let p = match parse(ctx, f, pkt_len, &side) {
        Ok(p) => p,
        Err(d) => return d,
    };
    // To another inside host's mapping (hairpinning): ICMP to the SNAT
    // address is for the gateway itself (an echo has no destination port to
    // find a binding by), and so is a port nobody inside is bound to.
    let hairpin = p.ip.daddr == cfg.snat_addr
        && p.ip.proto != IPPROTO_ICMP
        && conntrack::is_bound(p.ip.proto, cfg.snat_addr, p.l4.dport);
    if hairpin && hook == Hook::Xdp {
        return Decision::ToTc(stats::XDP_TO_TC_HAIRPIN);
    }
    if hook == Hook::Xdp && maybe_partial(&p) {
        return Decision::ToTc(stats::XDP_TO_TC_PARTIAL_CSUM);
    }
    if hook == Hook::Xdp && mss_clamp_wanted(&p, cfg) {
        return Decision::ToTc(stats::XDP_TO_TC_MSS);
    }
    let (sport, dport) = if p.ip.proto == IPPROTO_ICMP {
        (p.l4.id, 0)
    } else {
        (p.l4.sport, p.l4.dport)
    };
    let key = CtKey::new(p.ip.proto, p.ip.saddr, sport, p.ip.daddr, dport);
    let now = unsafe { bpf_ktime_get_ns() };
    let fwd = match CT_FWD.get_ptr_mut(key) {
        Some(v) => {
            if p.ip.proto == IPPROTO_TCP && tcp::is_control(p.l4.tcp_flags) {
                conntrack::tcp_update(v, DIR_OUT, p.l4.tcp_flags);
            }
            v
        }
        None => {
            // Only traffic the kernel would send out of --ext is NATed;
            // classify by the original source so policy routing applies.
            if hairpin {
                // Goes back inside, whatever the route to the SNAT address.
            } else {
                match fib::lookup(
                    ctx,
                    cfg.int_ifindex,
                    p.ip.proto,
                    p.ip.saddr,
                    sport,
                    p.ip.daddr,
                    dport,
                    0,
                ) {
                    Route::Local => return Decision::Pass(stats::PASS_LOCAL),
                    Route::Unreachable => return Decision::Drop(stats::DROP_NO_ROUTE),
                    Route::Resolved { ifindex, .. }
                    | Route::NoNeigh { ifindex, .. }
                    | Route::FragNeeded { ifindex } => {
                        if ifindex != cfg.ext_ifindex {
                            return Decision::Pass(stats::PASS_NOT_TO_EXT);
                        }
                    }
                    Route::Other => return Decision::Pass(stats::PASS_NOT_TO_EXT),
                    Route::Hairpin => {}
                }
            }
            // No state for a packet that will not be forwarded.
            if p.ip.ttl <= 1 {
                return Decision::Pass(stats::PASS_TTL_EXPIRED);
            }
            match conntrack::create(&key, cfg, now, p.l4.tcp_flags) {
                Ok((v, bind_event, event)) => {
                    if let Some(e) = bind_event {
                        crate::stats::count(stat_hook, e);
                    }
                    crate::stats::count(stat_hook, event);
                    v
                }
                Err(reason) => return Decision::Drop(reason),
            }
        }
    };
    if p.ip.ttl <= 1 {
        return Decision::Pass(stats::PASS_TTL_EXPIRED);
    }
    conntrack::touch(fwd, now, p.ip.proto, DIR_OUT, cfg);
    let (snat_addr, snat_port) = unsafe { (*fwd).snat_addr_port() };
    let rw = Rewrite {
        proto: p.ip.proto,
        addr_off: parse::ETH_HLEN + IP_SADDR,
        old_addr: p.ip.saddr,
        new_addr: snat_addr,
        dir: DIR_OUT,
        l4_off: p.ip.l4_off,
        old_port: sport,
        new_port: snat_port,
        l4_check: p.l4.check,
        ttl: p.ip.ttl,
        df: p.ip.df,
    };
    let (fsport, fdport) = if p.ip.proto == IPPROTO_ICMP {
        (0, 0)
    } else {
        (snat_port, dport)
    };
    if hairpin {
        return Decision::Translate(rw, Route::Hairpin);
    }
    let tot_len = if hook == Hook::Xdp { p.ip.tot_len } else { 0 };
    let route = fib::lookup(
        ctx,
        cfg.int_ifindex,
        p.ip.proto,
        snat_addr,
        fsport,
        p.ip.daddr,
        fdport,
        tot_len,
    );
    Decision::Translate(rw, route)
}

/// Packets from `--ext`: replies of tracked flows go back in; nothing else
/// reaches the inside.
#[inline(always)]
pub fn inbound(
    ctx: *mut c_void,
    f: Frame,
    pkt_len: usize,
    cfg: &NatConfig,
    hook: Hook,
    stat_hook: u32,
) -> Decision {
    let side = Side {
        iif: cfg.ext_ifindex,
        wanted_icmp: ICMP_ECHO_REPLY,
        not_ours: stats::DROP_UNSOLICITED,
        icmp_errors_for: cfg.snat_addr,
        icmp_errors_out_snat: 0,
        hook,
    };
    let p = match parse(ctx, f, pkt_len, &side) {
        Ok(p) => p,
        Err(d) => return d,
    };
    if hook == Hook::Xdp && maybe_partial(&p) {
        return Decision::ToTc(stats::XDP_TO_TC_PARTIAL_CSUM);
    }
    let (sport, dport) = if p.ip.proto == IPPROTO_ICMP {
        (0, p.l4.id)
    } else {
        (p.l4.sport, p.l4.dport)
    };
    let reply = CtKey::new(p.ip.proto, p.ip.saddr, sport, p.ip.daddr, dport);
    let now = unsafe { bpf_ktime_get_ns() };
    let (session, inside_addr, inside_port) =
        match conntrack::inbound(&reply, cfg, now, p.l4.tcp_flags) {
            Ok((s, addr, port, event)) => {
                if let Some(e) = event {
                    crate::stats::count(stat_hook, e);
                }
                (s, addr, port)
            }
            // No binding: the gateway's own traffic, or nothing of ours.
            Err(None) => return unsolicited(ctx, cfg, &p),
            // A bound port belongs to the NAT: refused silently, never
            // answered by the kernel (RFC 5382 REQ-4).
            Err(Some(reason)) => return Decision::Drop(reason),
        };
    // Only SYNs and SYN-ACKs that have a session: a SYN flood from outside
    // stays in XDP.
    if hook == Hook::Xdp && mss_clamp_wanted(&p, cfg) {
        return Decision::ToTc(stats::XDP_TO_TC_MSS);
    }
    if p.ip.ttl <= 1 {
        // Addressed to our SNAT address, so the kernel would deliver it
        // locally rather than answer Time Exceeded: nothing useful to pass.
        return Decision::Drop(stats::DROP_TTL_EXPIRED);
    }
    conntrack::touch(session, now, p.ip.proto, DIR_IN, cfg);
    if p.ip.proto == IPPROTO_TCP && tcp::is_control(p.l4.tcp_flags) {
        conntrack::tcp_update(session, DIR_IN, p.l4.tcp_flags);
    }
    let rw = Rewrite {
        proto: p.ip.proto,
        addr_off: parse::ETH_HLEN + IP_DADDR,
        old_addr: p.ip.daddr,
        new_addr: inside_addr,
        dir: DIR_IN,
        l4_off: p.ip.l4_off,
        old_port: dport,
        new_port: inside_port,
        l4_check: p.l4.check,
        ttl: p.ip.ttl,
        df: p.ip.df,
    };
    let (fsport, fdport) = if p.ip.proto == IPPROTO_ICMP {
        (0, 0)
    } else {
        (sport, inside_port)
    };
    let tot_len = if hook == Hook::Xdp { p.ip.tot_len } else { 0 };
    let route = fib::lookup(
        ctx,
        cfg.ext_ifindex,
        p.ip.proto,
        p.ip.saddr,
        fsport,
        inside_addr,
        fdport,
        tot_len,
    );
    Decision::Translate(rw, route)
}

/// An inbound packet no session takes: the gateway's own traffic goes to
/// the kernel, the rest is dropped.
#[inline(always)]
fn unsolicited(ctx: *mut c_void, cfg: &NatConfig, p: &Parsed) -> Decision {
    if fib::is_local(ctx, cfg.ext_ifindex, p.ip.saddr, p.ip.daddr) {
        Decision::Pass(stats::PASS_LOCAL)
    } else {
        Decision::Drop(stats::DROP_UNSOLICITED)
    }
}

/// How a translated packet leaves, given its route and the NIC it must
/// leave by.
pub enum Egress {
    /// MACs resolved: rewrite and redirect.
    Redirect {
        ifindex: u32,
        smac: [u8; 6],
        dmac: [u8; 6],
    },
    /// Route fine, neighbour unresolved (TC resolves it; XDP hands to TC).
    Neigh {
        ifindex: u32,
        nexthop: u32,
    },
    /// Too big for the egress MTU (DF or not is the caller's business).
    TooBig,
    /// Source-translated, to be translated again as inbound (TC only).
    Hairpin,
    /// A final verdict without translation.
    Pass(u32),
    Drop(u32),
}

#[inline(always)]
pub fn egress(route: Route, expected_ifindex: u32) -> Egress {
    match route {
        Route::Resolved {
            ifindex,
            smac,
            dmac,
        } if ifindex == expected_ifindex => Egress::Redirect {
            ifindex,
            smac,
            dmac,
        },
        Route::NoNeigh { ifindex, nexthop } if ifindex == expected_ifindex => {
            Egress::Neigh { ifindex, nexthop }
        }
        // The kernel stops before filling in the egress ifindex when the MTU
        // check fails, so it cannot be compared here; TC looks again.
        Route::FragNeeded { .. } => Egress::TooBig,
        Route::Hairpin => Egress::Hairpin,
        Route::Local => Egress::Pass(stats::PASS_LOCAL),
        Route::Unreachable => Egress::Drop(stats::DROP_NO_ROUTE),
        Route::Other => Egress::Drop(stats::DROP_NO_ROUTE),
        _ => Egress::Drop(stats::DROP_WRONG_EGRESS),
    }
}

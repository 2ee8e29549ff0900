//! The decision stage, the same code for every program: classify the parsed
//! packet, look up (or create) its flow, and decide the rewrite and the
//! route. Applying the rewrite (rewrite.rs) and forwarding (forward.rs)
//! come after.
//!
//! What differs between the programs is what each can do with a packet it
//! does not translate itself: XDP hands it to TC, TC to a tail-called
//! program. So each kind of program gets a decision type of its own with
//! only the outcomes it can have ([`XdpDecision`], [`TcOut`], [`TcIn`],
//! [`FirstFragment`]), and the shared code builds them through [`Decide`].

use core::convert::Infallible;

use aya_ebpf::{cty::c_void, helpers::bpf_ktime_get_ns};
use nat_common::{
    CFG_F_TRANSLOG, CtKey, IPPROTO_ICMP, IPPROTO_TCP, NatConfig, TRANSLOG_CREATED,
    TRANSLOG_NO_PORT, addr, csum, mss, stats,
    tcp::{self, DIR_IN, DIR_OUT},
};

use crate::{
    conntrack,
    fib::{self, Route},
    maps::CT_FWD,
    parse::{
        self, FRAG_OFFSET, Frame, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, IP_DADDR, IP_SADDR, Ipv4, L4,
        Stop,
    },
    policy, pool,
    rewrite::Rewrite,
    stats::count,
    translog,
};

/// The XDP programs' decision.
pub enum XdpDecision {
    /// Translate it and forward it along the route.
    Translate(Rewrite, Route),
    /// Hand it, untouched, to the TC program of the same NIC (`XDP_PASS`):
    /// finishing it needs the skb. The reason is counted.
    ToTc(u32),
    /// Leave it to the kernel, untouched.
    Pass(u32),
    Drop(u32),
}

/// `nat_tc_int`'s decision on an outbound packet.
pub enum TcOut {
    Translate(Rewrite, Route),
    /// To another inside host's external endpoint: translated as the
    /// sender's packet; the receiver's half is `nat_tc_hairpin`'s.
    Hairpin(Rewrite),
    /// An ICMP error from inside about a packet that came in through the
    /// gateway: `nat_tc_icmp_out`'s.
    IcmpError,
    /// An IP fragment: `nat_tc_frag_int`'s.
    Fragment,
    Pass(u32),
    Drop(u32),
}

/// `nat_tc_ext`'s decision on an inbound packet.
pub enum TcIn {
    Translate(Rewrite, Route),
    /// An ICMP error addressed to the SNAT address, for icmp_err to
    /// translate back.
    IcmpError,
    /// An IP fragment: `nat_tc_frag_ext`'s.
    Fragment,
    Pass(u32),
    Drop(u32),
}

/// The fragment programs' decision on a first fragment (offset 0, the one
/// with the L4 header), which is translated like a whole packet: its L4
/// checksum covers the whole datagram, and the incremental update only
/// depends on the changed fields.
pub enum FirstFragment {
    Translate(Rewrite, Route),
    /// An ICMP error (outbound: from inside; inbound: to the SNAT address).
    IcmpError,
    Pass(u32),
    Drop(u32),
}

/// How the shared decision code builds a program's decision.
pub trait Decide: Sized {
    /// Whether the FIB lookup checks the IP length against the egress MTU
    /// (XDP). TC lets the kernel check the skb, which understands GSO.
    const FIB_MTU: bool;
    /// Whether the program sends the answers the egress policy asks for
    /// (ICMP, RST): TC does; XDP hands such packets to TC.
    const ANSWERS: bool;
    fn pass(reason: u32) -> Self;
    fn drop(reason: u32) -> Self;
    fn translate(rw: Rewrite, route: Route) -> Self;
    /// An ICMP error about a translated packet.
    fn icmp_error() -> Self;
    /// An IP fragment (`frag`: its MF bit and offset): what the program
    /// does with it, or `None` to translate it like a whole packet.
    fn fragment(frag: u16) -> Option<Self>;
    /// XDP hands TC what it cannot finish: `why` gives the first reason,
    /// if any (asked by XDP only; TC finishes everything itself).
    fn to_tc(why: impl FnOnce() -> Option<u32>) -> Option<Self>;
}

/// Outbound decisions also say what becomes of a hairpinned packet.
pub trait DecideOut: Decide {
    /// What it takes to translate one: `()` in a program that does (TC),
    /// no value at all ([`Infallible`]) in one that never does.
    type Hairpin;
    /// `Ok` to translate it as the sender's packet; `Err`: what the
    /// program does with it instead, decided before any lookup.
    fn hairpin() -> Result<Self::Hairpin, Self>;
    fn hairpinned(rw: Rewrite, how: Self::Hairpin) -> Self;
}

impl Decide for XdpDecision {
    const FIB_MTU: bool = true;
    const ANSWERS: bool = false;
    #[inline(always)]
    fn pass(reason: u32) -> Self {
        XdpDecision::Pass(reason)
    }
    #[inline(always)]
    fn drop(reason: u32) -> Self {
        XdpDecision::Drop(reason)
    }
    #[inline(always)]
    fn translate(rw: Rewrite, route: Route) -> Self {
        XdpDecision::Translate(rw, route)
    }
    /// Errors are rare and their translation needs the skb helpers.
    #[inline(always)]
    fn icmp_error() -> Self {
        XdpDecision::ToTc(stats::XDP_TO_TC_ICMP_ERROR)
    }
    #[inline(always)]
    fn fragment(_: u16) -> Option<Self> {
        Some(XdpDecision::ToTc(stats::XDP_TO_TC_FRAGMENT))
    }
    #[inline(always)]
    fn to_tc(why: impl FnOnce() -> Option<u32>) -> Option<Self> {
        why().map(XdpDecision::ToTc)
    }
}

impl DecideOut for XdpDecision {
    type Hairpin = Infallible;
    /// Rare next to Internet traffic, and both halves need TC's stack.
    #[inline(always)]
    fn hairpin() -> Result<Infallible, Self> {
        Err(XdpDecision::ToTc(stats::XDP_TO_TC_HAIRPIN))
    }
    #[inline(always)]
    fn hairpinned(_: Rewrite, how: Infallible) -> Self {
        match how {}
    }
}

/// [`Decide`] for the TC decision types, which differ only in their name
/// and in what a fragment is to them (given its MF bit and offset): TC
/// finishes everything itself, and lets the kernel check the MTU.
macro_rules! decide_tc {
    ($t:ident, |$frag:pat_param| $fragment:expr) => {
        impl Decide for $t {
            const FIB_MTU: bool = false;
            const ANSWERS: bool = true;
            #[inline(always)]
            fn pass(reason: u32) -> Self {
                $t::Pass(reason)
            }
            #[inline(always)]
            fn drop(reason: u32) -> Self {
                $t::Drop(reason)
            }
            #[inline(always)]
            fn translate(rw: Rewrite, route: Route) -> Self {
                $t::Translate(rw, route)
            }
            #[inline(always)]
            fn icmp_error() -> Self {
                $t::IcmpError
            }
            #[inline(always)]
            fn fragment($frag: u16) -> Option<Self> {
                $fragment
            }
            #[inline(always)]
            fn to_tc(_: impl FnOnce() -> Option<u32>) -> Option<Self> {
                None
            }
        }
    };
}

decide_tc!(TcOut, |_| Some(TcOut::Fragment));
decide_tc!(TcIn, |_| Some(TcIn::Fragment));
// frag.rs translates following fragments itself.
decide_tc!(FirstFragment, |frag| {
    if frag & FRAG_OFFSET == 0 {
        None
    } else {
        Some(FirstFragment::Drop(stats::DROP_INTERNAL))
    }
});

impl DecideOut for TcOut {
    type Hairpin = ();
    #[inline(always)]
    fn hairpin() -> Result<(), Self> {
        Ok(())
    }
    #[inline(always)]
    fn hairpinned(rw: Rewrite, _: ()) -> Self {
        TcOut::Hairpin(rw)
    }
}

impl DecideOut for FirstFragment {
    type Hairpin = Infallible;
    /// A hairpinned datagram is not translated in fragments: it is the
    /// gateway's own (frag.rs checks for it before anything else).
    #[inline(always)]
    fn hairpin() -> Result<Infallible, Self> {
        Err(FirstFragment::Pass(stats::PASS_LOCAL))
    }
    #[inline(always)]
    fn hairpinned(_: Rewrite, how: Infallible) -> Self {
        match how {}
    }
}

/// Everything about a packet both directions need.
struct Parsed {
    ip: Ipv4,
    l4: L4,
}

/// What the common classification needs to know about the direction.
#[derive(Clone, Copy)]
struct Side {
    iif: u32,
    /// The ICMP query type this direction translates.
    wanted_icmp: u8,
    /// The drop reason for a packet of no protocol we translate.
    not_ours: u32,
    /// Inbound: ICMP errors addressed to a pool address are ours to
    /// translate.
    icmp_errors_in: bool,
    /// Outbound: ICMP errors from inside are ours to translate.
    icmp_errors_out: bool,
}

/// Parses the packet and sorts out those that are not for translation
/// here; `Err` is the final decision for them.
#[inline(always)]
fn classify<D: Decide>(
    ctx: *mut c_void,
    f: Frame,
    pkt_len: usize,
    side: &Side,
) -> Result<Parsed, D> {
    let Side {
        iif,
        wanted_icmp,
        not_ours,
        icmp_errors_in,
        icmp_errors_out,
    } = *side;
    let ip = match parse::ipv4(f, pkt_len) {
        Ok(ip) => ip,
        Err(Stop::NotIpv4) => return Err(D::pass(stats::PASS_NOT_IPV4)),
        Err(Stop::Malformed) => return Err(D::drop(stats::DROP_MALFORMED)),
    };
    // Traffic for the gateway itself is never translated; deciding that
    // costs a FIB lookup, so it is asked only of packets we would not
    // translate anyway.
    let local_or = |reason: u32, local_reason: u32| {
        if fib::is_local(ctx, iif, ip.saddr, ip.daddr) {
            D::pass(local_reason)
        } else {
            D::drop(reason)
        }
    };
    if addr::never_forwarded(ip.daddr) {
        return Err(D::pass(stats::PASS_LOCAL));
    }
    if ip.frag != 0
        && let Some(d) = D::fragment(ip.frag)
    {
        return Err(d);
    }
    let l4 = match parse::l4(f, &ip) {
        Ok(Some(l4)) => l4,
        Ok(None) => return Err(local_or(not_ours, stats::PASS_LOCAL)),
        Err(reason) => return Err(D::drop(reason)),
    };
    if ip.proto == IPPROTO_ICMP && l4.icmp_type != wanted_icmp {
        if parse::icmp_is_error(l4.icmp_type) {
            if icmp_errors_in && pool::may_own(ip.daddr) {
                return Err(D::icmp_error());
            }
            // From inside: to a remote, or hairpinned to a pool address;
            // an error for the gateway itself is the kernel's.
            if icmp_errors_out
                && (pool::may_own(ip.daddr) || !fib::is_local(ctx, iif, ip.saddr, ip.daddr))
            {
                return Err(D::icmp_error());
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
    mss::wanted(cfg.mss_clamp, p.ip.proto, || Some(p.l4.tcp_flags))
}

/// Packets from `--int`: source NAT.
#[inline(always)]
pub fn outbound<D: DecideOut>(
    ctx: *mut c_void,
    f: Frame,
    pkt_len: usize,
    cfg: &NatConfig,
    stat_hook: u32,
) -> D {
    let side = Side {
        iif: cfg.int_ifindex,
        wanted_icmp: ICMP_ECHO_REQUEST,
        not_ours: stats::DROP_UNSUPPORTED,
        icmp_errors_in: false,
        icmp_errors_out: true,
    };
    let p = match classify::<D>(ctx, f, pkt_len, &side) {
        Ok(p) => p,
        Err(d) => return d,
    };
    // To another inside host's mapping (hairpinning): ICMP to a pool
    // address is for the gateway itself (an echo has no destination port to
    // find a binding by), and so is a port nobody inside is bound to.
    let hairpin = if p.ip.proto != IPPROTO_ICMP
        && pool::may_own(p.ip.daddr)
        && conntrack::is_bound(p.ip.proto, p.ip.daddr, p.l4.dport)
    {
        match D::hairpin() {
            Ok(how) => Some(how),
            Err(d) => return d,
        }
    } else {
        None
    };
    if let Some(d) = D::to_tc(|| maybe_partial(&p).then_some(stats::XDP_TO_TC_PARTIAL_CSUM)) {
        return d;
    }
    if let Some(d) = D::to_tc(|| mss_clamp_wanted(&p, cfg).then_some(stats::XDP_TO_TC_MSS)) {
        return d;
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
            // A hairpinned packet goes back inside, whatever the route to
            // the SNAT address.
            if hairpin.is_none() {
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
                    Route::Local => return D::pass(stats::PASS_LOCAL),
                    Route::Unreachable => return D::drop(stats::DROP_NO_ROUTE),
                    Route::Resolved { ifindex, .. }
                    | Route::NoNeigh { ifindex, .. }
                    | Route::FragNeeded { ifindex } => {
                        if ifindex != cfg.ext_ifindex {
                            return D::pass(stats::PASS_NOT_TO_EXT);
                        }
                    }
                    Route::Other => return D::pass(stats::PASS_NOT_TO_EXT),
                }
            }
            // No state for a packet that will not be forwarded.
            if p.ip.ttl <= 1 {
                return D::pass(stats::PASS_TTL_EXPIRED);
            }
            // Anti-spoofing and the egress policy: once per flow, here.
            match policy::admit(
                p.ip.saddr,
                p.ip.daddr,
                policy::flow(p.ip.proto, u16::from_be(dport)),
                policy::options(cfg.flags, D::ANSWERS),
            ) {
                policy::ALLOWED => {}
                policy::HAND_OVER => {
                    if let Some(d) = D::to_tc(|| Some(stats::XDP_TO_TC_POLICY)) {
                        return d;
                    }
                    return D::drop(stats::DROP_POLICY_DENIED);
                }
                reason => return D::drop(reason),
            }
            match conntrack::create(&key, cfg, now, p.l4.tcp_flags) {
                Ok((v, bind_event, event)) => {
                    if let Some(e) = bind_event {
                        count(stat_hook, e);
                        if e == stats::EV_NEW_BINDING && cfg.flags & CFG_F_TRANSLOG != 0 {
                            let (ext_addr, ext_port) = conntrack::external(v);
                            translog::emit(
                                translog::head(stat_hook, TRANSLOG_CREATED, key.proto),
                                key.src_addr,
                                ext_addr,
                                translog::ports(key.src_port, ext_port),
                            );
                        }
                    }
                    count(stat_hook, event);
                    v
                }
                Err(reason) => {
                    if reason == stats::DROP_NO_PORT && cfg.flags & CFG_F_TRANSLOG != 0 {
                        translog::emit(
                            translog::head(stat_hook, TRANSLOG_NO_PORT, key.proto),
                            key.src_addr,
                            0,
                            translog::ports(key.src_port, 0),
                        );
                    }
                    return D::drop(reason);
                }
            }
        }
    };
    if p.ip.ttl <= 1 {
        return D::pass(stats::PASS_TTL_EXPIRED);
    }
    conntrack::touch(fwd, now, p.ip.proto, DIR_OUT, cfg);
    let (snat_addr, snat_port) = conntrack::external(fwd);
    if snat_addr == 0 {
        // A slot the loader emptied: nothing to translate to.
        return D::drop(stats::DROP_NO_SNAT_ADDRESS);
    }
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
    if let Some(how) = hairpin {
        return D::hairpinned(rw, how);
    }
    let (fsport, fdport) = if p.ip.proto == IPPROTO_ICMP {
        (0, 0)
    } else {
        (snat_port, dport)
    };
    let tot_len = if D::FIB_MTU { p.ip.tot_len } else { 0 };
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
    D::translate(rw, route)
}

/// Packets from `--ext`: replies of tracked flows go back in; nothing else
/// reaches the inside.
#[inline(always)]
pub fn inbound<D: Decide>(
    ctx: *mut c_void,
    f: Frame,
    pkt_len: usize,
    cfg: &NatConfig,
    stat_hook: u32,
) -> D {
    let side = Side {
        iif: cfg.ext_ifindex,
        wanted_icmp: ICMP_ECHO_REPLY,
        not_ours: stats::DROP_UNSOLICITED,
        icmp_errors_in: true,
        icmp_errors_out: false,
    };
    let p = match classify::<D>(ctx, f, pkt_len, &side) {
        Ok(p) => p,
        Err(d) => return d,
    };
    if let Some(d) = D::to_tc(|| maybe_partial(&p).then_some(stats::XDP_TO_TC_PARTIAL_CSUM)) {
        return d;
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
                    count(stat_hook, e);
                }
                (s, addr, port)
            }
            // No binding: the gateway's own traffic, or nothing of ours.
            Err(None) => return unsolicited(ctx, cfg, &p),
            // A bound port belongs to the NAT: refused silently, never
            // answered by the kernel (RFC 5382 REQ-4).
            Err(Some(reason)) => return D::drop(reason),
        };
    // Only SYNs and SYN-ACKs that have a session: a SYN flood from outside
    // stays in XDP.
    if let Some(d) = D::to_tc(|| mss_clamp_wanted(&p, cfg).then_some(stats::XDP_TO_TC_MSS)) {
        return d;
    }
    if p.ip.ttl <= 1 {
        // Addressed to our SNAT address, so the kernel would deliver it
        // locally rather than answer Time Exceeded: nothing useful to pass.
        return D::drop(stats::DROP_TTL_EXPIRED);
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
    let tot_len = if D::FIB_MTU { p.ip.tot_len } else { 0 };
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
    D::translate(rw, route)
}

/// An inbound packet no session takes: the gateway's own traffic goes to
/// the kernel, the rest is dropped.
#[inline(always)]
fn unsolicited<D: Decide>(ctx: *mut c_void, cfg: &NatConfig, p: &Parsed) -> D {
    if fib::is_local(ctx, cfg.ext_ifindex, p.ip.saddr, p.ip.daddr) {
        D::pass(stats::PASS_LOCAL)
    } else {
        D::drop(stats::DROP_UNSOLICITED)
    }
}

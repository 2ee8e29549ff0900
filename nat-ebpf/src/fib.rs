//! Route and neighbour lookup through the kernel's FIB (`bpf_fib_lookup`),
//! so the gateway follows the host's routes and policy rules.

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_BLACKHOLE, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_NOT_FWDED, BPF_FIB_LKUP_RET_PROHIBIT, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_FIB_LKUP_RET_UNREACHABLE, bpf_fib_lookup as FibParams,
    },
    cty::c_void,
    helpers::bpf_fib_lookup,
};

const AF_INET: u8 = 2;

/// The lookup's answer, reduced to what forwarding needs.
#[derive(Clone, Copy)]
pub enum Route {
    /// Next hop resolved: rewrite MACs and redirect.
    Resolved {
        ifindex: u32,
        smac: [u8; 6],
        dmac: [u8; 6],
    },
    /// Route found, neighbour not resolved yet (`nexthop` raw IPv4).
    NoNeigh { ifindex: u32, nexthop: u32 },
    /// Larger than the egress MTU. `ifindex` is the input one: the kernel
    /// returns before it fills in the egress.
    FragNeeded { ifindex: u32 },
    /// Delivered locally (addressed to the gateway itself).
    Local,
    /// Unreachable, blackhole or prohibited.
    Unreachable,
    /// Anything else (forwarding disabled, unsupported encapsulation …):
    /// the kernel decides.
    Other,
}

/// Looks up the route of a packet `saddr → daddr` arriving on `iif`.
/// `tot_len` non-zero asks for an MTU check against that IP length (XDP);
/// zero lets the kernel check the skb itself, which understands GSO (TC).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn lookup(
    ctx: *mut c_void,
    iif: u32,
    proto: u8,
    saddr: u32,
    sport: u16,
    daddr: u32,
    dport: u16,
    tot_len: u16,
) -> Route {
    let q = Query {
        iif,
        saddr,
        daddr,
        sport,
        dport,
        tot_len,
        proto,
    };
    lookup_query(ctx, &q)
}

/// The arguments of [`lookup`], passed by reference: BPF calls take at
/// most five arguments.
pub struct Query {
    iif: u32,
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    tot_len: u16,
    proto: u8,
}

/// A BPF-to-BPF call rather than inlined: the 64-byte `bpf_fib_lookup`
/// parameters then live in this frame only, not in the frames of programs
/// that look up twice and are near the 512-byte stack limit. The answer is
/// scalars only.
#[inline(never)]
fn lookup_query(ctx: *mut c_void, q: &Query) -> Route {
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.l4_protocol = q.proto;
    p.sport = q.sport;
    p.dport = q.dport;
    p.__bindgen_anon_1.tot_len = q.tot_len;
    p.ifindex = q.iif;
    p.__bindgen_anon_3.ipv4_src = q.saddr;
    p.__bindgen_anon_4.ipv4_dst = q.daddr;
    let rc = unsafe { bpf_fib_lookup(ctx, &mut p, core::mem::size_of::<FibParams>() as i32, 0) };
    if rc < 0 {
        return Route::Other;
    }
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => Route::Resolved {
            ifindex: p.ifindex,
            smac: p.smac,
            dmac: p.dmac,
        },
        BPF_FIB_LKUP_RET_NO_NEIGH => Route::NoNeigh {
            ifindex: p.ifindex,
            // On NO_NEIGH the kernel has already replaced the destination
            // with the gateway of the route, when there is one.
            nexthop: unsafe { p.__bindgen_anon_4.ipv4_dst },
        },
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Route::FragNeeded { ifindex: p.ifindex },
        BPF_FIB_LKUP_RET_NOT_FWDED => Route::Local,
        BPF_FIB_LKUP_RET_BLACKHOLE | BPF_FIB_LKUP_RET_UNREACHABLE | BPF_FIB_LKUP_RET_PROHIBIT => {
            Route::Unreachable
        }
        _ => Route::Other,
    }
}

/// Whether `daddr` is one of the gateway's own addresses (or a broadcast).
#[inline(always)]
pub fn is_local(ctx: *mut c_void, iif: u32, saddr: u32, daddr: u32) -> bool {
    matches!(lookup(ctx, iif, 0, saddr, 0, daddr, 0, 0), Route::Local)
}

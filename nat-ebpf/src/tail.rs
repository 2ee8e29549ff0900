//! Tail calls: how a TC program hands a packet to one of the programs in
//! `TAILS` (slots `nat_common::TAIL_*`, filled by the loader from
//! `nat_common::TAIL_PROGRAMS`). A tail-called program runs on a 512-byte
//! stack of its own and is verified on its own, which is why the rare and
//! heavy work (ICMP errors, hairpinning, fragments, MSS clamping, the
//! out-of-ports error) lives in one.
//!
//! Every called program parses the packet again, except `nat_tc_mss`,
//! which finishes a forward its caller started: what it needs crosses the
//! call in the skb's control buffer, written and read only here
//! ([`MssHandOver`]; and for `nat_tc_no_port`, why it answers:
//! [`call_with_why`]).

use aya_ebpf::{bindings::TC_ACT_SHOT, programs::TcContext};
use nat_common::stats::{self, HOOK_TC_INT};

use crate::{maps::TAILS, stats::count};

/// Hands the packet to the program in `slot`. Returns only if the slot is
/// empty (a loader bug), with the reason to count for dropping it.
#[inline(always)]
pub fn call(ctx: &TcContext, slot: u32) -> u32 {
    // SAFETY: a tail call from a TC program with its own context; it
    // either does not return or leaves the context as it was.
    unsafe { TAILS.tail_call(ctx, slot) };
    stats::DROP_INTERNAL
}

/// The end of a program that answers a packet `nat_tc_int` already counted
/// as dropped (`nat_tc_no_port`, `nat_tc_policy_rst`): it counts events
/// only, at `nat_tc_int`'s hook; an answer it could not build is the event
/// `event_answer_not_built`, never a second verdict. Returns the verdict.
#[inline(always)]
pub fn answered(r: Result<(i32, Option<u32>), u32>) -> i32 {
    let (action, event) = match r {
        Ok(r) => r,
        Err(_) => (TC_ACT_SHOT, Some(stats::EV_ANSWER_NOT_BUILT)),
    };
    if let Some(e) = event {
        count(HOOK_TC_INT, e);
    }
    action
}

/// Hands the packet to the program in `slot` with `why` in the control
/// buffer (read back with [`why`]), as [`call`].
#[inline(always)]
pub fn call_with_why(ctx: &TcContext, slot: u32, why: u32) -> u32 {
    // SAFETY: the context pointer is the program's own skb; cb is
    // writable from TC programs.
    unsafe { (*ctx.skb.skb).cb[CB_WHY] = why };
    call(ctx, slot)
}

/// What [`call_with_why`] said.
#[inline(always)]
pub fn why(ctx: &TcContext) -> u32 {
    ctx.skb.cb()[CB_WHY]
}

/// What `nat_tc_mss` needs to finish forwarding a translated SYN: where
/// it goes, where its TCP header is, and what to count at which hook.
#[derive(Clone, Copy)]
pub struct MssHandOver {
    pub ifindex: u32,
    /// The next hop for `bpf_redirect_neigh` to resolve; 0: the MACs are
    /// set, plain `bpf_redirect`.
    pub nexthop: u32,
    pub l4_off: u32,
    pub hook: u32,
    pub reason: u32,
}

/// Where each field sits in `skb->cb` (five u32 words, which live as long
/// as the program run, tail calls included).
const CB_IFINDEX: usize = 0;
const CB_NEXTHOP: usize = 1;
const CB_L4_OFF: usize = 2;
const CB_HOOK: usize = 3;
const CB_REASON: usize = 4;
/// [`call_with_why`]'s word (its callees are not `nat_tc_mss`).
const CB_WHY: usize = 0;

impl MssHandOver {
    /// Writes the hand-over into the control buffer and tail-calls
    /// `nat_tc_mss`. Returns only if its slot is empty, as [`call`].
    #[inline(always)]
    pub fn call(&self, ctx: &TcContext) -> u32 {
        // SAFETY: the context pointer is the program's own skb; cb is
        // writable from TC programs.
        unsafe {
            let cb = &mut (*ctx.skb.skb).cb;
            cb[CB_IFINDEX] = self.ifindex;
            cb[CB_NEXTHOP] = self.nexthop;
            cb[CB_L4_OFF] = self.l4_off;
            cb[CB_HOOK] = self.hook;
            cb[CB_REASON] = self.reason;
        }
        call(ctx, nat_common::TAIL_MSS)
    }

    /// The hand-over, read back in `nat_tc_mss`.
    #[inline(always)]
    pub fn read(ctx: &TcContext) -> MssHandOver {
        let cb = ctx.skb.cb();
        MssHandOver {
            ifindex: cb[CB_IFINDEX],
            nexthop: cb[CB_NEXTHOP],
            l4_off: cb[CB_L4_OFF],
            hook: cb[CB_HOOK],
            reason: cb[CB_REASON],
        }
    }
}

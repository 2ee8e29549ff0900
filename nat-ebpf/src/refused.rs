//! Tracing programs that count the redirects the kernel refused our XDP
//! programs, exactly and per egress NIC (`drop_redirect_refused` at the
//! hook of the program that redirected, taken off its forwarded counter),
//! on the three tracepoints where a redirect to an interface can fail
//! (`nat_common::trace` says where and why).
//!
//! Several gateways may run on one host, in namespaces whose interface
//! indexes collide. `xdp_redirect_err` and `xdp_exception` name the
//! program, so only our programs' ids (`XDP_EGRESS`) count. A bulk-queue
//! flush names only the two interfaces: it is ours when it goes between our
//! NICs while frames our program queued on this CPU are pending
//! (`XDP_PENDING`), since the kernel flushes the queue before the NAPI
//! poll that filled it ends.

use aya_ebpf::{EbpfContext, macros::tracepoint, programs::TracePointContext};
use nat_common::{
    stats::{self, HOOK_XDP_EXT, HOOK_XDP_INT},
    trace,
};

use crate::{
    maps::{XDP_EGRESS, XDP_PENDING, config},
    stats::recount,
};

/// A redirect refused when the frame was queued (or, in generic mode,
/// sent).
#[tracepoint]
pub fn nat_trace_redirect_err(ctx: TracePointContext) -> u32 {
    if let Some(hook) = our_program(field(&ctx, trace::REDIRECT_ERR_PROG_ID)) {
        refused(hook, 1);
        settle(hook, 1);
    }
    0
}

/// A bulk-queue flush: the frames the NIC did not take are refused.
#[tracepoint]
pub fn nat_trace_devmap_xmit(ctx: TracePointContext) -> u32 {
    let cfg = config();
    let from = field(&ctx, trace::DEVMAP_FROM_IFINDEX);
    let to = field(&ctx, trace::DEVMAP_TO_IFINDEX);
    let hook = if from == cfg.int_ifindex && to == cfg.ext_ifindex {
        HOOK_XDP_INT
    } else if from == cfg.ext_ifindex && to == cfg.int_ifindex {
        HOOK_XDP_EXT
    } else {
        return 0;
    };
    let Some(pending) = XDP_PENDING.get_ptr_mut(hook) else {
        return 0;
    };
    let sent = field(&ctx, trace::DEVMAP_SENT) as i32;
    let drops = field(&ctx, trace::DEVMAP_DROPS) as i32;
    // Per-CPU slot, and the flush runs on the CPU that queued.
    if let Some((refused_now, left)) = trace::flush(unsafe { *pending }, sent, drops) {
        unsafe { *pending = left };
        refused(hook, refused_now);
    }
    0
}

/// Generic XDP could not hand a redirected skb to the egress queue.
#[tracepoint]
pub fn nat_trace_xdp_exception(ctx: TracePointContext) -> u32 {
    // Other actions are not redirects (a driver may report a failed
    // redirect here too, after `xdp_redirect_err` counted it).
    if field(&ctx, trace::EXCEPTION_ACT) == trace::ACT_TX {
        if let Some(hook) = our_program(field(&ctx, trace::EXCEPTION_PROG_ID)) {
            refused(hook, 1);
        }
    }
    0
}

/// A 4-byte field of the tracepoint's record.
#[inline(always)]
fn field(ctx: &TracePointContext, offset: usize) -> u32 {
    // SAFETY: an aligned read inside the record (the loader checked the
    // offsets against the kernel's format before attaching).
    unsafe { *(ctx.as_ptr() as *const u8).add(offset).cast::<u32>() }
}

/// The hook of our XDP program with id `id`, if it is one of ours.
#[inline(always)]
fn our_program(id: u32) -> Option<u32> {
    if id == 0 {
        return None;
    }
    [HOOK_XDP_INT, HOOK_XDP_EXT]
        .into_iter()
        .find(|&hook| XDP_EGRESS.get(hook).is_some_and(|e| e.prog_id == id))
}

#[inline(always)]
fn refused(hook: u32, n: u64) {
    recount(
        hook,
        stats::xdp_forwarded(hook),
        stats::DROP_REDIRECT_REFUSED,
        n,
    );
}

/// `n` frames of `hook` are no longer pending in the bulk queue.
#[inline(always)]
fn settle(hook: u32, n: u64) {
    if let Some(p) = XDP_PENDING.get_ptr_mut(hook) {
        unsafe { *p = (*p).saturating_sub(n) };
    }
}

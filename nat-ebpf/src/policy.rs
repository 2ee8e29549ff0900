//! The egress policy's verdict and anti-spoofing, asked once per new
//! outbound flow, where its session would be created (nat.rs): established
//! packets never get here. The rules are compiled by the loader
//! (nat_common::policy) into a destination trie whose entry lists the
//! rules to check in order, at most `MAX_CANDIDATES`: a bounded walk
//! whatever the number of rules.

use aya_ebpf::maps::lpm_trie::Key;
use nat_common::{
    CFG_F_ANTI_SPOOFING, IPPROTO_TCP,
    policy::{
        ACTION_ALLOW, ANSWER_ICMP, ANSWER_RST, MAX_CANDIDATES, RULE_STRIDE, STATE_NONE, dst_key,
        dst_key_len,
    },
    stats,
};

use crate::maps::{INSIDE_NETS, POLICY_DST, POLICY_HITS, POLICY_RULES, POLICY_STATE};

/// [`admit`]: the flow may be created.
pub const ALLOWED: u32 = u32::MAX;
/// [`admit`]: denied with an answer the calling program does not send
/// (XDP): hand the packet to TC, which asks again and answers.
pub const HAND_OVER: u32 = u32::MAX - 1;

/// The flow [`admit`] is asked about, packed into scalars (a BPF-to-BPF
/// call takes at most five arguments, in registers).
#[inline(always)]
pub const fn flow(proto: u8, port: u16) -> u32 {
    ((proto as u32) << 16) | port as u32
}

/// [`admit`]'s options: the `NatConfig` flags, and whether the caller
/// sends the answers (TC) or hands such packets over (XDP).
#[inline(always)]
pub const fn options(flags: u8, answers: bool) -> u32 {
    flags as u32 | (answers as u32) << 8
}

/// Whether a new flow from `src` to `dst` (network order), `flow(proto,
/// port)` (destination port in host order, 0 for ICMP), may be created:
/// [`ALLOWED`], the drop reason to count (`drop_spoofed_source`,
/// `drop_policy_*`), or [`HAND_OVER`] when the rule's answer needs TC and
/// the caller (`options`) does not answer. The deciding rule's hit is
/// counted when the verdict is final here.
///
/// A BPF-to-BPF call: the walk and its keys stay out of the callers'
/// frames, which are near the 512-byte stack limit; it returns a scalar.
#[inline(never)]
pub fn admit(src: u32, dst: u32, flow: u32, options: u32) -> u32 {
    let proto = (flow >> 16) as u8;
    let port = flow as u16;
    let flags = options as u8;
    let answers = options & 0x100 != 0;
    if flags & CFG_F_ANTI_SPOOFING != 0 && INSIDE_NETS.get(Key::new(32, src)).is_none() {
        return stats::DROP_SPOOFED_SOURCE;
    }
    let state = match POLICY_STATE.get(0) {
        Some(s) => *s,
        None => return ALLOWED,
    };
    if state == STATE_NONE {
        return ALLOWED;
    }
    let generation = (state - 1) & 1;
    let Some(list) = POLICY_DST.get(Key::new(dst_key_len(32), dst_key(generation, dst))) else {
        // The compiler always writes 0.0.0.0/0: a generation being
        // written is never active.
        return ALLOWED;
    };
    let base = generation * RULE_STRIDE;
    let len = list.len as usize;
    let mut i = 0;
    while i < MAX_CANDIDATES && i < len {
        let idx = base + list.rules[i] as u32;
        i += 1;
        let Some(r) = POLICY_RULES.get(idx) else {
            return ALLOWED;
        };
        if !r.matches(src, proto, port) {
            continue;
        }
        let reason = if r.action == ACTION_ALLOW {
            ALLOWED
        } else if r.answer == ANSWER_ICMP {
            stats::DROP_POLICY_PROHIBITED
        } else if r.answer == ANSWER_RST && proto == IPPROTO_TCP {
            stats::DROP_POLICY_RESET
        } else {
            stats::DROP_POLICY_DENIED
        };
        if !answers
            && (reason == stats::DROP_POLICY_PROHIBITED || reason == stats::DROP_POLICY_RESET)
        {
            return HAND_OVER;
        }
        if let Some(hits) = POLICY_HITS.get_ptr_mut(idx) {
            unsafe { *hits += 1 };
        }
        return reason;
    }
    ALLOWED
}

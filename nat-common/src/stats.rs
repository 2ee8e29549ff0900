//! Counters: which program counts ([`HOOKS`]) and why ([`LABELS`]), in the
//! per-CPU array [`crate::MAP_STATS`] (index [`slot`]`(hook, reason)`, value
//! a u64 packet count). The one definition both the dataplane and every
//! reader of the counters use. Each reason is a verdict or an event
//! ([`Kind`], [`kind`]): a program counts exactly one verdict per packet.

/// Which program counts: each has its own block of counters, so a packet
/// that XDP hands to TC is visible at both and counted once by each. The
/// tail-called programs count at the hook that called them.
pub const HOOK_XDP_INT: u32 = 0;
pub const HOOK_XDP_EXT: u32 = 1;
pub const HOOK_TC_INT: u32 = 2;
pub const HOOK_TC_EXT: u32 = 3;
/// `(hook, label)` of every hook, in index order.
pub const HOOKS: [(u32, &str); 4] = [
    (HOOK_XDP_INT, "xdp_int"),
    (HOOK_XDP_EXT, "xdp_ext"),
    (HOOK_TC_INT, "tc_int"),
    (HOOK_TC_EXT, "tc_ext"),
];
/// Number of hooks.
pub const HOOK_COUNT: u32 = HOOKS.len() as u32;
/// Entries of the stats array: one block of [`COUNT`] reasons per hook.
pub const SLOTS: u32 = HOOK_COUNT * COUNT;

/// Index of `reason` at `hook` in the stats array.
#[inline(always)]
pub const fn slot(hook: u32, reason: u32) -> u32 {
    hook * COUNT + reason
}

/// What a counter says about the packet that made a program count it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// What became of the packet at this hook: forwarded, handed to TC,
    /// passed to the kernel, dropped (and why). Every packet a program
    /// sees is counted exactly once with a verdict at that program's hook.
    Verdict,
    /// Something that happened on the way (a flow or binding created, an
    /// ICMP error sent, an MSS clamped, ...) or to other packets (held
    /// fragments): any number per packet, besides its verdict.
    Event,
}

macro_rules! reasons {
    ($( $(#[$m:meta])* $name:ident = $idx:expr, $label:expr, $kind:ident; )*) => {
        $( $(#[$m])* pub const $name: u32 = $idx; )*
        /// Number of reasons: the size of the stats array.
        pub const COUNT: u32 = [$($idx),*].len() as u32;
        /// `(index, label)` of every reason, in index order.
        pub const LABELS: &[(u32, &str)] = &[$(($idx, $label)),*];
        /// The kind of every reason, in index order.
        const KINDS: &[Kind] = &[$(Kind::$kind),*];
    };
}

// Every reason: its index (dense, in order; new ones go at the end), its
// label (what the loader logs), and whether it is a verdict or an event.

reasons! {
    /// Outbound packet translated and redirected to `--ext` by XDP.
    XDP_OUT_FWD = 0, "xdp_out_forwarded", Verdict;
    /// Reply translated and redirected to `--int` by XDP.
    XDP_IN_FWD = 1, "xdp_in_forwarded", Verdict;
    /// Outbound packet translated and redirected by TC.
    TC_OUT_FWD = 2, "tc_out_forwarded", Verdict;
    /// Reply translated and redirected by TC.
    TC_IN_FWD = 3, "tc_in_forwarded", Verdict;
    /// XDP handed the packet to TC: its L4 checksum may be partial.
    XDP_TO_TC_PARTIAL_CSUM = 4, "xdp_to_tc_partial_csum", Verdict;
    /// XDP handed the packet to TC: the next hop's MAC is not resolved.
    XDP_TO_TC_NO_NEIGH = 5, "xdp_to_tc_no_neigh", Verdict;
    /// XDP handed the packet to TC: the route needs the kernel (MTU, …).
    XDP_TO_TC_FIB = 6, "xdp_to_tc_fib", Verdict;
    /// Not IPv4 (ARP, IPv6, …): the kernel's business.
    PASS_NOT_IPV4 = 7, "pass_not_ipv4", Verdict;
    /// Addressed to the gateway itself (probes, SSH, …), or to a multicast,
    /// limited-broadcast or "this network" address, which the kernel
    /// delivers locally or drops but never forwards (`addr::never_forwarded`).
    PASS_LOCAL = 8, "pass_local", Verdict;
    /// TTL would expire: the kernel sends ICMP Time Exceeded.
    PASS_TTL_EXPIRED = 9, "pass_ttl_expired", Verdict;
    /// From `--int` but routed elsewhere than `--ext`: routed, not NATed.
    PASS_NOT_TO_EXT = 10, "pass_not_to_ext", Verdict;
    /// Too big for the egress MTU with DF set: the kernel sends ICMP
    /// Fragmentation Needed.
    PASS_FRAG_NEEDED = 11, "pass_frag_needed", Verdict;
    /// ICMP other than echo arriving on `--ext`: for the gateway itself.
    PASS_ICMP_OTHER = 12, "pass_icmp_other", Verdict;
    /// Truncated or malformed header.
    DROP_MALFORMED = 13, "drop_malformed", Verdict;
    /// IP fragment the gateway does not translate: of a hairpinned datagram
    /// or of a protocol other than TCP, UDP and ICMP.
    DROP_FRAGMENT = 14, "drop_fragment", Verdict;
    /// Protocol the gateway does not translate (forwarding it would leak the
    /// inside address).
    DROP_UNSUPPORTED = 15, "drop_unsupported_proto", Verdict;
    /// Inbound on `--ext` with no conntrack entry, not for the gateway.
    DROP_UNSOLICITED = 16, "drop_unsolicited", Verdict;
    /// Every external port candidate was taken.
    DROP_NO_PORT = 17, "drop_no_free_port", Verdict;
    /// The conntrack table is full.
    DROP_TABLE_FULL = 18, "drop_table_full", Verdict;
    /// No route (unreachable, blackhole, prohibited).
    DROP_NO_ROUTE = 19, "drop_no_route", Verdict;
    /// Too big to forward where the kernel cannot fragment it (ICMP errors
    /// and hairpinned packets, which leave by the link they came in on).
    DROP_TOO_BIG = 20, "drop_too_big", Verdict;
    /// A translated reply would leave by another NIC than `--int`.
    DROP_WRONG_EGRESS = 21, "drop_wrong_egress", Verdict;
    /// A helper failed (packet store, redirect).
    DROP_INTERNAL = 22, "drop_internal_error", Verdict;
    /// Event, not a verdict: a new flow was created.
    EV_NEW_FLOW = 23, "event_new_flow", Event;
    /// Event: a new flow lost an insert race to another CPU and used its entry.
    EV_INSERT_RACE = 24, "event_insert_race", Event;
    /// A reply that arrived with TTL <= 1 (it cannot be forwarded).
    DROP_TTL_EXPIRED = 25, "drop_ttl_expired", Verdict;
    /// Event: an inside endpoint got a new external port (binding).
    EV_NEW_BINDING = 26, "event_new_binding", Event;
    /// Event: the filtering policy let a packet from a new remote open a
    /// session on an existing binding.
    EV_INBOUND_SESSION = 27, "event_inbound_session", Event;
    /// Inbound to a bound external port, refused by the filtering policy.
    DROP_FILTERED = 28, "drop_filtered", Verdict;
    /// XDP handed an ICMP error to TC, which translates errors.
    XDP_TO_TC_ICMP_ERROR = 29, "xdp_to_tc_icmp_error", Verdict;
    /// ICMP error about a translated flow, translated back to the inside
    /// host and redirected by TC.
    TC_IN_ICMP_ERROR_FWD = 30, "tc_in_icmp_error_forwarded", Verdict;
    /// ICMP error quoting a packet of no session (or not quoting TCP, UDP
    /// or echo), or too long to verify.
    DROP_ICMP_ERROR_UNTRACKED = 31, "drop_icmp_error_untracked", Verdict;
    /// ICMP error whose ICMP or quoted IP checksum is wrong (RFC 5508 REQ-3).
    DROP_BAD_CHECKSUM = 32, "drop_bad_checksum", Verdict;
    /// XDP handed a packet for the SNAT address from inside to TC.
    XDP_TO_TC_HAIRPIN = 33, "xdp_to_tc_hairpin", Verdict;
    /// Inside host to another inside host's external mapping, translated
    /// both ways (source and destination) and sent back inside by TC.
    TC_HAIRPIN_FWD = 34, "tc_hairpin_forwarded", Verdict;
    /// Too big for the egress MTU without DF: translated by TC, then
    /// routed and fragmented by the kernel (RFC 4787 REQ-13a).
    TC_TO_KERNEL_FRAGMENT = 35, "tc_translated_for_kernel_fragmentation", Verdict;
    /// ICMP error from inside about a translated flow, translated out (or
    /// back inside when hairpinned) by TC.
    TC_OUT_ICMP_ERROR_FWD = 36, "tc_out_icmp_error_forwarded", Verdict;
    /// A frame addressed to another machine's MAC (a flooding switch):
    /// the kernel's, which drops it.
    PASS_OTHER_HOST = 37, "pass_other_host", Verdict;
    /// XDP handed a new flow that found no free external port to TC, which
    /// answers it with ICMP (RFC 5508 REQ-8).
    XDP_TO_TC_NO_PORT = 38, "xdp_to_tc_no_free_port", Verdict;
    /// Event: a packet of a new flow that found no free external port was
    /// turned into an ICMP Destination Unreachable code 13 back to its
    /// sender (counted besides `drop_no_free_port`).
    EV_ICMP_NO_PORT_SENT = 39, "icmp_out_of_ports_sent", Event;
    /// Event: no ICMP for such a packet, the per-CPU rate limit was spent
    /// (counted besides `drop_no_free_port`).
    EV_ICMP_NO_PORT_RATE_LIMITED = 40, "icmp_out_of_ports_rate_limited", Event;
    /// XDP handed a TCP SYN to TC to clamp its MSS option (`--mss-clamp`).
    XDP_TO_TC_MSS = 41, "xdp_to_tc_mss_clamp", Verdict;
    /// Event: the MSS option of a SYN or SYN-ACK was lowered to `--mss-clamp`.
    EV_MSS_CLAMPED = 42, "event_mss_clamped", Event;
    /// XDP handed an IP fragment to TC, which translates fragments.
    XDP_TO_TC_FRAGMENT = 43, "xdp_to_tc_fragment", Verdict;
    /// First fragment (offset 0, the one with the L4 header) translated
    /// like a whole packet and redirected by TC.
    TC_FRAG_FIRST_FWD = 44, "tc_fragment_first_forwarded", Verdict;
    /// Following fragment (offset > 0): address translated and redirected
    /// by TC.
    TC_FRAG_FWD = 45, "tc_fragment_forwarded", Verdict;
    /// Following fragment on `--ext` of no tracked datagram, not addressed
    /// to the gateway.
    DROP_FRAG_UNTRACKED = 46, "drop_fragment_untracked", Verdict;
    /// Event: a first fragment on `--ext` started tracking its datagram.
    EV_FRAG_TRACKED = 47, "event_fragment_tracked", Event;
    /// Following fragment on `--ext`, before its first fragment, that could
    /// not be held (more than `FRAG_HELD_MAX` of one datagram, or a frame
    /// too long): passed to the kernel, which discards it after
    /// `ipfrag_time` (or reassembles it, if the datagram is the gateway's).
    PASS_FRAG_UNTRACKED = 48, "pass_fragment_untracked", Verdict;
    /// Following fragment on `--ext` that came before its first fragment:
    /// held (`FRAG_HELD`) and sent after the first one is translated.
    TC_FRAG_HELD = 49, "tc_fragment_held", Verdict;
    /// A held fragment was gone when its first fragment came: the held
    /// fragments' budget (a quarter of `--max-fragments`) was exhausted and
    /// the oldest were forgotten (RFC 4787 REQ-14a). Counted once per
    /// missing fragment, with the first fragment: an event of its, the
    /// held fragment's outcome (its verdict was `tc_fragment_held`).
    DROP_FRAG_BUDGET = 50, "drop_fragment_budget", Event;
    /// A first fragment came for held fragments: it was re-injected on
    /// `--ext` ahead of them (`event_held_fragment_reinjected`), and is
    /// counted again by what happens to it when it comes back.
    TC_FRAG_REINJECTED = 51, "tc_fragment_reinjected", Verdict;
    /// Event, with `tc_fragment_reinjected`: a held fragment was re-injected
    /// after its first fragment (counted again when it comes back, as a
    /// tracked fragment).
    EV_HELD_FRAG_REINJECTED = 52, "event_held_fragment_reinjected", Event;
    /// Event, with `tc_fragment_reinjected`: a held fragment could not be
    /// re-injected (a helper failed); it is lost.
    EV_HELD_FRAG_LOST = 53, "event_held_fragment_lost", Event;
    /// XDP handed the packet to TC: the NIC it must leave by cannot take
    /// redirected XDP frames (its `xdp-features` lack `ndo-xmit`; the
    /// loader says so in [`crate::MAP_XDP_EGRESS`]), so TC forwards it as
    /// an skb: slower, nothing lost.
    XDP_TO_TC_NO_XMIT = 54, "xdp_to_tc_no_xdp_xmit", Verdict;
    /// XDP translated and redirected the packet, and the kernel refused
    /// the frame (the egress NIC down, unable to take XDP frames, its queue
    /// full). Counted by the tracing programs at the hook of the XDP
    /// program that redirected it, and taken off that hook's forwarded
    /// counter ([`xdp_forwarded`]), which so counts only what the kernel
    /// took: the packet's verdict moves, it is not counted twice.
    DROP_REDIRECT_REFUSED = 55, "drop_redirect_refused", Verdict;
    /// A new flow denied by the egress policy, whose rule answers with a
    /// silent drop ([`crate::policy::ANSWER_DROP`]).
    DROP_POLICY_DENIED = 56, "drop_policy_denied", Verdict;
    /// A new flow denied by the egress policy, answered with ICMP
    /// Destination Unreachable code 13 (the answer is counted by
    /// `event_policy_icmp_sent` or `event_policy_answer_rate_limited`).
    DROP_POLICY_PROHIBITED = 57, "drop_policy_prohibited", Verdict;
    /// A new TCP flow denied by the egress policy, answered with a RST
    /// (`event_policy_rst_sent`).
    DROP_POLICY_RESET = 58, "drop_policy_reset", Verdict;
    /// A new flow from `--int` whose source is in none of the inside
    /// prefixes (anti-spoofing, BCP 38).
    DROP_SPOOFED_SOURCE = 59, "drop_spoofed_source", Verdict;
    /// XDP handed a denied flow's packet to TC, which answers it.
    XDP_TO_TC_POLICY = 60, "xdp_to_tc_policy_answer", Verdict;
    /// Event: an ICMP "administratively prohibited" was sent for a denied
    /// flow.
    EV_POLICY_ICMP_SENT = 61, "event_policy_icmp_sent", Event;
    /// Event: a TCP RST was sent for a denied flow.
    EV_POLICY_RST_SENT = 62, "event_policy_rst_sent", Event;
    /// Event: a denied flow's answer was not sent, the rate limit (shared
    /// with the out-of-ports errors) being spent.
    EV_POLICY_ANSWER_RATE_LIMITED = 63, "event_policy_answer_rate_limited", Event;
    /// Event: a translation-log record (`--translation-log`) was lost,
    /// its ring buffer full (the loader reading too slowly, or gone).
    EV_TRANSLOG_LOST = 64, "event_translog_lost", Event;
    /// A new flow found no active address in the SNAT pool (every address
    /// draining, or none given yet: `--snat-ip auto` on an `--ext` without
    /// addresses).
    DROP_NO_SNAT_ADDRESS = 65, "drop_no_snat_address", Verdict;
    /// Event: the ICMP error or TCP RST answering a packet already dropped
    /// (out of ports, or denied by the egress policy) could not be built
    /// (a quote too short, a helper failing): the packet's verdict stays
    /// the drop `nat_tc_int` counted, the answer is not sent.
    EV_ANSWER_NOT_BUILT = 66, "event_answer_not_built", Event;
}

/// The reasons of a packet sent on its way out of a NIC (by a redirect, or
/// translated and handed to the kernel to fragment and send): the health
/// check compares what the programs forwarded with what left.
pub const FORWARDED: [u32; 10] = [
    XDP_OUT_FWD,
    XDP_IN_FWD,
    TC_OUT_FWD,
    TC_IN_FWD,
    TC_IN_ICMP_ERROR_FWD,
    TC_HAIRPIN_FWD,
    TC_TO_KERNEL_FRAGMENT,
    TC_OUT_ICMP_ERROR_FWD,
    TC_FRAG_FIRST_FWD,
    TC_FRAG_FWD,
];

/// What XDP hook `hook` counts for a packet it redirected:
/// [`XDP_OUT_FWD`] on `--int`, [`XDP_IN_FWD`] on `--ext`.
#[inline(always)]
pub const fn xdp_forwarded(hook: u32) -> u32 {
    if hook == HOOK_XDP_INT {
        XDP_OUT_FWD
    } else {
        XDP_IN_FWD
    }
}

/// [`crate::MAP_TRAFFIC`]'s directions: what `--int` sent out of `--ext`,
/// and what came back in.
pub const DIR_OUTBOUND: u32 = 0;
pub const DIR_INBOUND: u32 = 1;
/// `(direction, label)` of both directions.
pub const DIRECTIONS: [(u32, &str); 2] = [(DIR_OUTBOUND, "outbound"), (DIR_INBOUND, "inbound")];
/// The protocols forwarded, in [`crate::MAP_TRAFFIC`]'s order.
pub const TRAFFIC_PROTOS: [(u8, &str); 3] = [
    (crate::IPPROTO_TCP, "tcp"),
    (crate::IPPROTO_UDP, "udp"),
    (crate::IPPROTO_ICMP, "icmp"),
];
/// Entries of [`crate::MAP_TRAFFIC`].
pub const TRAFFIC_SLOTS: u32 = 2 * TRAFFIC_PROTOS.len() as u32;

/// Index in [`crate::MAP_TRAFFIC`] of protocol `proto` (TCP, UDP, else
/// ICMP: the only ones translated) in direction `dir`.
#[inline(always)]
pub const fn traffic_slot(dir: u32, proto: u8) -> u32 {
    let p = match proto {
        crate::IPPROTO_TCP => 0,
        crate::IPPROTO_UDP => 1,
        _ => 2,
    };
    dir * TRAFFIC_PROTOS.len() as u32 + p
}

/// The direction of what hook `hook` forwards: the `--int` hooks send
/// outbound, the `--ext` ones inbound.
#[inline(always)]
pub const fn direction(hook: u32) -> u32 {
    if hook == HOOK_XDP_INT || hook == HOOK_TC_INT {
        DIR_OUTBOUND
    } else {
        DIR_INBOUND
    }
}

/// Whether reason `idx` is a verdict or an event; `None` for no reason.
pub fn kind(idx: u32) -> Option<Kind> {
    KINDS.get(idx as usize).copied()
}

/// Label of a reason index.
pub fn label(idx: u32) -> &'static str {
    LABELS
        .iter()
        .find(|(i, _)| *i == idx)
        .map(|(_, l)| *l)
        .unwrap_or("unknown")
}

/// The reason a label names; `None` for a label no counter has (a typo).
pub fn reason(label: &str) -> Option<u32> {
    LABELS.iter().find(|(_, l)| *l == label).map(|(i, _)| *i)
}

/// The hook a label names (`"xdp_int"`, ...); `None` for no hook.
pub fn hook(label: &str) -> Option<u32> {
    HOOKS.iter().find(|(_, l)| *l == label).map(|(i, _)| *i)
}

/// Label of a hook index.
pub fn hook_label(idx: u32) -> &'static str {
    HOOKS
        .iter()
        .find(|(i, _)| *i == idx)
        .map(|(_, l)| *l)
        .unwrap_or("unknown")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_dense_and_labels_unique() {
        for (pos, (idx, _)) in LABELS.iter().enumerate() {
            assert_eq!(*idx as usize, pos);
        }
        let mut labels: Vec<_> = LABELS.iter().map(|(_, l)| *l).collect();
        labels.sort();
        labels.dedup();
        assert_eq!(labels.len(), COUNT as usize);
    }

    #[test]
    fn events_are_told_from_verdicts() {
        assert_eq!(KINDS.len(), COUNT as usize);
        for r in [
            XDP_OUT_FWD,
            TC_IN_FWD,
            XDP_TO_TC_NO_NEIGH,
            PASS_LOCAL,
            DROP_MALFORMED,
        ] {
            assert_eq!(kind(r), Some(Kind::Verdict), "{}", label(r));
        }
        // Counted besides a verdict: a new flow is forwarded too, an ICMP
        // error sent for a packet that found no port is also its drop.
        for r in [
            EV_NEW_FLOW,
            EV_NEW_BINDING,
            EV_INSERT_RACE,
            EV_INBOUND_SESSION,
            EV_ICMP_NO_PORT_SENT,
            EV_ICMP_NO_PORT_RATE_LIMITED,
            EV_MSS_CLAMPED,
            EV_FRAG_TRACKED,
            DROP_FRAG_BUDGET,
            EV_HELD_FRAG_REINJECTED,
            EV_HELD_FRAG_LOST,
            EV_POLICY_ICMP_SENT,
            EV_POLICY_RST_SENT,
            EV_POLICY_ANSWER_RATE_LIMITED,
        ] {
            assert_eq!(kind(r), Some(Kind::Event), "{}", label(r));
        }
        assert_eq!(kind(COUNT), None);
        // Events are named as such, except the held fragments' budget
        // (named for what became of them) and the out-of-ports errors.
        for (idx, l) in LABELS {
            if l.starts_with("event_") {
                assert_eq!(kind(*idx), Some(Kind::Event), "{l}");
            }
        }
    }

    #[test]
    fn traffic_slots_are_dense_per_direction_and_protocol() {
        let mut seen = Vec::new();
        for (d, _) in DIRECTIONS {
            for (p, _) in TRAFFIC_PROTOS {
                seen.push(traffic_slot(d, p));
            }
        }
        assert_eq!(seen, (0..TRAFFIC_SLOTS).collect::<Vec<_>>());
        assert_eq!(direction(HOOK_TC_INT), DIR_OUTBOUND);
        assert_eq!(direction(HOOK_XDP_EXT), DIR_INBOUND);
    }

    #[test]
    fn hooks_are_dense_and_slots_do_not_overlap() {
        for (pos, (idx, _)) in HOOKS.iter().enumerate() {
            assert_eq!(*idx as usize, pos);
        }
        assert_eq!(slot(HOOK_XDP_EXT, 0), slot(HOOK_XDP_INT, COUNT - 1) + 1);
        assert_eq!(slot(HOOK_TC_EXT, COUNT - 1), SLOTS - 1);
    }

    #[test]
    fn labels_map_back_to_their_indexes_and_typos_to_none() {
        for (idx, l) in LABELS {
            assert_eq!(reason(l), Some(*idx));
        }
        for (idx, l) in HOOKS {
            assert_eq!(hook(l), Some(idx));
            assert_eq!(hook_label(idx), l);
        }
        assert_eq!(reason("xdp_out_forwarderd"), None);
        assert_eq!(hook("xdp_inf"), None);
    }
}

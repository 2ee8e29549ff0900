//! Table pressure: which sessions give way when the conntrack table fills.
//!
//! A flood of new 5-tuples (a SYN flood, a scan, a UDP spray) fills the
//! preallocated session table within a second. The dataplane never evicts
//! (a full table is a counted drop, `drop_table_full`), so established
//! flows survive; but without help the flood's entries would then lock out
//! every new flow for their idle timeout (4 minutes for half-open TCP).
//!
//! So the sweeper, when the table is above [`HIGH_WATERMARK_PCT`] or new
//! flows were refused since its last pass, evicts sessions nobody outside
//! ever answered, then TCP sessions that were reset, oldest first, down to
//! [`LOW_WATERMARK_PCT`], and sweeps every [`PRESSURE_SWEEP`] until the
//! pressure is gone. Answered sessions (established TCP, UDP or ICMP with a
//! reply) are never evicted by pressure: only their idle timeout ends them.

use std::time::Duration;

use nat_common::{
    CT_F_INBOUND, CT_F_REPLIED, CtKey, CtValue, IPPROTO_TCP,
    tcp::{RST, SYN_IN, SYN_OUT},
};

/// Above this share of `--max-flows` sessions, the sweeper is under pressure.
pub const HIGH_WATERMARK_PCT: u64 = 75;
/// Under pressure, evict down to this share of `--max-flows`: room for the
/// new flows of a few seconds, so one pass does not leave the table full.
pub const LOW_WATERMARK_PCT: u64 = 50;
/// A session is evictable only after this long without a packet: a SYN
/// whose SYN-ACK is on its way (an RTT) must not be evicted, and a client
/// retransmitting its SYN (1 s, 3 s, ...) refreshes it.
pub const GRACE_NS: u64 = 2_000_000_000;
/// How often the sweeper runs while under pressure (whatever
/// `--sweep-interval`): every second between passes, new flows are refused.
pub const PRESSURE_SWEEP: Duration = Duration::from_secs(1);

/// How a session stands under pressure, in eviction order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Standing {
    /// Nobody answered: no packet ever went against the opening direction,
    /// or a TCP session has only the opener's SYN (half-open; a reused
    /// 5-tuple keeps the flag of its previous connection, so the SYN bits
    /// decide for TCP).
    Unanswered,
    /// TCP with a RST seen: the connection is over; its entry only waits
    /// out the transitory timeout for stray segments.
    Reset,
    /// Answered and not reset: never evicted by pressure.
    Kept,
}

/// The standing of a session of protocol `proto`. TCP stands by its state
/// bits first: SYNs both ways mean the remote answered, whatever the flag
/// (sessions created by a dataplane older than the flag have none).
pub fn standing(proto: u8, v: &CtValue) -> Standing {
    if proto == IPPROTO_TCP {
        let s = v.tcp_state;
        if s & RST != 0 {
            return Standing::Reset;
        }
        let opener = if v.flags & CT_F_INBOUND != 0 {
            SYN_IN
        } else {
            SYN_OUT
        };
        match s & (SYN_OUT | SYN_IN) {
            syns if syns == SYN_OUT | SYN_IN => return Standing::Kept,
            syns if syns == opener => return Standing::Unanswered,
            // No SYN seen (picked up mid-stream): the flag decides.
            _ => {}
        }
    }
    if v.flags & CT_F_REPLIED == 0 {
        Standing::Unanswered
    } else {
        Standing::Kept
    }
}

/// The watermarks of a table, in sessions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub high: usize,
    pub low: usize,
    pub grace_ns: u64,
}

impl Limits {
    pub fn for_table(max_flows: u32) -> Limits {
        let pct = |p: u64| (max_flows as u64 * p / 100) as usize;
        Limits {
            high: pct(HIGH_WATERMARK_PCT),
            low: pct(LOW_WATERMARK_PCT),
            grace_ns: GRACE_NS,
        }
    }

    /// Whether a table of `sessions` with `refused` new flows since the
    /// last pass is under pressure.
    pub fn pressed(&self, sessions: usize, refused: bool) -> bool {
        refused || sessions >= self.high
    }
}

/// The sessions to evict from `alive` (indices, in eviction order) so that
/// at most `limits.low` remain: unanswered before reset, oldest (last
/// packet) first, none seen within the grace period, none answered. Empty
/// when not under pressure. May leave more than `low` when too few
/// sessions qualify.
pub fn victims(
    alive: &[(CtKey, CtValue)],
    limits: &Limits,
    now_ns: u64,
    pressed: bool,
) -> Vec<usize> {
    if !pressed || alive.len() <= limits.low {
        return Vec::new();
    }
    let need = alive.len() - limits.low;
    let mut cands: Vec<(Standing, u64, usize)> = alive
        .iter()
        .enumerate()
        .filter_map(|(i, (k, v))| {
            let st = standing(k.proto, v);
            // A stamp in the future (a packet raced our clock read) is
            // within the grace period too.
            let age = nat_common::age_ns(v.last_seen, now_ns)?;
            let quiet = age >= limits.grace_ns;
            // Oldest first: the largest age, so its complement sorts first.
            (st != Standing::Kept && quiet).then_some((st, u64::MAX - age, i))
        })
        .collect();
    if cands.len() > need {
        cands.select_nth_unstable(need);
        cands.truncate(need);
    }
    cands.sort_unstable();
    cands.into_iter().map(|(_, _, i)| i).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nat_common::{
        IPPROTO_ICMP, IPPROTO_UDP,
        tcp::{DIR_IN, DIR_OUT, TCP_RST, TCP_SYN, update},
    };

    // About a second, in whole ticks (the resolution of `last_seen`).
    const S: u64 = 60 * nat_common::TICK_NS;
    const ACK: u8 = 0x10;

    fn entry(proto: u8, n: u32, tcp_state: u8, flags: u8, last_seen_ns: u64) -> (CtKey, CtValue) {
        (
            CtKey::new(proto, n, 1000, 0x0a0a_0a0a, 80),
            CtValue::new(0, 0, nat_common::ticks(last_seen_ns), tcp_state, flags),
        )
    }

    fn limits(low: usize) -> Limits {
        Limits {
            high: low * 2,
            low,
            grace_ns: 2 * S,
        }
    }

    #[test]
    fn half_open_syn_is_unanswered_and_established_is_kept() {
        let syn = update(0, DIR_OUT, TCP_SYN);
        let est = update(syn, DIR_IN, TCP_SYN | ACK);
        assert_eq!(
            standing(IPPROTO_TCP, &entry(IPPROTO_TCP, 1, syn, 0, 0).1),
            Standing::Unanswered
        );
        assert_eq!(
            standing(IPPROTO_TCP, &entry(IPPROTO_TCP, 1, est, CT_F_REPLIED, 0).1),
            Standing::Kept
        );
    }

    #[test]
    fn established_tcp_without_the_flag_is_kept() {
        // Adopted from a dataplane that did not set the flag yet.
        let est = update(update(0, DIR_OUT, TCP_SYN), DIR_IN, TCP_SYN | ACK);
        let v = entry(IPPROTO_TCP, 1, est, 0, 0).1;
        assert_eq!(standing(IPPROTO_TCP, &v), Standing::Kept);
    }

    #[test]
    fn tcp_picked_up_mid_stream_stands_by_the_flag() {
        let mid = update(0, DIR_OUT, ACK);
        assert_eq!(
            standing(IPPROTO_TCP, &entry(IPPROTO_TCP, 1, mid, 0, 0).1),
            Standing::Unanswered
        );
        assert_eq!(
            standing(IPPROTO_TCP, &entry(IPPROTO_TCP, 1, mid, CT_F_REPLIED, 0).1),
            Standing::Kept
        );
    }

    #[test]
    fn reused_tuple_with_an_old_reply_flag_is_half_open_again() {
        let est = update(update(0, DIR_OUT, TCP_SYN), DIR_IN, TCP_SYN | ACK);
        let reopened = update(update(est, DIR_OUT, TCP_RST), DIR_OUT, TCP_SYN);
        let v = entry(IPPROTO_TCP, 1, reopened, CT_F_REPLIED, 0).1;
        assert_eq!(standing(IPPROTO_TCP, &v), Standing::Unanswered);
    }

    #[test]
    fn inbound_opened_tcp_is_half_open_until_the_inside_answers() {
        let syn_in = update(0, DIR_IN, TCP_SYN);
        let v = entry(IPPROTO_TCP, 1, syn_in, CT_F_INBOUND, 0).1;
        assert_eq!(standing(IPPROTO_TCP, &v), Standing::Unanswered);
        let answered = update(syn_in, DIR_OUT, TCP_SYN | ACK);
        let v = entry(IPPROTO_TCP, 1, answered, CT_F_INBOUND | CT_F_REPLIED, 0).1;
        assert_eq!(standing(IPPROTO_TCP, &v), Standing::Kept);
    }

    #[test]
    fn reset_tcp_comes_after_unanswered() {
        let refused = update(update(0, DIR_OUT, TCP_SYN), DIR_IN, TCP_RST | ACK);
        let v = entry(IPPROTO_TCP, 1, refused, CT_F_REPLIED, 0).1;
        assert_eq!(standing(IPPROTO_TCP, &v), Standing::Reset);
        assert!(Standing::Unanswered < Standing::Reset);
    }

    #[test]
    fn udp_and_icmp_stand_by_the_reply_flag() {
        for proto in [IPPROTO_UDP, IPPROTO_ICMP] {
            assert_eq!(
                standing(proto, &entry(proto, 1, 0, 0, 0).1),
                Standing::Unanswered
            );
            assert_eq!(
                standing(proto, &entry(proto, 1, 0, CT_F_REPLIED, 0).1),
                Standing::Kept
            );
        }
    }

    #[test]
    fn no_pressure_no_victims() {
        let alive: Vec<_> = (0..10).map(|n| entry(IPPROTO_UDP, n, 0, 0, 0)).collect();
        assert!(victims(&alive, &limits(2), 100 * S, false).is_empty());
    }

    #[test]
    fn evicts_oldest_unanswered_down_to_the_low_watermark() {
        let syn = update(0, DIR_OUT, TCP_SYN);
        // Sessions 0..8, last seen at second n; all half-open.
        let alive: Vec<_> = (0..8u32)
            .map(|n| entry(IPPROTO_TCP, n, syn, 0, n as u64 * S))
            .collect();
        let v = victims(&alive, &limits(5), 100 * S, true);
        assert_eq!(v, vec![0, 1, 2]);
    }

    #[test]
    fn answered_sessions_are_never_evicted_even_if_the_low_mark_is_missed() {
        let est = update(update(0, DIR_OUT, TCP_SYN), DIR_IN, TCP_SYN | ACK);
        let mut alive: Vec<_> = (0..6u32)
            .map(|n| entry(IPPROTO_TCP, n, est, CT_F_REPLIED, 0))
            .collect();
        alive.push(entry(IPPROTO_UDP, 99, 0, CT_F_REPLIED, 0));
        alive.push(entry(IPPROTO_UDP, 100, 0, 0, 50 * S));
        let v = victims(&alive, &limits(1), 100 * S, true);
        assert_eq!(v, vec![7]);
    }

    #[test]
    fn unanswered_go_before_reset_whatever_their_age() {
        let syn = update(0, DIR_OUT, TCP_SYN);
        let reset = update(syn, DIR_IN, TCP_RST);
        let alive = vec![
            entry(IPPROTO_TCP, 0, reset, CT_F_REPLIED, S),
            entry(IPPROTO_TCP, 1, syn, 0, 50 * S),
            entry(IPPROTO_TCP, 2, reset, CT_F_REPLIED, 2 * S),
            entry(IPPROTO_TCP, 3, syn, 0, 40 * S),
        ];
        assert_eq!(victims(&alive, &limits(1), 100 * S, true), vec![3, 1, 0]);
        assert_eq!(victims(&alive, &limits(2), 100 * S, true), vec![3, 1]);
    }

    #[test]
    fn sessions_within_the_grace_period_stay() {
        let syn = update(0, DIR_OUT, TCP_SYN);
        let alive = vec![
            entry(IPPROTO_TCP, 0, syn, 0, 99 * S),
            entry(IPPROTO_TCP, 1, syn, 0, 98 * S),
            entry(IPPROTO_TCP, 2, syn, 0, 101 * S),
            entry(IPPROTO_TCP, 3, syn, 0, 90 * S),
        ];
        assert_eq!(victims(&alive, &limits(0), 100 * S, true), vec![3, 1]);
    }

    #[test]
    fn watermarks_are_shares_of_the_table() {
        let l = Limits::for_table(32768);
        assert_eq!((l.high, l.low), (24576, 16384));
        assert!(l.pressed(24576, false));
        assert!(!l.pressed(24575, false));
        assert!(l.pressed(0, true));
    }
}

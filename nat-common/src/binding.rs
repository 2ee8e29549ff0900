//! What the sweeper does with a binding (RFC 4787's mapping) at the end of
//! a pass, given whether any live session still uses it. Pure, so the
//! hold rules (RFC 6888 REQ-8) and the race with the dataplane are tested
//! on the host.
//!
//! The race: the sweeper walks the sessions first and the bindings after.
//! A binding the dataplane creates between the two walks (or one whose
//! new session lands in a part of the session table already walked) has
//! no session in the pass's view, though it has one in the table. Judged
//! on that view, it would be released and refuse every new inbound
//! session until the next pass. The dataplane therefore stamps a binding
//! each time a session claims it ([`BindValue::stamp`], in ticks), and a pass does
//! not judge a binding claimed after the pass began.

use crate::{BIND_F_NO_HOLD, BIND_F_RELEASED, BindValue, age_ns, ticks};

/// The sweeper's verdict on one binding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Leave it as it is.
    Keep,
    /// Released, but a session uses it again: clear the release.
    Restore,
    /// In use by nobody: release it. `no_hold` when no session of it was
    /// ever answered, so nobody outside can still be talking to the port
    /// and it is freed at the next pass instead of being held.
    Release { no_hold: bool },
    /// Released and its hold is over (or it needs none): delete it.
    Free,
}

/// The fate of binding `v` in a pass that began at `pass_start_ns`
/// (CLOCK_MONOTONIC, read before the session walk).
///
/// * `in_use`: a live session of the pass's view uses it;
/// * `answered`: a session removed in this pass had been answered;
/// * `hold_ns`: how long a released port stays reserved for its endpoint.
pub const fn fate(
    v: &BindValue,
    in_use: bool,
    answered: bool,
    pass_start_ns: u64,
    hold_ns: u64,
) -> Fate {
    let released = v.flags & BIND_F_RELEASED != 0;
    if in_use {
        return if released { Fate::Restore } else { Fate::Keep };
    }
    if !released {
        // Claimed while this pass was walking: its session may be one the
        // walk did not see.
        if age_ns(v.stamp, pass_start_ns).is_none() || v.stamp == ticks(pass_start_ns) {
            return Fate::Keep;
        }
        return Fate::Release { no_hold: !answered };
    }
    let held_for = match age_ns(v.stamp, pass_start_ns) {
        Some(a) => a,
        None => 0,
    };
    if v.flags & BIND_F_NO_HOLD != 0 || held_for > hold_ns {
        Fate::Free
    } else {
        Fate::Keep
    }
}

/// The value a released binding gets: flags set, stamped with the release.
pub const fn released(v: &BindValue, no_hold: bool, now_ns: u64) -> BindValue {
    BindValue {
        flags: BIND_F_RELEASED | if no_hold { BIND_F_NO_HOLD } else { 0 },
        stamp: ticks(now_ns),
        ..*v
    }
}

/// The value of a binding a session claims at `now_ns`: flags cleared,
/// stamped. The dataplane writes it when a session is created, the
/// sweeper when it finds a released binding in use.
pub const fn claimed(v: &BindValue, now_ns: u64) -> BindValue {
    BindValue {
        flags: 0,
        stamp: ticks(now_ns),
        ..*v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::TICK_NS;

    // Whole ticks, the resolution of the stamps.
    const SEC: u64 = 60 * TICK_NS;
    const HOLD: u64 = 120 * SEC;
    const PASS: u64 = 1_000 * SEC;

    fn bound(stamp_ns: u64) -> BindValue {
        BindValue {
            addr: 0x0a00_0001,
            port: 4000u16.to_be(),
            stamp: ticks(stamp_ns),
            ..BindValue::default()
        }
    }

    #[test]
    fn a_binding_in_use_is_kept() {
        assert_eq!(fate(&bound(1), true, false, PASS, HOLD), Fate::Keep);
    }

    #[test]
    fn an_unused_binding_claimed_before_the_pass_is_released_and_held_if_answered() {
        let v = bound(PASS - 5 * SEC);
        assert_eq!(
            fate(&v, false, true, PASS, HOLD),
            Fate::Release { no_hold: false }
        );
        assert_eq!(
            fate(&v, false, false, PASS, HOLD),
            Fate::Release { no_hold: true }
        );
    }

    #[test]
    fn a_binding_claimed_while_the_pass_walked_is_not_released() {
        // Created between the session walk and the binding walk: no
        // session in the pass's view, one in the table.
        assert_eq!(fate(&bound(PASS), false, false, PASS, HOLD), Fate::Keep);
        assert_eq!(
            fate(&bound(PASS + 3 * TICK_NS), false, false, PASS, HOLD),
            Fate::Keep
        );
    }

    #[test]
    fn a_binding_from_before_stamps_existed_is_judged_normally() {
        // Stamp 0: written by a dataplane that did not stamp claims.
        assert_eq!(
            fate(&bound(0), false, true, PASS, HOLD),
            Fate::Release { no_hold: false }
        );
    }

    #[test]
    fn a_released_binding_in_use_again_is_restored() {
        let v = released(&bound(0), false, PASS - SEC);
        assert_eq!(fate(&v, true, false, PASS, HOLD), Fate::Restore);
    }

    #[test]
    fn a_held_binding_is_freed_only_after_the_hold() {
        let v = released(&bound(0), false, PASS - HOLD);
        assert_eq!(fate(&v, false, false, PASS, HOLD), Fate::Keep);
        assert_eq!(
            fate(&v, false, false, PASS + TICK_NS, HOLD),
            Fate::Free,
            "one tick past the hold"
        );
    }

    #[test]
    fn an_unanswered_binding_is_freed_at_the_next_pass() {
        let v = released(&bound(0), true, PASS - 1);
        assert_eq!(fate(&v, false, false, PASS, HOLD), Fate::Free);
    }

    #[test]
    fn a_claim_clears_the_release_and_stamps() {
        let v = claimed(&released(&bound(0), true, 5 * TICK_NS), 9 * TICK_NS);
        assert_eq!(v.flags, 0);
        assert_eq!(v.stamp, 9);
        assert_eq!(fate(&v, false, false, 9 * TICK_NS, HOLD), Fate::Keep);
    }
}

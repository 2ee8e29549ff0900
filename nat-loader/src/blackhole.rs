//! Is the instance dropping what it should forward? The health check's
//! decision over the counters it samples every tick, kept pure here: the
//! window, the thresholds and the hysteresis.
//!
//! Two kinds of evidence, each over the last second:
//! - **refused redirects**: the kernel refused at least [`REFUSED_MIN`] of
//!   an XDP program's redirects into its egress NIC, and at least one in
//!   [`REFUSED_SHARE`] of them (a NIC whose queue overflows under load
//!   refuses a few: that is loss, not a blackhole);
//! - **nothing leaving**: the programs decided to forward at least
//!   [`STALL_MIN`] packets, and nothing left: the NICs sent nothing and the
//!   kernel took no XDP redirect.
//!
//! Evidence makes the verdict unhealthy at the tick that sees it; it turns
//! healthy again after [`CLEAR_TICKS`] ticks in a row whose window holds no
//! evidence, so a failure that comes and goes does not make the probe
//! flap with it. Refusals of a program whose way of forwarding changed at
//! this tick (XDP hands to TC now: the fallback took over) are no
//! evidence: they ended with the change.

use std::collections::VecDeque;

/// Ticks in the window: one second at the health check's 250 ms.
pub const WINDOW_TICKS: usize = 4;
/// Fewest refused redirects in the window that count as evidence.
pub const REFUSED_MIN: u64 = 3;
/// Refused redirects are evidence when at least 1 in this many redirects
/// was refused.
pub const REFUSED_SHARE: u64 = 10;
/// Fewest packets to forward in the window, with nothing leaving, that
/// count as evidence.
pub const STALL_MIN: u64 = 20;
/// Ticks in a row without evidence before the verdict is healthy again.
pub const CLEAR_TICKS: u32 = 8;

/// One tick's cumulative counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sample {
    /// Per XDP program (`--int`'s, `--ext`'s): redirects the kernel
    /// refused (`drop_redirect_refused`) and redirects it took (the
    /// forwarded counter, from which the refused ones are taken off).
    pub refused: [u64; 2],
    pub redirected: [u64; 2],
    /// Packets the programs decided to forward, at every hook (XDP's
    /// refused redirects included).
    pub to_forward: u64,
    /// Packets that left: what both NICs sent, plus the XDP redirects the
    /// kernel took (some drivers do not count those as sent).
    pub left: u64,
}

/// What the window shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// The kernel refuses the redirects of XDP program `program` (0:
    /// `--int`'s, 1: `--ext`'s) into its egress NIC: `refused` of
    /// `attempts` in the window.
    Refused {
        program: usize,
        refused: u64,
        attempts: u64,
    },
    /// `to_forward` packets to forward in the window, nothing left.
    NothingLeaves { to_forward: u64 },
}

impl Problem {
    /// The health reason, stable while the problem lasts (the daemon logs
    /// each change of reason). `egress` names each XDP program's egress
    /// NIC (`--ext`, `--int`).
    pub fn reason(&self, egress: [&str; 2]) -> String {
        match self {
            Problem::Refused { program, .. } => format!(
                "the kernel refuses XDP redirects into {} (drop_redirect_refused)",
                egress.get(*program).unwrap_or(&"?")
            ),
            Problem::NothingLeaves { .. } => format!(
                "packets to forward arrive but nothing leaves {} or {}",
                egress[1], egress[0]
            ),
        }
    }
}

/// The verdict, tick after tick.
#[derive(Debug, Default)]
pub struct Detector {
    /// The last `WINDOW_TICKS + 1` samples, oldest first.
    samples: VecDeque<Sample>,
    /// The problem the verdict is unhealthy for, if it is.
    problem: Option<Problem>,
    /// Ticks in a row without evidence while unhealthy.
    clean: u32,
}

impl Detector {
    /// The problem the verdict is unhealthy for, if it is.
    pub fn problem(&self) -> Option<&Problem> {
        self.problem.as_ref()
    }

    /// Takes this tick's sample; `settled[p]`: program `p`'s way of
    /// forwarding changed at this tick, so its refusals until now are
    /// history. Returns the problem while the verdict is unhealthy.
    pub fn observe(&mut self, now: Sample, settled: [bool; 2]) -> Option<&Problem> {
        for (p, _) in settled.iter().enumerate().filter(|(_, s)| **s) {
            for old in self.samples.iter_mut() {
                old.refused[p] = now.refused[p];
                old.redirected[p] = now.redirected[p];
            }
        }
        self.samples.push_back(now);
        while self.samples.len() > WINDOW_TICKS + 1 {
            self.samples.pop_front();
        }
        match self.evidence() {
            Some(p) => {
                // A new kind of problem replaces the old; the same kind
                // keeps its first numbers, so the reason stays put.
                if self.problem.as_ref().is_none_or(|old| !same_kind(old, &p)) {
                    self.problem = Some(p);
                }
                self.clean = 0;
            }
            None if self.problem.is_some() => {
                self.clean += 1;
                if self.clean >= CLEAR_TICKS {
                    self.problem = None;
                    self.clean = 0;
                }
            }
            None => {}
        }
        self.problem.as_ref()
    }

    /// The evidence in the window, if any: refused redirects first.
    fn evidence(&self) -> Option<Problem> {
        let (first, last) = (self.samples.front()?, self.samples.back()?);
        // Counters only grow; one that went back (counters replaced by an
        // upgrade) shows nothing until the window refills.
        let d = |a: u64, b: u64| b.saturating_sub(a);
        for program in 0..2 {
            let refused = d(first.refused[program], last.refused[program]);
            let attempts = refused + d(first.redirected[program], last.redirected[program]);
            if refused >= REFUSED_MIN && refused * REFUSED_SHARE >= attempts {
                return Some(Problem::Refused {
                    program,
                    refused,
                    attempts,
                });
            }
        }
        let to_forward = d(first.to_forward, last.to_forward);
        if to_forward >= STALL_MIN && d(first.left, last.left) == 0 {
            return Some(Problem::NothingLeaves { to_forward });
        }
        None
    }
}

fn same_kind(a: &Problem, b: &Problem) -> bool {
    match (a, b) {
        (Problem::Refused { program: x, .. }, Problem::Refused { program: y, .. }) => x == y,
        (Problem::NothingLeaves { .. }, Problem::NothingLeaves { .. }) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run of ticks: each tick adds `step` to the counters.
    struct Run {
        d: Detector,
        now: Sample,
    }

    impl Run {
        fn new() -> Run {
            let mut d = Detector::default();
            let now = Sample {
                refused: [0; 2],
                redirected: [1000; 2],
                to_forward: 2000,
                left: 2000,
            };
            assert_eq!(d.observe(now, [false; 2]), None);
            Run { d, now }
        }

        /// One tick in which program 0 had `redirected` redirects taken and
        /// `refused` refused, and `left` packets left besides.
        fn tick(&mut self, redirected: u64, refused: u64, other_left: u64) -> Option<Problem> {
            self.now.refused[0] += refused;
            self.now.redirected[0] += redirected;
            self.now.to_forward += redirected + refused;
            self.now.left += redirected + other_left;
            self.d.observe(self.now, [false; 2]).cloned()
        }

        /// One tick in which `n` packets were to be forwarded by TC and
        /// `left` left.
        fn tc_tick(&mut self, n: u64, left: u64) -> Option<Problem> {
            self.now.to_forward += n;
            self.now.left += left;
            self.d.observe(self.now, [false; 2]).cloned()
        }
    }

    #[test]
    fn rising_refusals_make_it_unhealthy_at_the_tick_that_sees_them() {
        let mut r = Run::new();
        assert_eq!(r.tick(10, 0, 0), None);
        // A blackhole: every redirect refused, 3 per tick (12 a second).
        let p = r.tick(0, 3, 0).expect("unhealthy within one tick");
        assert_eq!(
            p,
            Problem::Refused {
                program: 0,
                refused: 3,
                attempts: 13
            }
        );
        assert_eq!(
            p.reason(["ext", "int"]),
            "the kernel refuses XDP redirects into ext (drop_redirect_refused)"
        );
    }

    #[test]
    fn a_slow_blackhole_is_seen_within_the_one_second_window() {
        let mut r = Run::new();
        // One refused ping per tick: the third makes it.
        assert_eq!(r.tick(0, 1, 0), None);
        assert_eq!(r.tick(0, 1, 0), None);
        assert!(r.tick(0, 1, 0).is_some());
    }

    #[test]
    fn it_is_healthy_again_two_seconds_after_the_window_is_clean_and_stays_so() {
        let mut r = Run::new();
        assert!(r.tick(0, 10, 0).is_some());
        // The refusals stop (the fallback took over): the evidence is in
        // the window for WINDOW_TICKS more ticks, then CLEAR_TICKS clean
        // ones.
        let mut unhealthy_ticks = 0;
        while r.tick(5, 0, 0).is_some() {
            unhealthy_ticks += 1;
            assert!(unhealthy_ticks < 100, "never healthy again");
        }
        // The tick that clears is the CLEAR_TICKS-th without evidence.
        assert_eq!(unhealthy_ticks, WINDOW_TICKS - 1 + CLEAR_TICKS as usize - 1);
        for _ in 0..40 {
            assert_eq!(r.tick(50, 0, 0), None);
        }
    }

    #[test]
    fn refusals_until_the_fallback_took_over_at_this_tick_are_no_evidence() {
        let mut r = Run::new();
        assert_eq!(r.tick(100, 0, 0), None);
        // The egress NIC lost ndo-xmit: a few redirects refused until the
        // loader saw it and told XDP to hand to TC, at this very tick.
        r.now.refused[0] += 5;
        r.now.to_forward += 5;
        assert_eq!(r.d.observe(r.now, [true, false]), None);
        for _ in 0..10 {
            assert_eq!(r.tc_tick(20, 20), None);
        }
        // Refusals of the other program are evidence all the same.
        r.now.refused[1] += 5;
        r.now.to_forward += 5;
        assert!(r.d.observe(r.now, [true, false]).is_some());
    }

    #[test]
    fn normal_loss_does_not_make_it_unhealthy() {
        let mut r = Run::new();
        // Under load a NIC refuses some frames of a full queue: 1 in 50.
        for _ in 0..40 {
            assert_eq!(r.tick(4900, 100, 0), None);
        }
        // One or two refusals now and then, at any rate.
        for i in 0..40 {
            let refused = if i % 8 == 0 { 2 } else { 0 };
            assert_eq!(r.tick(3, refused, 0), None);
        }
    }

    #[test]
    fn refusals_that_come_and_go_keep_it_unhealthy_instead_of_flapping() {
        let mut r = Run::new();
        let mut verdicts = Vec::new();
        for i in 0..60 {
            // Every 2 s, a quarter of a second when every redirect is
            // refused.
            let (taken, refused) = if i % 8 == 0 { (0, 20) } else { (20, 0) };
            verdicts.push(r.tick(taken, refused, 0).is_some());
        }
        let changes = verdicts.windows(2).filter(|w| w[0] != w[1]).count();
        assert_eq!(changes, 0, "{verdicts:?}");
        assert!(verdicts[0]);
    }

    #[test]
    fn packets_to_forward_with_nothing_leaving_make_it_unhealthy() {
        let mut r = Run::new();
        // Ten left in the first tick; while it is in the window, nothing
        // is wrong.
        assert_eq!(r.tc_tick(10, 10), None);
        for _ in 0..3 {
            assert_eq!(r.tc_tick(10, 0), None);
        }
        // Once it is out of the window.
        let p = r.tc_tick(10, 0).expect("40 to forward, nothing left");
        assert_eq!(p, Problem::NothingLeaves { to_forward: 40 });
        assert_eq!(
            p.reason(["ext", "int"]),
            "packets to forward arrive but nothing leaves int or ext"
        );
    }

    #[test]
    fn a_quiet_gateway_is_healthy() {
        let mut r = Run::new();
        for _ in 0..20 {
            assert_eq!(r.tc_tick(0, 0), None);
            assert_eq!(r.tick(0, 0, 0), None);
        }
        // A few packets with no answer leaving is no evidence either.
        for _ in 0..20 {
            assert_eq!(r.tc_tick(2, 0), None);
        }
    }

    #[test]
    fn counters_that_start_again_from_zero_are_no_evidence() {
        let mut r = Run::new();
        // Replaced by an upgrade: every counter back to zero, and a
        // refusal or two since.
        r.now = Sample::default();
        assert_eq!(r.d.observe(r.now, [false; 2]), None);
        assert_eq!(r.tick(10, 1, 0), None);
        assert_eq!(r.tick(10, 1, 0), None);
        assert_eq!(r.tick(10, 0, 0), None);
    }
}

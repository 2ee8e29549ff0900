//! Rate limit of the ICMP errors the gateway generates itself (out of
//! ports, RFC 5508 REQ-8): a generic cell rate algorithm per CPU, so a flood
//! of new flows while the port range is exhausted cannot be amplified into
//! a flood of errors. The state is one `u64` per CPU (the theoretical
//! arrival time of the next error); no CPU ever writes another's.

/// Errors per second each CPU may send on average.
pub const PER_SECOND: u64 = 100;
/// How many may go back to back after a quiet spell.
pub const BURST: u64 = 20;
const INTERVAL_NS: u64 = 1_000_000_000 / PER_SECOND;
const TOLERANCE_NS: u64 = (BURST - 1) * INTERVAL_NS;

/// Whether an error may be sent at `now` (CLOCK_MONOTONIC ns) given the
/// stored state `tat`; `Some(new state)` if so.
#[inline(always)]
pub const fn admit(tat: u64, now: u64) -> Option<u64> {
    let tat = if tat < now { now } else { tat };
    if tat - now > TOLERANCE_NS {
        None
    } else {
        Some(tat + INTERVAL_NS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_rate_holds() {
        let mut tat = 0;
        let now = 5_000_000_000;
        for i in 0..BURST {
            tat = admit(tat, now).unwrap_or_else(|| panic!("burst item {i} refused"));
        }
        assert_eq!(admit(tat, now), None, "past the burst");
        // One interval later exactly one more is allowed.
        let later = now + INTERVAL_NS;
        tat = admit(tat, later).expect("one per interval");
        assert_eq!(admit(tat, later), None);
    }

    #[test]
    fn over_a_second_at_most_rate_plus_burst_pass() {
        let mut tat = 0;
        let mut sent = 0;
        let start = 1_000_000_000;
        // A packet every 100 µs for one second.
        for i in 0..10_000u64 {
            if let Some(t) = admit(tat, start + i * 100_000) {
                tat = t;
                sent += 1;
            }
        }
        assert!(sent <= PER_SECOND + BURST, "sent {sent}");
        assert!(sent >= PER_SECOND, "sent {sent}");
    }
}

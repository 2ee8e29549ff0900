//! External port choice.
//!
//! The first candidate is the inside port itself when it is in range (port
//! preservation keeps applications that care about their port working and
//! makes translations easy to read); the rest are spread pseudo-randomly
//! over the range (RFC 6056) so that external ports are hard to predict.
//! Inside ports below 1024 get external ports below 1024 and the others
//! ports above (RFC 4787 REQ-3a, [`range_for`]); the first half of the
//! retries keep the inside port's parity (REQ-4), the second half do not,
//! so a small range is still fully used.

/// How many candidates the fast path tries before giving up on a new flow.
/// Bounded so the verifier can see the loop end and a busy table costs a
/// known amount.
pub const MAX_PORT_ATTEMPTS: u32 = 16;

/// Candidate number `attempt` (0-based) for a flow whose inside port is
/// `preferred` (host order), given a random value `rnd` drawn once per flow.
/// Returns a host-order port within `[min, max]`; `min <= max` is the
/// caller's invariant (the loader validates `--port-range`).
/// The external range `(min, max)` for inside port `preferred` (host order):
/// the low range for ports below 1024, the main one for the rest.
#[inline(always)]
pub const fn range_for(preferred: u16, main: (u16, u16), low: (u16, u16)) -> (u16, u16) {
    if preferred < 1024 { low } else { main }
}

#[inline(always)]
pub const fn candidate(min: u16, max: u16, preferred: u16, rnd: u32, attempt: u32) -> u16 {
    let span = (max as u32).wrapping_sub(min as u32).wrapping_add(1);
    if attempt == 0 && preferred >= min && preferred <= max {
        return preferred;
    }
    // An odd stride visits different ports on consecutive attempts (and the
    // whole range when its size is a power of two).
    let stride = (rnd >> 16) | 1;
    // checked_rem: a plain `%` carries a divide-by-zero panic path, which
    // the BPF verifier rejects (span is never 0 for a valid range).
    let offset = match rnd
        .wrapping_add(attempt.wrapping_mul(stride))
        .checked_rem(span)
    {
        Some(o) => o,
        None => 0,
    };
    let port = min as u32 + offset;
    if attempt >= MAX_PORT_ATTEMPTS / 2 || span < 2 {
        return port as u16;
    }
    // Same parity as the inside port, staying in range: span >= 2 leaves
    // room on one side or the other.
    let p = (port & !1) | (preferred as u32 & 1);
    let p = if p < min as u32 {
        p + 2
    } else if p > max as u32 {
        p - 2
    } else {
        p
    };
    p as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_candidate_preserves_port_in_range() {
        assert_eq!(candidate(1024, 65535, 40000, 12345, 0), 40000);
    }

    #[test]
    fn port_outside_range_is_not_preserved() {
        let p = candidate(20000, 20099, 53, 7, 0);
        assert!((20000..=20099).contains(&p));
    }

    #[test]
    fn every_candidate_is_within_range() {
        for rnd in [0u32, 1, 0xdead_beef, u32::MAX] {
            for attempt in 0..MAX_PORT_ATTEMPTS {
                for (min, max) in [(1024, 65535), (5000, 5000), (0, 65535), (60000, 60003)] {
                    let p = candidate(min, max, 80, rnd, attempt);
                    assert!(p >= min && p <= max, "{p} outside {min}-{max}");
                }
            }
        }
    }

    #[test]
    fn retries_after_a_collision_pick_different_ports() {
        let mut seen = std::collections::HashSet::new();
        for attempt in 0..MAX_PORT_ATTEMPTS {
            seen.insert(candidate(1024, 65535, 40000, 0x1234_5678, attempt));
        }
        assert_eq!(seen.len(), MAX_PORT_ATTEMPTS as usize);
    }

    #[test]
    fn rfc4787_req4_first_retries_keep_parity() {
        for preferred in [40000u16, 40001] {
            for rnd in [0u32, 7, 0xdead_beef, u32::MAX] {
                for attempt in 1..MAX_PORT_ATTEMPTS / 2 {
                    let p = candidate(1024, 65535, preferred, rnd, attempt);
                    assert_eq!(p & 1, preferred & 1, "attempt {attempt} rnd {rnd:#x}");
                    assert!(p >= 1024);
                }
            }
        }
        // At the edges of the range too.
        for rnd in 0..64 {
            let p = candidate(1024, 1025, 1, rnd, 1);
            assert_eq!(p, 1025);
            let p = candidate(1024, 1025, 2, rnd, 1);
            assert_eq!(p, 1024);
        }
    }

    #[test]
    fn rfc4787_req3a_low_ports_map_below_1024() {
        let main = (1024, 65535);
        let low = (600, 1023);
        assert_eq!(range_for(53, main, low), low);
        assert_eq!(range_for(1023, main, low), low);
        assert_eq!(range_for(1024, main, low), main);
        for attempt in 0..MAX_PORT_ATTEMPTS {
            let (min, max) = range_for(123, main, low);
            let p = candidate(min, max, 123, 0xabcd_ef01, attempt);
            assert!((600..=1023).contains(&p), "{p}");
        }
    }

    #[test]
    fn small_range_is_fully_covered_by_retries() {
        let seen: std::collections::HashSet<u16> = (0..MAX_PORT_ATTEMPTS)
            .map(|a| candidate(7000, 7003, 1, 99, a))
            .collect();
        assert_eq!(seen.len(), 4);
    }
}

//! External port choice.
//!
//! The first candidate is the inside port itself when it is in range (port
//! preservation keeps applications that care about their port working and
//! makes translations easy to read); the rest are spread pseudo-randomly
//! over the range (RFC 6056) so that external ports are hard to predict.

/// How many candidates the fast path tries before giving up on a new flow.
/// Bounded so the verifier can see the loop end and a busy table costs a
/// known amount.
pub const MAX_PORT_ATTEMPTS: u32 = 16;

/// Candidate number `attempt` (0-based) for a flow whose inside port is
/// `preferred` (host order), given a random value `rnd` drawn once per flow.
/// Returns a host-order port within `[min, max]`; `min <= max` is the
/// caller's invariant (the loader validates `--port-range`).
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
    (min as u32 + offset) as u16
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
    fn small_range_is_fully_covered_by_retries() {
        let seen: std::collections::HashSet<u16> = (0..MAX_PORT_ATTEMPTS)
            .map(|a| candidate(7000, 7003, 1, 99, a))
            .collect();
        assert_eq!(seen.len(), 4);
    }
}

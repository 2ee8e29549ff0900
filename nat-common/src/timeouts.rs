//! Idle timeouts of conntrack entries. The user-space sweeper applies them;
//! the values are the RFC-recommended ones (RFC 4787 REQ-5, RFC 5382 REQ-5,
//! RFC 5508 REQ-2, RFC 7857 section 2.2) and can be overridden by flags.

use crate::tcp::{self, Phase};
use crate::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};

const SEC: u64 = 1_000_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub udp_ns: u64,
    pub icmp_ns: u64,
    pub tcp_established_ns: u64,
    pub tcp_transitory_ns: u64,
}

impl Timeouts {
    pub const DEFAULT: Timeouts = Timeouts {
        // RFC 4787 REQ-5: at least 2 minutes, 5 minutes recommended.
        udp_ns: 300 * SEC,
        // RFC 5508 REQ-2: 60 seconds.
        icmp_ns: 60 * SEC,
        // RFC 5382 REQ-5: 2 hours 4 minutes.
        tcp_established_ns: 7440 * SEC,
        // RFC 5382 REQ-5 / RFC 7857: 4 minutes.
        tcp_transitory_ns: 240 * SEC,
    };

    /// The idle timeout of an entry of protocol `proto` in TCP state
    /// `tcp_state` (ignored for other protocols).
    pub const fn for_entry(&self, proto: u8, tcp_state: u8) -> u64 {
        match proto {
            IPPROTO_TCP => match tcp::phase(tcp_state) {
                Phase::Established => self.tcp_established_ns,
                Phase::Opening | Phase::Closing => self.tcp_transitory_ns,
            },
            IPPROTO_UDP => self.udp_ns,
            IPPROTO_ICMP => self.icmp_ns,
            _ => self.icmp_ns,
        }
    }

    /// Whether an entry last seen at `last_seen_ns` has expired at `now_ns`
    /// (both CLOCK_MONOTONIC). An entry stamped in the future (a packet
    /// raced the sweeper's clock read) is alive.
    pub const fn expired(&self, proto: u8, tcp_state: u8, last_seen_ns: u64, now_ns: u64) -> bool {
        now_ns > last_seen_ns && now_ns - last_seen_ns > self.for_entry(proto, tcp_state)
    }

    /// [`Self::expired`] for an entry stamped in ticks ([`crate::ticks`]),
    /// as sessions are.
    pub const fn expired_tick(
        &self,
        proto: u8,
        tcp_state: u8,
        last_seen: u32,
        now_ns: u64,
    ) -> bool {
        match crate::age_ns(last_seen, now_ns) {
            Some(age) => age > self.for_entry(proto, tcp_state),
            None => false,
        }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Self::DEFAULT
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tcp::{DIR_IN, DIR_OUT, TCP_FIN, TCP_SYN, update};

    #[test]
    fn defaults_are_the_rfc_values() {
        let t = Timeouts::DEFAULT;
        assert_eq!(t.udp_ns, 300 * SEC);
        assert_eq!(t.icmp_ns, 60 * SEC);
        assert_eq!(t.tcp_established_ns, (2 * 3600 + 4 * 60) * SEC);
        assert_eq!(t.tcp_transitory_ns, 4 * 60 * SEC);
    }

    #[test]
    fn established_tcp_gets_long_timeout_and_others_transitory() {
        let t = Timeouts::DEFAULT;
        let opening = update(0, DIR_OUT, TCP_SYN);
        let est = update(opening, DIR_IN, TCP_SYN);
        let closing = update(est, DIR_IN, TCP_FIN);
        assert_eq!(t.for_entry(IPPROTO_TCP, est), t.tcp_established_ns);
        assert_eq!(t.for_entry(IPPROTO_TCP, opening), t.tcp_transitory_ns);
        assert_eq!(t.for_entry(IPPROTO_TCP, closing), t.tcp_transitory_ns);
    }

    #[test]
    fn expiry_is_strictly_after_the_timeout() {
        let t = Timeouts::DEFAULT;
        assert!(!t.expired(IPPROTO_UDP, 0, 1000, 1000 + t.udp_ns));
        assert!(t.expired(IPPROTO_UDP, 0, 1000, 1001 + t.udp_ns));
    }

    #[test]
    fn a_session_stamped_in_ticks_expires_a_tick_after_its_timeout() {
        let t = Timeouts::DEFAULT;
        let tick = crate::TICK_NS;
        let now = 1_000_000 * tick;
        let at = now - t.udp_ns;
        // Its tick is at most one tick older than the ns it stands for.
        assert!(!t.expired_tick(IPPROTO_UDP, 0, crate::ticks(at + tick), now));
        assert!(t.expired_tick(IPPROTO_UDP, 0, crate::ticks(at - 2 * tick), now));
        assert!(!t.expired_tick(IPPROTO_UDP, 0, crate::ticks(now + tick), now));
    }

    #[test]
    fn entry_stamped_after_now_is_alive() {
        assert!(!Timeouts::DEFAULT.expired(IPPROTO_ICMP, 0, 5000, 10));
    }
}

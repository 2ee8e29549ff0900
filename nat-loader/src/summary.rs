//! What the sweeper publishes after each pass, below everything that
//! reads it (the metrics, the translation log) and the sweeper itself: the
//! table's summary ([`Summary`], [`Published`]) and the bindings it
//! released and freed ([`SweepRecord`]); and the names both give
//! protocols and session states.

use std::{
    collections::BTreeMap,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use nat_common::{BindKey, BindValue, CtValue, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, tcp};
use prometheus_client::metrics::histogram::Histogram;

/// `tcp`, `udp`, `icmp` (`?` for another number).
pub fn proto_name(proto: u8) -> &'static str {
    match proto {
        IPPROTO_TCP => "tcp",
        IPPROTO_UDP => "udp",
        IPPROTO_ICMP => "icmp",
        _ => "?",
    }
}

/// What the CLI and the metrics call a session's state: TCP's phase
/// (`opening`, `established`, `closing`); for UDP and ICMP whether a
/// reply was seen (`answered`, `unanswered`).
pub fn state(proto: u8, tcp_bits: u8, replied: bool) -> &'static str {
    match (proto, replied) {
        (IPPROTO_TCP, _) => tcp::phase_name(tcp_bits),
        (_, true) => "answered",
        (_, false) => "unanswered",
    }
}

/// Every state [`state`] can give, per protocol.
pub const STATES: [(u8, &[&str]); 3] = [
    (IPPROTO_TCP, &["opening", "established", "closing"]),
    (IPPROTO_UDP, &["answered", "unanswered"]),
    (IPPROTO_ICMP, &["answered", "unanswered"]),
];

/// The table as a pass left it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Sessions by (protocol, [`state`]).
    pub sessions: BTreeMap<(u8, &'static str), u64>,
    /// Bindings by (protocol, external address (network order), external
    /// port below 1024 (`--low-port-range`), held): each holds one
    /// external port of that address.
    pub bindings: BTreeMap<(u8, u32, bool, bool), u64>,
}

impl Summary {
    pub(crate) fn session(&mut self, proto: u8, v: &CtValue) {
        *self
            .sessions
            .entry((proto, state(proto, v.tcp_bits(), v.replied())))
            .or_default() += 1;
    }

    pub(crate) fn binding(&mut self, ek: &BindKey, held: bool) {
        let low = u16::from_be(ek.port) < 1024;
        *self
            .bindings
            .entry((ek.proto, ek.addr, low, held))
            .or_default() += 1;
    }
}

/// What the sweeper tells the metrics: its last pass's summary and
/// running totals since this loader started.
#[derive(Debug)]
pub struct Published {
    pub last: Mutex<Option<Summary>>,
    /// Sessions removed for being idle past their timeout.
    pub expired: AtomicU64,
    /// Sessions evicted under table pressure.
    pub evicted: AtomicU64,
    pub pressed: AtomicBool,
    pub sweep_seconds: Histogram,
}

impl Default for Published {
    fn default() -> Published {
        Published {
            last: Mutex::new(None),
            expired: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            pressed: AtomicBool::new(false),
            // 1 ms .. ~16 s: a pass over 32 k sessions takes about 0.1 s,
            // over a million several seconds.
            sweep_seconds: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 15),
            ),
        }
    }
}

impl Published {
    /// Records a pass.
    pub fn pass(
        &self,
        summary: Summary,
        expired: usize,
        evicted: usize,
        pressed: bool,
        took: Duration,
    ) {
        self.expired.fetch_add(expired as u64, Ordering::Relaxed);
        self.evicted.fetch_add(evicted as u64, Ordering::Relaxed);
        self.pressed.store(pressed, Ordering::Relaxed);
        self.sweep_seconds.observe(took.as_secs_f64());
        if let Ok(mut l) = self.last.lock() {
            *l = Some(summary);
        }
    }
}

/// A binding change the sweeper saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Released,
    Freed,
}

/// What the sweeper sends: the binding by external endpoint, and its
/// inside endpoint.
pub type SweepRecord = (Change, BindKey, BindValue);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_a_session_can_have_is_listed_for_its_protocol() {
        for proto in [IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP] {
            let listed = STATES
                .iter()
                .find(|(p, _)| *p == proto)
                .map(|(_, s)| *s)
                .expect("listed");
            for bits in 0..=u8::MAX {
                for replied in [false, true] {
                    let s = state(proto, bits, replied);
                    assert!(listed.contains(&s), "{} {s}", proto_name(proto));
                }
            }
        }
    }

    #[test]
    fn bindings_are_summed_by_protocol_address_range_and_hold() {
        let mut s = Summary::default();
        s.binding(&BindKey::new(IPPROTO_UDP, 9, 40000u16.to_be()), false);
        s.binding(&BindKey::new(IPPROTO_UDP, 9, 40001u16.to_be()), false);
        s.binding(&BindKey::new(IPPROTO_UDP, 9, 700u16.to_be()), true);
        assert_eq!(s.bindings.get(&(IPPROTO_UDP, 9, false, false)), Some(&2));
        assert_eq!(s.bindings.get(&(IPPROTO_UDP, 9, true, true)), Some(&1));
    }
}

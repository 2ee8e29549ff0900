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
    /// Adds the sessions `tally` counted.
    pub(crate) fn sessions(&mut self, tally: &SessionTally) {
        let tcp = tally.tcp.iter().zip(0..=u8::MAX).map(|(n, bits)| {
            let st = state(IPPROTO_TCP, bits, false);
            ((IPPROTO_TCP, st), *n)
        });
        let other = (tally.other.iter().zip(0..=u8::MAX))
            .filter(|(_, proto)| *proto != IPPROTO_TCP)
            .flat_map(|(by_reply, proto)| {
                [false, true]
                    .into_iter()
                    .map(move |r| ((proto, state(proto, 0, r)), by_reply[r as usize]))
            });
        for (key, n) in tcp.chain(other).filter(|(_, n)| *n > 0) {
            *self.sessions.entry(key).or_default() += n;
        }
    }

    pub(crate) fn binding(&mut self, ek: &BindKey, held: bool) {
        let low = u16::from_be(ek.port) < 1024;
        *self
            .bindings
            .entry((ek.proto, ek.addr, low, held))
            .or_default() += 1;
    }
}

/// Sessions counted by what decides their [`state`] (TCP: the state
/// bits; others: protocol and reply), for [`Summary::sessions`]: a
/// `BTreeMap` update per session costs tens of milliseconds at a million
/// sessions, an array increment next to nothing.
#[derive(Clone)]
pub(crate) struct SessionTally {
    tcp: [u64; 256],
    other: [[u64; 2]; 256],
}

impl Default for SessionTally {
    fn default() -> SessionTally {
        SessionTally {
            tcp: [0; 256],
            other: [[0; 2]; 256],
        }
    }
}

impl SessionTally {
    pub(crate) fn add(&mut self, proto: u8, v: &CtValue) {
        if proto == IPPROTO_TCP {
            self.tcp[v.tcp_bits() as usize] += 1;
        } else {
            self.other[proto as usize][v.replied() as usize] += 1;
        }
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
    fn a_tally_of_sessions_sums_them_by_protocol_and_state() {
        use nat_common::tcp::{DIR_IN, DIR_OUT, TCP_FIN, TCP_SYN, update};
        let syn = update(0, DIR_OUT, TCP_SYN);
        let est = update(syn, DIR_IN, TCP_SYN);
        let closing = update(est, DIR_IN, TCP_FIN);
        let sessions = [
            (IPPROTO_TCP, CtValue::new(0, 1, 0, syn, 0)),
            (
                IPPROTO_TCP,
                CtValue::new(0, 1, 0, est, nat_common::CT_F_REPLIED),
            ),
            (IPPROTO_TCP, CtValue::new(0, 1, 0, est, 0)),
            (IPPROTO_TCP, CtValue::new(0, 1, 0, closing, 0)),
            (
                IPPROTO_UDP,
                CtValue::new(0, 1, 0, 0, nat_common::CT_F_REPLIED),
            ),
            (IPPROTO_UDP, CtValue::new(0, 1, 0, 0, 0)),
            (IPPROTO_UDP, CtValue::new(3, 1, 0, 0, 0)),
            (
                IPPROTO_ICMP,
                CtValue::new(0, 1, 0, 0, nat_common::CT_F_REPLIED),
            ),
            (47, CtValue::new(0, 1, 0, 0, 0)),
        ];
        // What counting one map update per session gives.
        let mut want: BTreeMap<(u8, &'static str), u64> = BTreeMap::new();
        for (proto, v) in &sessions {
            *want
                .entry((*proto, state(*proto, v.tcp_bits(), v.replied())))
                .or_default() += 1;
        }
        let mut tally = SessionTally::default();
        for (proto, v) in &sessions {
            tally.add(*proto, v);
        }
        let mut s = Summary::default();
        s.sessions(&tally);
        assert_eq!(s.sessions, want);
        assert_eq!(s.sessions.get(&(IPPROTO_UDP, "unanswered")), Some(&2));
        assert_eq!(s.sessions.get(&(IPPROTO_TCP, "established")), Some(&2));
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

//! A large conntrack table: the real programs loaded with room for 2^22
//! (4 M) sessions, filled through the maps with a million sessions (a
//! size the suite runs quickly) of 125,000 inside endpoints,
//! a third of them idle past their timeout; one sweeper pass removes
//! exactly those and keeps the rest, bindings included. `nat-sweep-bench`
//! measures the same pass's CPU time.

use std::{collections::HashSet, time::Duration};

use nat_lab::sweep_scale::{PER_ENDPOINT, fill, load, session_number, sessions_left, sweep};
use nat_loader::dataplane::CtMaps;

const SESSIONS: u32 = 1_000_000;
const MAX_FLOWS: u32 = 1 << 22;

fn expired(i: u32) -> bool {
    i.is_multiple_of(3)
}

#[test]
fn a_4m_session_table_loads_and_one_sweep_removes_exactly_the_expired_sessions() {
    let mut ebpf = load(MAX_FLOWS).expect("loading the programs with a 2^22-session table");
    let now = nat_loader::monotonic_ns();
    // Idle longer than any default timeout (TCP established: 7440 s).
    let idle = Duration::from_secs(10_000);
    let bindings = fill(&mut ebpf, SESSIONS, now, idle, expired).expect("filling the table");
    assert_eq!(bindings, SESSIONS / PER_ENDPOINT);
    let mut maps = CtMaps::take(&mut ebpf).expect("the maps");

    let (s, cpu) = sweep(&mut maps, MAX_FLOWS, now).expect("sweeping");
    let gone = (0..SESSIONS).filter(|i| expired(*i)).count();
    assert_eq!(s.expired, gone, "{s:?}");
    assert_eq!(s.remaining, SESSIONS as usize - gone);
    assert_eq!(
        (s.evicted, s.pressed),
        (0, false),
        "no pressure at 2/3 of the table"
    );
    // Every endpoint keeps a live session (8 each, every third expired):
    // no binding is released.
    assert_eq!((s.released, s.freed, s.orphans), (0, 0, 0), "{s:?}");
    let left = sessions_left(&maps).expect("reading the table");
    assert_eq!(left.len(), SESSIONS as usize - gone);
    let kept: HashSet<u32> = left.iter().map(|(k, _)| session_number(k)).collect();
    assert!(
        (0..SESSIONS).all(|i| kept.contains(&i) != expired(i)),
        "a live session was removed or an expired one kept"
    );
    eprintln!("sweep of {SESSIONS} sessions, {gone} removed: {cpu:?} of CPU");
}

//! Table pressure (RFC 6888 / RFC 7857 "out of ports, table full"): under
//! a flood of new flows the unanswered and half-open sessions give way,
//! established ones survive, and new flows work again within seconds of
//! the flood's end.
//!
//! `cargo test --release -p nat-tests --test pressure -- --nocapture`
//! prints the flood rate, the drops, the evictions and the recovery time.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::SocketAddrV4,
    path::Path,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData};
use nat_common::{CT_F_REPLIED, CtKey, CtValue, IPPROTO_TCP, MAP_CT_FWD, tcp};
use nat_lab::{
    Bpffs, CLIENT1_IP, CLIENT2_IP, EchoStreams, Host, Lab, SERVER_IP, flags, flood::syn_flood,
    gateway, lab, recv_all_within,
};

/// Small enough that the flood overflows it many times over.
const MAX_FLOWS: u32 = 32768;
const STREAMS: usize = 100;
const FLOOD: u32 = 300_000;
/// SYNs per second: what the lab's veths carry without dropping.
const FLOOD_RATE: u32 = 100_000;
const ECHO_PORT: u16 = 5400;
/// Flood targets on the server: the first two are silently dropped there
/// (their sessions stay half-open), the others are closed ports (the
/// server answers RST).
const FLOOD_PORTS: [u16; 6] = [7001, 7002, 7003, 7004, 7005, 7006];
/// New connections must work again this soon after the flood ends.
const RECOVERY_LIMIT: Duration = Duration::from_secs(10);

fn raw(a: std::net::Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

fn sessions(pins: &Path) -> Vec<(CtKey, CtValue)> {
    let data = MapData::from_pin(pins.join(MAP_CT_FWD)).expect("opening the pinned CT_FWD");
    let map: HashMap<MapData, CtKey, CtValue> = Map::from_map_data(data)
        .expect("CT_FWD is a map")
        .try_into()
        .expect("CT_FWD is a hash map of sessions");
    map.iter().filter_map(|r| r.ok()).collect()
}

/// The sessions of the echo streams: inside tuple -> external port.
fn stream_sessions(all: &[(CtKey, CtValue)]) -> BTreeMap<(u16, u16), (u16, u8, u8)> {
    all.iter()
        .filter(|(k, _)| {
            k.proto == IPPROTO_TCP
                && k.src_addr == raw(CLIENT1_IP)
                && k.dst_addr == raw(SERVER_IP)
                && u16::from_be(k.dst_port) == ECHO_PORT
        })
        .map(|(k, v)| {
            (
                (u16::from_be(k.src_port), u16::from_be(k.dst_port)),
                (u16::from_be(v.ext_port), v.tcp_state, v.flags),
            )
        })
        .collect()
}

/// One new connection from client1 to the echo server, with one verified
/// round trip.
fn new_connection_works(lab: &Lab, timeout: Duration) -> bool {
    let dst = SocketAddrV4::new(SERVER_IP, ECHO_PORT);
    let Ok(mut s) = lab.tcp_connect(Host::Client1, None, dst, timeout) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let msg = b"a new flow after the flood";
    let mut back = [0u8; 26];
    s.write_all(msg).is_ok() && s.read_exact(&mut back).is_ok() && &back == msg
}

#[test]
fn syn_flood_of_100k_new_tuples_does_not_break_established_connections() {
    let lab = lab();
    let bpffs = Bpffs::new().expect("mounting a bpffs for the pins");
    let pins = bpffs.pin_dir();
    for argv in [
        &["nft", "add", "table", "ip", "flood"][..],
        &[
            "nft",
            "add chain ip flood input { type filter hook input priority 0 ; }",
        ],
        &["nft", "add rule ip flood input tcp dport 7001-7003 drop"],
    ] {
        lab.exec(Host::Server, argv)
            .expect("dropping part of the flood at the server");
    }
    let args = format!(
        "--max-flows {MAX_FLOWS} --sweep-interval 1 --bpffs-dir {}",
        pins.display()
    );
    let mut gw = gateway(&lab, &flags(&args));

    let streams = EchoStreams::start(
        &lab,
        Host::Client1,
        Host::Server,
        SocketAddrV4::new(SERVER_IP, ECHO_PORT),
        STREAMS,
    )
    .expect("opening 100 echo streams through the gateway");
    let before = stream_sessions(&sessions(&pins));
    assert_eq!(before.len(), STREAMS, "one session per stream: {before:?}");
    for (tuple, (_, state, flags)) in &before {
        assert_eq!(
            tcp::phase(*state),
            tcp::Phase::Established,
            "stream {tuple:?}"
        );
        assert_ne!(
            flags & CT_F_REPLIED,
            0,
            "stream {tuple:?} is marked answered"
        );
    }

    let flood = syn_flood(
        &lab,
        Host::Client2,
        CLIENT2_IP,
        SERVER_IP,
        &FLOOD_PORTS,
        FLOOD,
        FLOOD_RATE,
    )
    .expect("flooding from client2");
    let flood_end = Instant::now();
    let during = sessions(&pins);

    // New flows are refused while the flood's entries fill the table; they
    // work again once a pressure sweep has evicted them.
    let mut attempts = 0;
    let recovered = loop {
        attempts += 1;
        if new_connection_works(&lab, Duration::from_millis(500)) {
            break flood_end.elapsed();
        }
        let waited = flood_end.elapsed();
        assert!(
            waited < RECOVERY_LIMIT,
            "no new connection in {waited:?} after the flood ({attempts} attempts); log:\n{}",
            gw.log().join("\n")
        );
    };

    // The streams went on through all of it, byte for byte.
    streams
        .wait_for_round_trips(20, Duration::from_secs(30))
        .expect("every stream keeps exchanging data after the flood");
    let mut after = stream_sessions(&sessions(&pins));
    // The recovery connections to the same port are new sessions.
    after.retain(|tuple, _| before.contains_key(tuple));
    let reports = streams.finish();
    let broken: Vec<_> = reports.iter().filter(|r| r.error.is_some()).collect();
    assert!(broken.is_empty(), "streams broke: {broken:?}");
    assert_eq!(
        after, before,
        "the established sessions kept their entries and external ports"
    );

    let pressure = gw
        .wait_for_log(&["conntrack table under pressure"], Duration::from_secs(5))
        .expect("the sweeper reported the pressure");
    let over = gw
        .wait_for_log(&["conntrack table pressure over"], Duration::from_secs(15))
        .expect("the pressure ended after the flood");
    gw.stop().expect("stopping nat-loader");
    let refused: u64 = ["xdp_int", "tc_int"]
        .iter()
        .map(|h| gw.counter(h, "drop_table_full"))
        .sum();
    let new_flows: u64 = ["xdp_int", "tc_int"]
        .iter()
        .map(|h| gw.counter(h, "event_new_flow"))
        .sum();
    let evicted: u64 = gw
        .log()
        .iter()
        .filter(|l| l.contains("swept conntrack"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|kv| kv.strip_prefix("evicted="))
                .and_then(|n| n.parse::<u64>().ok())
        })
        .sum();
    for line in gw.log().iter().filter(|l| l.contains("swept conntrack")) {
        println!("  {line}");
    }
    let max_gap = reports.iter().map(|r| r.max_gap).max().unwrap_or_default();
    println!(
        "flood: {} SYNs of distinct 5-tuples in {:.2?} ({:.0}/s); table {MAX_FLOWS}, \
         {} sessions right after the flood; refused (drop_table_full) {refused}, \
         new flows {new_flows}, evicted {evicted}; a new connection worked {recovered:.2?} \
         after the flood ({attempts} attempts); {STREAMS} streams unbroken, longest gap \
         between round trips {max_gap:.2?}\n  {pressure}\n  {over}",
        flood.sent,
        flood.elapsed,
        flood.rate(),
        during.len(),
    );
    assert!(
        refused > 0,
        "a flood of {FLOOD} flows into {MAX_FLOWS} must be refused in part"
    );
    assert!(evicted > 0, "the pressure sweeps evicted flood sessions");
    assert!(
        refused + new_flows >= 100_000,
        "at least 100k new 5-tuples reached the gateway ({refused} refused, {new_flows} created)"
    );
    assert!(
        new_flows >= MAX_FLOWS as u64,
        "the flood filled the table at least once ({new_flows} new flows)"
    );
}

/// The source port the server sees for datagrams from `socket` (sent
/// again until one arrives: the first may wait on neighbour resolution).
fn seen_port(server: &std::net::UdpSocket, socket: &std::net::UdpSocket) -> u16 {
    for _ in 0..5 {
        socket
            .send_to(b"one way", SocketAddrV4::new(SERVER_IP, 3478))
            .expect("sending");
        let got = recv_all_within(server, Duration::from_millis(500)).expect("receiving");
        if let Some((from, _)) = got.first() {
            return from.port();
        }
    }
    panic!("nothing reached the server");
}

/// RFC 6888's hold keeps a released port from going to another host while
/// somebody outside may still talk to it. A binding nobody ever answered
/// has nobody to protect, so it is freed at the next sweep instead (that
/// is what lets a flood's bindings go at once). The answered case keeps
/// the hold: conformance.rs `rfc6888_released_port_is_held_...`.
#[test]
fn unanswered_binding_is_freed_without_the_port_hold() {
    let lab = lab();
    let timers = flags("--udp-timeout 1 --sweep-interval 1 --port-hold 120");
    let gw = gateway(&lab, &timers);
    // Receives and never answers.
    let server = lab
        .udp_socket(Host::Server, SocketAddrV4::new(SERVER_IP, 3478))
        .expect("server socket");
    let c1 = lab
        .udp_socket(Host::Client1, SocketAddrV4::new(CLIENT1_IP, 40800))
        .expect("client1 socket");
    assert_eq!(seen_port(&server, &c1), 40800, "port preserved for client1");
    // Expired (1 s idle), released without hold, then freed by the next pass.
    gw.wait_for_log(
        &["swept conntrack", "released_unanswered=1"],
        Duration::from_secs(10),
    )
    .unwrap_or_else(|| panic!("the unanswered binding was not released: {:#?}", gw.log()));
    gw.wait_for_log(&["swept conntrack", "freed=1"], Duration::from_secs(10))
        .unwrap_or_else(|| panic!("the unanswered binding was not freed: {:#?}", gw.log()));
    let c2 = lab
        .udp_socket(Host::Client2, SocketAddrV4::new(CLIENT2_IP, 40800))
        .expect("client2 socket");
    assert_eq!(
        seen_port(&server, &c2),
        40800,
        "the port went to another host without waiting out the 120 s hold"
    );
}

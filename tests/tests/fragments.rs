//! IP fragments through the NAT (RFC 4787 REQ-14, REQ-14a): datagrams
//! fragmented on the way are translated fragment by fragment and arrive
//! whole, byte for byte; the fragment tracking table is a bounded,
//! counted budget. Real packets through the real loader; crafted
//! fragments are sent with raw sockets (IP_HDRINCL) to control their order.

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    time::{Duration, Instant},
};

use nat_lab::{
    CLIENT1_IP, Gateway, Host, Lab, NAT_EXT_IP, SERVER_IP, gateway, lab,
    packet::{echo_message, internet_checksum, udp_segment},
};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const DATAGRAM: usize = 4000;
/// Fragment payload at MTU 1500 with a 20-byte header (a multiple of 8).
const FRAG_PAYLOAD: usize = 1480;

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(31).wrapping_add(seed as u32) as u8)
        .collect()
}

fn socket(lab: &Lab, h: Host, bind: SocketAddrV4) -> UdpSocket {
    let s = lab.udp_socket(h, bind).expect("UDP socket");
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("read timeout");
    s
}

/// Receives one datagram, failing the test with `what` on timeout.
fn recv(s: &UdpSocket, what: &str) -> (Vec<u8>, SocketAddrV4) {
    let mut buf = vec![0u8; 65536];
    let (n, from) = s
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("{what}: nothing received: {e}"));
    buf.truncate(n);
    let from = match from {
        std::net::SocketAddr::V4(a) => a,
        other => panic!("{what}: IPv6 source {other}"),
    };
    (buf, from)
}

/// The IP fragments (header included) of `segment`, in order.
fn fragments(src: Ipv4Addr, dst: Ipv4Addr, id: u16, proto: u8, segment: &[u8]) -> Vec<Vec<u8>> {
    let chunks: Vec<&[u8]> = segment.chunks(FRAG_PAYLOAD).collect();
    let last = chunks.len() - 1;
    chunks
        .iter()
        .enumerate()
        .map(|(i, chunk)| {
            let offset = (i * FRAG_PAYLOAD / 8) as u16;
            let mf = if i < last { 0x2000 } else { 0 };
            let mut p = vec![0x45, 0];
            p.extend_from_slice(&((20 + chunk.len()) as u16).to_be_bytes());
            p.extend_from_slice(&id.to_be_bytes());
            p.extend_from_slice(&(mf | offset).to_be_bytes());
            p.extend_from_slice(&[64, proto, 0, 0]);
            p.extend_from_slice(&src.octets());
            p.extend_from_slice(&dst.octets());
            let c = internet_checksum(&p);
            p[10..12].copy_from_slice(&c.to_be_bytes());
            p.extend_from_slice(chunk);
            p
        })
        .collect()
}

/// The fragments (see [`fragments`]) of a UDP datagram with `payload`
/// from the server's `port` to `external` (a mapping), IP id `id`.
fn inbound_fragments(port: u16, external: SocketAddrV4, id: u16, payload: &[u8]) -> Vec<Vec<u8>> {
    let seg = udp_segment(sa(SERVER_IP, port), external, payload);
    fragments(SERVER_IP, NAT_EXT_IP, id, 17, &seg)
}

/// `frags` in the order of the indexes in `order`.
fn in_order<'a>(frags: &'a [Vec<u8>], order: &[usize]) -> Vec<&'a Vec<u8>> {
    order.iter().map(|&k| &frags[k]).collect()
}

/// A raw IPv4 socket in `h` whose packets carry our own headers.
fn raw_socket(lab: &Lab, h: Host) -> Socket {
    lab.in_ns(h, || {
        // IPPROTO_RAW implies IP_HDRINCL.
        Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(255)))
    })
    .expect("entering the namespace")
    .expect("raw socket (needs root)")
}

fn send_raw(s: &Socket, dst: Ipv4Addr, packets: &[&Vec<u8>]) {
    let to = SockAddr::from(SocketAddrV4::new(dst, 0));
    for p in packets {
        s.send_to(p, &to).expect("sending a raw fragment");
    }
}

/// What the inbound tests begin with: the gateway (started with `extra`)
/// and a UDP mapping, made by client1's `port` saying hello to the
/// server's; a raw socket in the server sends fragments to it.
struct Inbound {
    client: UdpSocket,
    server: UdpSocket,
    /// Client1's external endpoint, as the server learnt it.
    external: SocketAddrV4,
    raw: Socket,
    gw: Gateway,
    _lab: Lab,
}

fn inbound(extra: &[&str], port: u16) -> Inbound {
    let lab = lab();
    let gw = gateway(&lab, extra);
    let client = socket(&lab, Host::Client1, sa(CLIENT1_IP, port));
    let server = socket(&lab, Host::Server, sa(SERVER_IP, port));
    client
        .send_to(b"hello", sa(SERVER_IP, port))
        .expect("client hello");
    let (hello, external) = recv(&server, "hello through the gateway");
    assert_eq!(hello, b"hello");
    assert_eq!(*external.ip(), NAT_EXT_IP, "hello not translated");
    Inbound {
        client,
        server,
        external,
        raw: raw_socket(&lab, Host::Server),
        gw,
        _lab: lab,
    }
}

#[test]
fn rfc4787_req14_fragmented_udp_datagram_is_translated_whole_both_ways() {
    let lab = lab();
    let mut gw = gateway(&lab, &[]);
    let client = socket(&lab, Host::Client1, sa(CLIENT1_IP, 41000));
    let server = socket(&lab, Host::Server, sa(SERVER_IP, 41000));

    // 4000 bytes on 1500-byte links: the client's kernel fragments it.
    let out = pattern(1, DATAGRAM);
    client
        .send_to(&out, sa(SERVER_IP, 41000))
        .expect("client send");
    let (got, from) = recv(&server, "4 KB datagram from client1");
    assert_eq!(*from.ip(), NAT_EXT_IP, "source not translated");
    assert!(
        got == out,
        "outbound datagram differs ({} bytes)",
        got.len()
    );

    // And the reply, fragmented by the server's kernel.
    let back = pattern(2, DATAGRAM);
    server.send_to(&back, from).expect("server send");
    let (got, from_server) = recv(&client, "4 KB reply to client1");
    assert_eq!(from_server, sa(SERVER_IP, 41000));
    assert!(
        got == back,
        "inbound datagram differs ({} bytes)",
        got.len()
    );

    gw.stop().expect("stopping the gateway");
    assert_fragments_forwarded_both_ways(&gw, 1, 2);
    assert!(gw.counter("tc_ext", "event_fragment_tracked") >= 1);
    assert_eq!(gw.counter("tc_int", "drop_fragment"), 0);
}

#[test]
fn rfc4787_req14_outbound_fragments_in_any_order_are_translated_whole() {
    let lab = lab();
    let mut gw = gateway(&lab, &[]);
    let server = socket(&lab, Host::Server, sa(SERVER_IP, 42000));
    let raw = raw_socket(&lab, Host::Client1);
    // Reversed (the first fragment last) and shuffled (first in the middle).
    let orders: [&[usize]; 3] = [&[2, 1, 0], &[1, 0, 2], &[0, 2, 1]];
    for (i, order) in orders.iter().enumerate() {
        let payload = pattern(10 + i as u8, DATAGRAM);
        let src = sa(CLIENT1_IP, 42001 + i as u16);
        let seg = udp_segment(src, sa(SERVER_IP, 42000), &payload);
        let frags = fragments(CLIENT1_IP, SERVER_IP, 0x4200 + i as u16, 17, &seg);
        assert_eq!(frags.len(), 3);
        send_raw(&raw, SERVER_IP, &in_order(&frags, order));
        let (got, from) = recv(&server, &format!("datagram sent in order {order:?}"));
        assert_eq!(
            *from.ip(),
            NAT_EXT_IP,
            "order {order:?}: source not translated"
        );
        assert!(got == payload, "order {order:?}: datagram differs");
    }
    gw.stop().expect("stopping the gateway");
    let log = gw.log().join("\n");
    assert!(
        gw.counter("tc_int", "tc_fragment_first_forwarded") >= 3,
        "{log}"
    );
    assert!(gw.counter("tc_int", "tc_fragment_forwarded") >= 6, "{log}");
}

#[test]
fn rfc4787_req14_inbound_fragments_reordered_after_the_first_are_translated_whole() {
    let mut t = inbound(&[], 43000);
    let payload = pattern(20, DATAGRAM);
    let frags = inbound_fragments(43000, t.external, 0x4300, &payload);
    // First fragment first, the others swapped.
    send_raw(&t.raw, NAT_EXT_IP, &[&frags[0], &frags[2], &frags[1]]);
    let (got, from) = recv(&t.client, "inbound datagram, fragments 0 2 1");
    assert_eq!(from, sa(SERVER_IP, 43000));
    assert!(got == payload, "inbound datagram differs");
    t.gw.stop().expect("stopping the gateway");
    assert_eq!(t.gw.counter("tc_ext", "tc_fragment_first_forwarded"), 1);
    assert_eq!(t.gw.counter("tc_ext", "tc_fragment_forwarded"), 2);
}

/// A fragment ahead of its first fragment cannot be translated yet (the
/// inside address comes from the first fragment's port): it is held and
/// sent once the first fragment has been translated.
#[test]
fn rfc4787_req14_inbound_fragments_ahead_of_their_first_are_held_and_translated_whole() {
    let mut t = inbound(&[], 44000);
    // The first fragment last, and in the middle.
    let orders: [&[usize]; 2] = [&[2, 1, 0], &[1, 0, 2]];
    for (i, order) in orders.iter().enumerate() {
        let payload = pattern(30 + i as u8, DATAGRAM);
        let frags = inbound_fragments(44000, t.external, 0x4400 + i as u16, &payload);
        send_raw(&t.raw, NAT_EXT_IP, &in_order(&frags, order));
        let (got, from) = recv(&t.client, &format!("inbound datagram in order {order:?}"));
        assert_eq!(from, sa(SERVER_IP, 44000));
        assert!(got == payload, "order {order:?}: inbound datagram differs");
    }
    t.gw.stop().expect("stopping the gateway");
    assert_eq!(
        t.gw.counter("tc_ext", "tc_fragment_held"),
        3,
        "{:#?}",
        t.gw.log()
    );
    // Each first fragment and its held ones went round again: one
    // verdict per first fragment, an event per held fragment.
    assert_eq!(t.gw.counter("tc_ext", "tc_fragment_reinjected"), 2);
    assert_eq!(t.gw.counter("tc_ext", "event_held_fragment_reinjected"), 3);
    assert_eq!(t.gw.counter("tc_ext", "tc_fragment_first_forwarded"), 2);
    assert_eq!(t.gw.counter("tc_ext", "tc_fragment_forwarded"), 4);
    assert_eq!(t.gw.counter("tc_ext", "drop_fragment_budget"), 0);
}

#[test]
fn rfc4787_req14a_fragment_budget_is_bounded_and_exhaustion_counted() {
    // 32 datagrams tracked, room for 8 fragments held ahead of their first.
    let mut t = inbound(&["--max-fragments", "32"], 45000);
    // 16 datagrams whose 32 following fragments all come first.
    let n = 16u16;
    let sent: Vec<(Vec<u8>, Vec<Vec<u8>>)> = (0..n)
        .map(|i| {
            let payload = pattern(i as u8, DATAGRAM);
            let frags = inbound_fragments(45000, t.external, 0x4500 + i, &payload);
            (payload, frags)
        })
        .collect();
    let firsts: Vec<&Vec<u8>> = sent.iter().map(|(_, f)| &f[0]).collect();
    let rest: Vec<&Vec<u8>> = sent.iter().flat_map(|(_, f)| &f[1..]).collect();
    send_raw(&t.raw, NAT_EXT_IP, &rest);
    send_raw(&t.raw, NAT_EXT_IP, &firsts);
    t.client
        .set_read_timeout(Some(Duration::from_millis(700)))
        .expect("timeout");
    let mut whole = 0;
    let mut buf = vec![0u8; 65536];
    while let Ok((len, _)) = t.client.recv_from(&mut buf) {
        assert!(
            sent.iter().any(|(p, _)| p[..] == buf[..len]),
            "a delivered datagram must be one of those sent, intact"
        );
        whole += 1;
    }
    assert!(whole < n, "8 held fragments cannot complete {n} datagrams");

    // The budget recovers: the next datagram goes through whole.
    t.client
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let after = pattern(99, DATAGRAM);
    t.server.send_to(&after, t.external).expect("server send");
    let (got, _) = recv(&t.client, "datagram after the budget was exhausted");
    assert!(got == after, "the datagram after the burst differs");

    t.gw.stop().expect("stopping the gateway");
    let held = t.gw.counter("tc_ext", "tc_fragment_held");
    let lost = t.gw.counter("tc_ext", "drop_fragment_budget");
    eprintln!("budget: {whole}/{n} whole, {held} fragments held, {lost} lost to the budget");
    assert_eq!(held, 2 * n as u64, "every early fragment is held");
    assert!(
        lost > 0,
        "fragments forgotten for lack of room must be counted"
    );
}

/// `Ip: ReasmOKs` and `Icmp: InEchos` of `h`'s kernel.
fn reassembled_and_echoes(lab: &Lab, h: Host) -> (u64, u64) {
    let out = lab.exec(h, &["cat", "/proc/net/snmp"]).expect("snmp");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |proto: &str, name: &str| -> u64 {
        let mut lines = text.lines().filter(|l| l.starts_with(proto));
        let names = lines.next().expect("snmp header");
        let values = lines.next().expect("snmp values");
        let i = names
            .split_whitespace()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("no {name} in /proc/net/snmp"));
        values
            .split_whitespace()
            .nth(i)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no value of {name} in /proc/net/snmp"))
    };
    (field("Ip:", "ReasmOKs"), field("Icmp:", "InEchos"))
}

/// `count` pings of 4000 bytes (fragmented on 1500-byte links) from
/// `from` to `dst`, 0.2 s apart: every one must be answered.
fn assert_big_pings_answered(lab: &Lab, from: Host, dst: Ipv4Addr, count: u32) {
    let count = count.to_string();
    let out = lab
        .exec_timeout(
            from,
            &[
                "ping",
                "-n",
                "-q",
                "-c",
                &count,
                "-i",
                "0.2",
                "-s",
                "4000",
                "-W",
                "2",
                &dst.to_string(),
            ],
            Duration::from_secs(10),
        )
        .expect("ping");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("{count} packets transmitted, {count} received")),
        "ping -s 4000 from {from:?} to {dst}: {stdout}"
    );
}

/// The gateway's own fragmented traffic still reaches its kernel whole,
/// in order and not.
#[test]
fn fragmented_pings_of_the_gateway_itself_reach_its_kernel_whole() {
    let lab = lab();
    let mut gw = gateway(&lab, &[]);
    assert_big_pings_answered(&lab, Host::Server, NAT_EXT_IP, 2);
    // An echo request whose fragments come last first.
    let (reasm, echoes) = reassembled_and_echoes(&lab, Host::Nat);
    let icmp = echo_message(8, 0x1234, 1, &pattern(40, DATAGRAM));
    let frags = fragments(SERVER_IP, NAT_EXT_IP, 0x4600, 1, &icmp);
    let raw = raw_socket(&lab, Host::Server);
    send_raw(&raw, NAT_EXT_IP, &[&frags[2], &frags[1], &frags[0]]);
    let deadline = Instant::now() + Duration::from_secs(3);
    while reassembled_and_echoes(&lab, Host::Nat) == (reasm, echoes) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        reassembled_and_echoes(&lab, Host::Nat),
        (reasm + 1, echoes + 1),
        "the gateway's kernel did not get the reversed echo request whole"
    );
    gw.stop().expect("stopping the gateway");
    assert_eq!(gw.counter("tc_ext", "tc_fragment_held"), 2);
}

#[test]
fn rfc5508_fragmented_icmp_echo_is_translated_whole_both_ways() {
    let lab = lab();
    let mut gw = gateway(&lab, &[]);
    assert_big_pings_answered(&lab, Host::Client1, SERVER_IP, 3);
    gw.stop().expect("stopping the gateway");
    assert_fragments_forwarded_both_ways(&gw, 3, 6);
}

/// At most 8 fragments of one datagram are held before its first one; the
/// rest are counted and left to the kernel, which discards them, and the
/// datagram does not reach the inside host incomplete.
#[test]
fn early_fragments_beyond_the_per_datagram_hold_limit_are_counted() {
    let mut t = inbound(&[], 46000);
    // 11 fragments: 10 following ones ahead of the first.
    let payload = pattern(50, 11 * FRAG_PAYLOAD - 8);
    let frags = inbound_fragments(46000, t.external, 0x4700, &payload);
    assert_eq!(frags.len(), 11);
    let reversed: Vec<&Vec<u8>> = frags.iter().rev().collect();
    send_raw(&t.raw, NAT_EXT_IP, &reversed);
    t.client
        .set_read_timeout(Some(Duration::from_millis(700)))
        .expect("timeout");
    let mut buf = vec![0u8; 65536];
    assert!(
        t.client.recv_from(&mut buf).is_err(),
        "an incomplete datagram cannot be delivered"
    );
    t.gw.stop().expect("stopping the gateway");
    assert_eq!(t.gw.counter("tc_ext", "tc_fragment_held"), 8);
    assert_eq!(t.gw.counter("tc_ext", "pass_fragment_untracked"), 2);
    assert_eq!(t.gw.counter("tc_ext", "tc_fragment_forwarded"), 8);
}

/// Both directions (TC at both NICs) forwarded at least `firsts` first
/// fragments and `others` following ones.
fn assert_fragments_forwarded_both_ways(gw: &Gateway, firsts: u64, others: u64) {
    for hook in ["tc_int", "tc_ext"] {
        let first = gw.counter(hook, "tc_fragment_first_forwarded");
        assert!(first >= firsts, "{hook}: {first} first fragments");
        let following = gw.counter(hook, "tc_fragment_forwarded");
        assert!(following >= others, "{hook}: {following} others");
    }
}

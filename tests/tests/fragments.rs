//! IP fragments through the NAT (RFC 4787 REQ-14, REQ-14a): datagrams
//! fragmented on the way are translated fragment by fragment and arrive
//! whole, byte for byte; the fragment tracking table is a bounded,
//! counted budget. Real packets through the real loader; crafted
//! fragments are sent with raw sockets (IP_HDRINCL) to control their order.

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    time::{Duration, Instant},
};

use nat_lab::{CLIENT1_IP, Gateway, Host, Lab, NAT_EXT_IP, SERVER_IP};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const DATAGRAM: usize = 4000;
/// Fragment payload at MTU 1500 with a 20-byte header (a multiple of 8).
const FRAG_PAYLOAD: usize = 1480;

fn gateway(lab: &Lab, extra: &[&str]) -> Gateway {
    let mut args = vec!["--stats-interval", "0"];
    args.extend_from_slice(extra);
    Gateway::start(lab, &args).expect("starting nat-loader")
}

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

fn sum16(data: &[u8], mut acc: u32) -> u32 {
    for pair in data.chunks(2) {
        acc += ((pair[0] as u32) << 8) | pair.get(1).copied().unwrap_or(0) as u32;
    }
    acc
}

fn csum(acc: u32) -> u16 {
    let mut a = acc;
    while a > 0xffff {
        a = (a & 0xffff) + (a >> 16);
    }
    !(a as u16)
}

/// A UDP segment (header + payload) with its checksum.
fn udp_segment(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let len = 8 + payload.len();
    let mut s = Vec::with_capacity(len);
    s.extend_from_slice(&src.port().to_be_bytes());
    s.extend_from_slice(&dst.port().to_be_bytes());
    s.extend_from_slice(&(len as u16).to_be_bytes());
    s.extend_from_slice(&[0, 0]);
    s.extend_from_slice(payload);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.ip().octets());
    pseudo.extend_from_slice(&dst.ip().octets());
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&(len as u16).to_be_bytes());
    let c = csum(sum16(&s, sum16(&pseudo, 0)));
    let c = if c == 0 { 0xffff } else { c };
    s[6..8].copy_from_slice(&c.to_be_bytes());
    s
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
            let c = csum(sum16(&p, 0));
            p[10..12].copy_from_slice(&c.to_be_bytes());
            p.extend_from_slice(chunk);
            p
        })
        .collect()
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

/// Client1 binds a port and says hello to the server, which learns the
/// client's external endpoint.
fn open_mapping(lab: &Lab, port: u16) -> (UdpSocket, UdpSocket, SocketAddrV4) {
    let client = socket(lab, Host::Client1, sa(CLIENT1_IP, port));
    let server = socket(lab, Host::Server, sa(SERVER_IP, port));
    client
        .send_to(b"hello", sa(SERVER_IP, port))
        .expect("client hello");
    let (hello, external) = recv(&server, "hello through the gateway");
    assert_eq!(hello, b"hello");
    assert_eq!(*external.ip(), NAT_EXT_IP, "hello not translated");
    (client, server, external)
}

#[test]
fn rfc4787_req14_fragmented_udp_datagram_is_translated_whole_both_ways() {
    let lab = Lab::new().expect("lab");
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
    for hook in ["tc_int", "tc_ext"] {
        assert!(
            gw.counter(hook, "tc_fragment_first_forwarded") >= 1,
            "{hook}"
        );
        assert!(gw.counter(hook, "tc_fragment_forwarded") >= 2, "{hook}");
    }
    assert!(gw.counter("tc_ext", "event_fragment_tracked") >= 1);
    assert_eq!(gw.counter("tc_int", "drop_fragment"), 0);
}

#[test]
fn rfc4787_req14_outbound_fragments_in_any_order_are_translated_whole() {
    let lab = Lab::new().expect("lab");
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
        let ordered: Vec<&Vec<u8>> = order.iter().map(|&k| &frags[k]).collect();
        send_raw(&raw, SERVER_IP, &ordered);
        let (got, from) = recv(&server, &format!("datagram sent in order {order:?}"));
        assert_eq!(
            *from.ip(),
            NAT_EXT_IP,
            "order {order:?}: source not translated"
        );
        assert!(got == payload, "order {order:?}: datagram differs");
    }
    gw.stop().expect("stopping the gateway");
    assert!(gw.counter("tc_int", "tc_fragment_first_forwarded") >= 3);
    assert!(gw.counter("tc_int", "tc_fragment_forwarded") >= 6);
}

#[test]
fn rfc4787_req14_inbound_fragments_reordered_after_the_first_are_translated_whole() {
    let lab = Lab::new().expect("lab");
    let mut gw = gateway(&lab, &[]);
    let (client, _server, external) = open_mapping(&lab, 43000);
    let raw = raw_socket(&lab, Host::Server);
    let payload = pattern(20, DATAGRAM);
    let seg = udp_segment(sa(SERVER_IP, 43000), external, &payload);
    let frags = fragments(SERVER_IP, NAT_EXT_IP, 0x4300, 17, &seg);
    // First fragment first, the others swapped.
    send_raw(&raw, NAT_EXT_IP, &[&frags[0], &frags[2], &frags[1]]);
    let (got, from) = recv(&client, "inbound datagram, fragments 0 2 1");
    assert_eq!(from, sa(SERVER_IP, 43000));
    assert!(got == payload, "inbound datagram differs");
    gw.stop().expect("stopping the gateway");
    assert_eq!(gw.counter("tc_ext", "tc_fragment_first_forwarded"), 1);
    assert_eq!(gw.counter("tc_ext", "tc_fragment_forwarded"), 2);
}

/// The known limit: the inside address of an inbound datagram is only
/// known from its first fragment, and a program cannot hold packets, so
/// fragments ahead of it are not translated. They are counted and left to
/// the kernel (which discards them); nothing reaches the inside.
#[test]
fn inbound_fragments_ahead_of_their_first_are_counted_and_not_delivered() {
    let lab = Lab::new().expect("lab");
    let mut gw = gateway(&lab, &[]);
    let (client, _server, external) = open_mapping(&lab, 44000);
    let raw = raw_socket(&lab, Host::Server);
    let payload = pattern(30, DATAGRAM);
    let seg = udp_segment(sa(SERVER_IP, 44000), external, &payload);
    let frags = fragments(SERVER_IP, NAT_EXT_IP, 0x4400, 17, &seg);
    send_raw(&raw, NAT_EXT_IP, &[&frags[2], &frags[1], &frags[0]]);
    client
        .set_read_timeout(Some(Duration::from_millis(700)))
        .expect("timeout");
    let mut buf = vec![0u8; 65536];
    assert!(
        client.recv_from(&mut buf).is_err(),
        "an incomplete datagram cannot be delivered"
    );
    gw.stop().expect("stopping the gateway");
    assert_eq!(gw.counter("tc_ext", "pass_fragment_untracked"), 2);
    assert_eq!(gw.counter("tc_ext", "tc_fragment_first_forwarded"), 1);
}

#[test]
fn rfc4787_req14a_fragment_budget_is_bounded_and_exhaustion_counted() {
    let lab = Lab::new().expect("lab");
    let mut gw = gateway(&lab, &["--max-fragments", "4"]);
    let (client, server, external) = open_mapping(&lab, 45000);
    let raw = raw_socket(&lab, Host::Server);
    // 64 datagrams in flight at once: all first fragments, then the rest.
    let n = 64u16;
    let sent: Vec<(Vec<u8>, Vec<Vec<u8>>)> = (0..n)
        .map(|i| {
            let payload = pattern(i as u8, DATAGRAM);
            let seg = udp_segment(sa(SERVER_IP, 45000), external, &payload);
            let frags = fragments(SERVER_IP, NAT_EXT_IP, 0x4500 + i, 17, &seg);
            (payload, frags)
        })
        .collect();
    let firsts: Vec<&Vec<u8>> = sent.iter().map(|(_, f)| &f[0]).collect();
    let rest: Vec<&Vec<u8>> = sent.iter().flat_map(|(_, f)| &f[1..]).collect();
    send_raw(&raw, NAT_EXT_IP, &firsts);
    send_raw(&raw, NAT_EXT_IP, &rest);
    client
        .set_read_timeout(Some(Duration::from_millis(700)))
        .expect("timeout");
    let mut whole = 0;
    let mut buf = vec![0u8; 65536];
    while let Ok((len, _)) = client.recv_from(&mut buf) {
        assert!(
            sent.iter().any(|(p, _)| p[..] == buf[..len]),
            "a delivered datagram must be one of those sent, intact"
        );
        whole += 1;
    }
    assert!(whole < n, "a 4-datagram budget cannot carry {n} at once");

    // The budget recovers: the next datagram goes through whole.
    client
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let after = pattern(99, DATAGRAM);
    server.send_to(&after, external).expect("server send");
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut recovered = false;
    while Instant::now() < deadline {
        let (got, _) = recv(&client, "datagram after the budget was exhausted");
        if got == after {
            recovered = true;
            break;
        }
    }
    assert!(
        recovered,
        "the datagram after the burst did not arrive whole"
    );

    gw.stop().expect("stopping the gateway");
    let untracked = gw.counter("tc_ext", "pass_fragment_untracked");
    let forwarded = gw.counter("tc_ext", "tc_fragment_forwarded");
    eprintln!(
        "budget 4: {whole}/{n} whole, {forwarded} following fragments translated, {untracked} untracked"
    );
    assert!(
        untracked > 0,
        "evicted datagrams' fragments must be counted"
    );
    assert_eq!(
        untracked + forwarded,
        2 * n as u64 + 2,
        "every following fragment is either translated or counted"
    );
}

#[test]
fn rfc5508_fragmented_icmp_echo_is_translated_whole_both_ways() {
    let lab = Lab::new().expect("lab");
    let mut gw = gateway(&lab, &[]);
    let out = lab
        .exec_timeout(
            Host::Client1,
            &[
                "ping",
                "-n",
                "-q",
                "-c",
                "3",
                "-i",
                "0.2",
                "-s",
                "4000",
                "-W",
                "2",
                &SERVER_IP.to_string(),
            ],
            Duration::from_secs(10),
        )
        .expect("ping");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("3 packets transmitted, 3 received"),
        "ping -s 4000 through the gateway: {stdout}"
    );
    gw.stop().expect("stopping the gateway");
    for hook in ["tc_int", "tc_ext"] {
        assert!(
            gw.counter(hook, "tc_fragment_first_forwarded") >= 3,
            "{hook}"
        );
        assert!(gw.counter(hook, "tc_fragment_forwarded") >= 6, "{hook}");
    }
}

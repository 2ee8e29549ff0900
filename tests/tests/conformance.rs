//! NAT behaviour as RFC 4787 (UDP), RFC 5382 (TCP), RFC 5508 (ICMP) and RFC
//! 6888/7857 require, one test per requirement, with real traffic through
//! the real loader. docs/conformance.md maps each requirement to its test.
//!
//! The lab's server namespace gets a second address (`SERVER2_IP`) so that
//! one inside endpoint can talk to two "STUN servers" and the tests can
//! tell address-dependent behaviour from port-dependent behaviour.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use nat_lab::{
    CLIENT1_IP, CLIENT2_IP, Gateway, HOST_IF, Host, Lab, LabOptions, NAT_EXT_IP, PeerNapi,
    SERVER_IP, flags, gateway, lab_with,
    packet::{echo_message, internet_checksum, ip_l4_checksum},
    ping, recv_all_within,
};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const SERVER2_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);

/// Where the UDP tests' STUN-like mirror ([`UdpMirror`]) listens.
const STUN: SocketAddrV4 = SocketAddrV4::new(SERVER_IP, 3478);

/// What every test begins with: the lab, its server with a second address
/// ([`SERVER2_IP`]), and the gateway started with `extra`.
fn nat(extra: &[&str]) -> (Lab, Gateway) {
    nat_after(|_| {}, extra)
}

/// [`nat`], with `prepare` run on the lab before the gateway starts.
fn nat_after(prepare: impl FnOnce(&Lab), extra: &[&str]) -> (Lab, Gateway) {
    nat_lab_with(LabOptions::default(), prepare, extra)
}

/// [`nat_after`] in a lab built with `options`.
fn nat_lab_with(options: LabOptions, prepare: impl FnOnce(&Lab), extra: &[&str]) -> (Lab, Gateway) {
    let lab = lab_with(options);
    let server2 = format!("{SERVER2_IP}/24");
    lab.namespaces()
        .addr(Host::Server.role(), HOST_IF, &server2)
        .expect("second server address");
    prepare(&lab);
    let gw = gateway(&lab, extra);
    (lab, gw)
}

/// [`nat`] with a mirror at [`STUN`]: what the UDP mapping tests begin with.
fn stun(extra: &[&str]) -> (Lab, Gateway, UdpMirror) {
    let (lab, gw) = nat(extra);
    let mirror = UdpMirror::start(&lab, STUN);
    (lab, gw, mirror)
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

fn client_ip(h: Host) -> Ipv4Addr {
    match h {
        Host::Client1 => CLIENT1_IP,
        Host::Client2 => CLIENT2_IP,
        other => panic!("{other} is not a client"),
    }
}

/// A TCP connection from client `h`'s `port` (0: any) to `dst`, given up
/// after 3 s.
fn client_tcp(lab: &Lab, h: Host, port: u16, dst: SocketAddrV4) -> anyhow::Result<TcpStream> {
    let src = sa(client_ip(h), port);
    lab.tcp_connect(h, Some(src), dst, Duration::from_secs(3))
}

/// The next `n` bytes `s` receives, within 3 s.
fn receive(s: &mut TcpStream, n: usize) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).expect("read");
    buf
}

/// A UDP socket of client `h`, bound to the client's address and `port`.
fn client_udp(lab: &Lab, h: Host, port: u16) -> UdpSocket {
    lab.udp_socket(h, sa(client_ip(h), port))
        .expect("client socket")
}

/// [`client_udp`], and its mapping as the mirror at [`STUN`] reports it.
fn mapped(lab: &Lab, h: Host, port: u16) -> (UdpSocket, SocketAddrV4) {
    let socket = client_udp(lab, h, port);
    let mapping = udp_mapping(&socket, STUN);
    (socket, mapping)
}

/// A STUN-like UDP responder: answers every datagram with the source
/// address it saw, until dropped.
struct UdpMirror {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpMirror {
    fn start(lab: &Lab, bind: SocketAddrV4) -> UdpMirror {
        let socket = lab.udp_socket(Host::Server, bind).expect("mirror socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((_, from)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(from.to_string().as_bytes(), from);
                }
            }
        });
        UdpMirror {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for UdpMirror {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends a probe from `socket` to `server` and returns the source address
/// the server saw (its answer).
fn udp_mapping(socket: &UdpSocket, server: SocketAddrV4) -> SocketAddrV4 {
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let mut buf = [0u8; 256];
    for _ in 0..6 {
        socket.send_to(b"probe", server).expect("send probe");
        // A late answer to an earlier probe (of this or another call) is
        // skipped.
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            if from == SocketAddr::V4(server) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                return text
                    .parse()
                    .unwrap_or_else(|_| panic!("mirror said {text:?}"));
            }
        }
    }
    panic!("no answer from {server}");
}

/// The external endpoint of client `h`'s TCP port `port`, as a one-shot
/// mirror at `server` (in the server namespace) saw the connection come.
fn tcp_mapping(lab: &Lab, h: Host, port: u16, server: SocketAddrV4) -> SocketAddrV4 {
    let listener = lab.tcp_listener(Host::Server, server).expect("listener");
    let mirror = std::thread::spawn(move || {
        if let Ok((mut s, peer)) = listener.accept() {
            let _ = s.write_all(peer.to_string().as_bytes());
        }
    });
    let mut s = client_tcp(lab, h, port, server).expect("connect through the gateway");
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read mapping");
    mirror.join().expect("mirror");
    text.parse()
        .unwrap_or_else(|_| panic!("mirror said {text:?}"))
}

/// Raw ICMP echo request with identifier `id` from `from` to `dst`.
fn icmp_echo(lab: &Lab, from: Host, dst: Ipv4Addr, id: u16) {
    let socket = raw_icmp_socket(lab, from);
    let msg = echo_message(8, id, 1, b"conformance");
    socket
        .send_to(&msg, &SockAddr::from(sa(dst, 0)))
        .expect("send echo");
}

/// Identifiers of the echo requests arriving at `dst` (a raw socket in the
/// server namespace) within `within`.
fn echo_ids_seen(lab: &Lab, dst: Ipv4Addr, within: Duration, send: impl FnOnce()) -> Vec<u16> {
    let socket = raw_icmp_socket(lab, Host::Server);
    let socket: UdpSocket = socket.into();
    send();
    let mut ids = Vec::new();
    receive_raw(&socket, within, |p| {
        let ihl = usize::from(p[0] & 0x0f) * 4;
        if p.len() >= ihl + 8 && p[ihl] == 8 && ip_at(p, 16) == dst {
            ids.push(be16(p, ihl + 4));
        }
        None::<()>
    });
    ids
}

#[test]
fn rfc4787_req1_endpoint_independent_mapping_udp() {
    let (lab, _gw, _m1) = stun(&[]);
    let _m2 = UdpMirror::start(&lab, sa(SERVER2_IP, 3479));
    let (socket, a) = mapped(&lab, Host::Client1, 40000);
    let b = udp_mapping(&socket, sa(SERVER2_IP, 3479));
    assert_eq!(*a.ip(), NAT_EXT_IP, "translated to the SNAT address");
    assert_eq!(a, b, "one external endpoint whatever the remote");
    assert_eq!(a.port(), 40000, "port preserved while free");
}

#[test]
fn rfc5382_req1_endpoint_independent_mapping_tcp() {
    let (lab, _gw) = nat(&[]);
    let a = tcp_mapping(&lab, Host::Client1, 40100, sa(SERVER_IP, 7001));
    let b = tcp_mapping(&lab, Host::Client1, 40100, sa(SERVER2_IP, 7002));
    assert_eq!(*a.ip(), NAT_EXT_IP);
    assert_eq!(a, b, "one external endpoint whatever the remote");
}

#[test]
fn rfc5508_req1a_icmp_query_identifier_is_mapped_endpoint_independently() {
    let (lab, _gw) = nat(&[]);
    // The identifiers arriving at `dst` for an echo with 0x4242 from `from`.
    let seen = |from: Host, dst: Ipv4Addr| {
        let within = Duration::from_millis(2500);
        echo_ids_seen(&lab, dst, within, || icmp_echo(&lab, from, dst, 0x4242))
    };
    let to1 = seen(Host::Client1, SERVER_IP);
    let to2 = seen(Host::Client1, SERVER2_IP);
    // Client2's echo with the same identifier must get another one.
    let other = seen(Host::Client2, SERVER_IP);
    assert_eq!(to1.len(), 1, "{to1:?}");
    assert_eq!(to1, to2, "one external identifier whatever the remote");
    assert_eq!(to1[0], 0x4242, "identifier preserved while free");
    assert_eq!(other.len(), 1, "{other:?}");
    assert_ne!(other[0], 0x4242, "no identifier overloading");
}

#[test]
fn rfc4787_req3_no_port_overloading_across_inside_hosts() {
    let (lab, _gw, _m) = stun(&[]);
    let (_c1, a) = mapped(&lab, Host::Client1, 40200);
    let (_c2, b) = mapped(&lab, Host::Client2, 40200);
    assert_eq!(a.port(), 40200);
    assert_ne!(a, b, "two inside endpoints never share an external one");
}

#[test]
fn rfc4787_req3a_ports_below_1024_map_below_1024() {
    let (lab, _gw, _m) = stun(&[]);
    // 500 is outside the default low range (600-1023), so it cannot be
    // preserved; 700 can.
    for (port, preserved) in [(500u16, false), (700, true)] {
        let (_s, m) = mapped(&lab, Host::Client1, port);
        assert!(
            (600..1024).contains(&m.port()),
            "inside port {port} mapped to {m}"
        );
        assert_eq!(m.port() == port, preserved, "{port} -> {m}");
    }
    let (_s, m) = mapped(&lab, Host::Client1, 2000);
    assert!(m.port() >= 1024, "inside port 2000 mapped to {m}");
}

#[test]
fn rfc4787_req4_port_parity_is_preserved() {
    let (lab, _gw, _m) = stun(&[]);
    // Client2 takes each port first, so client1's mapping is a retry.
    let mut sockets = Vec::new();
    for port in 41000u16..41010 {
        let (c2, m2) = mapped(&lab, Host::Client2, port);
        assert_eq!(
            m2.port(),
            port,
            "client2's {port} not preserved; client1's mappings so far: {:?}",
            sockets
                .iter()
                .map(|(_, m): &(_, SocketAddrV4)| *m)
                .collect::<Vec<_>>()
        );
        let (c1, m) = mapped(&lab, Host::Client1, port);
        assert_ne!(m.port(), port);
        assert_eq!(m.port() % 2, port % 2, "{port} -> {m}: parity lost");
        sockets.push(((c1, c2), m));
    }
}

/// Client1 sends from 40300 to the server's 3478; then three remotes send
/// to the mapping: that same endpoint, the same address from another port,
/// another address. Returns which of the three arrived, and the packets
/// the gateway counted as filtered.
fn filtering_outcome(extra: &[&str]) -> ([bool; 3], u64) {
    let (lab, mut gw) = nat(extra);
    let (server, c, mapping) = udp_session(&lab, 3478, 40300);
    let remotes = [
        sa(SERVER_IP, 3478),
        sa(SERVER_IP, 3480),
        sa(SERVER2_IP, 3478),
    ];
    server.send_to(b"from-0", mapping).expect("send");
    for (i, src) in remotes.iter().enumerate().skip(1) {
        let s = lab.udp_socket(Host::Server, *src).expect("sender");
        s.send_to(format!("from-{i}").as_bytes(), mapping)
            .expect("send");
    }
    let got = recv_all_within(&c, Duration::from_millis(800)).expect("recv");
    gw.stop().expect("stop");
    let arrived =
        |remote: SocketAddrV4| got.iter().any(|(from, _)| *from == SocketAddr::V4(remote));
    (
        remotes.map(arrived),
        gw.counter("xdp_ext", "drop_filtered") + gw.counter("tc_ext", "drop_filtered"),
    )
}

#[test]
fn rfc4787_req8_address_and_port_dependent_filtering_is_the_default() {
    let (arrived, filtered) = filtering_outcome(&[]);
    assert_eq!(arrived, [true, false, false]);
    assert_eq!(filtered, 2, "both refused packets are counted");
}

#[test]
fn rfc4787_req8_address_dependent_filtering_when_configured() {
    let (arrived, filtered) = filtering_outcome(&["--filtering", "address-dependent"]);
    assert_eq!(arrived, [true, true, false]);
    assert_eq!(filtered, 1);
}

#[test]
fn rfc4787_req8_endpoint_independent_filtering_when_configured() {
    let (arrived, filtered) = filtering_outcome(&["--filtering", "endpoint-independent"]);
    assert_eq!(arrived, [true, true, true]);
    assert_eq!(filtered, 0);
}

/// After one outbound probe from client1, the server pushes a datagram to
/// it every 200 ms for 5 s (inbound only). Returns how many arrived.
fn inbound_only_arrivals(extra: &[&str]) -> usize {
    let mut args = vec!["--udp-timeout", "2", "--sweep-interval", "1"];
    args.extend_from_slice(extra);
    let (lab, _gw) = nat(&args);
    let (server, c, mapping) = udp_session(&lab, 3490, 40400);
    let pusher = std::thread::spawn(move || {
        for i in 0..25 {
            let _ = server.send_to(format!("push {i}").as_bytes(), mapping);
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let got = recv_all_within(&c, Duration::from_millis(5400)).expect("recv");
    pusher.join().expect("pusher");
    got.len()
}

#[test]
fn rfc4787_req6_only_outbound_traffic_refreshes_a_udp_mapping_by_default() {
    let arrived = inbound_only_arrivals(&[]);
    // The session expires 2 s (+ up to one sweep) after the probe: the
    // pushes of the last 2 s or more are refused.
    assert!(
        (5..=17).contains(&arrived),
        "{arrived} of 25 inbound-only datagrams arrived"
    );
}

#[test]
fn rfc4787_req6_inbound_refresh_when_configured() {
    assert_eq!(inbound_only_arrivals(&["--udp-inbound-refresh"]), 25);
}

#[test]
fn rfc5382_req4_unsolicited_syn_to_a_bound_port_is_silently_dropped() {
    let (lab, mut gw) = nat(&[]);
    // Client1's TCP endpoint 40500 gets a binding by talking to port 7003.
    let m = tcp_mapping(&lab, Host::Client1, 40500, sa(SERVER_IP, 7003));
    // A SYN from another server port is not answered at all: no RST, so
    // the connect neither succeeds nor is refused for 6 s.
    let started = Instant::now();
    let r = lab.tcp_connect(
        Host::Server,
        Some(sa(SERVER_IP, 7004)),
        m,
        Duration::from_secs(6),
    );
    let err = r.expect_err("an unsolicited SYN must not get in");
    let msg = format!("{err:#}");
    assert!(
        started.elapsed() >= Duration::from_secs(6) && msg.contains("timed out"),
        "answered after {:?}: {msg}",
        started.elapsed()
    );
    gw.stop().expect("stop");
    assert!(gw.counter("xdp_ext", "drop_filtered") + gw.counter("tc_ext", "drop_filtered") >= 1);
}

#[test]
fn rfc5382_req2_tcp_simultaneous_open_works() {
    let (lab, _gw) = nat(&[]);
    // A binding for 40600, as a rendezvous server would see it.
    let m = tcp_mapping(&lab, Host::Client1, 40600, sa(SERVER_IP, 7005));
    // The server connects to the mapping first (its SYN is held back
    // silently), then the client connects to the server from 40600: the
    // SYNs cross and both ends open.
    let remote = sa(SERVER_IP, 7006);
    let lab_ref = &lab;
    let (server_side, client_side) = std::thread::scope(|s| {
        let srv = s.spawn(move || {
            lab_ref.tcp_connect(Host::Server, Some(remote), m, Duration::from_secs(8))
        });
        std::thread::sleep(Duration::from_millis(300));
        let cli = lab_ref.tcp_connect(
            Host::Client1,
            Some(sa(CLIENT1_IP, 40600)),
            remote,
            Duration::from_secs(8),
        );
        (srv.join().expect("server thread"), cli)
    });
    let mut srv: TcpStream = server_side.expect("server side opens");
    let mut cli: TcpStream = client_side.expect("client side opens");
    cli.write_all(b"hello across").expect("write");
    assert_eq!(receive(&mut srv, 12), b"hello across");
}

#[test]
fn rfc6888_released_port_is_held_for_its_endpoint_then_freed() {
    let hold = flags("--udp-timeout 2 --sweep-interval 1 --port-hold 6");
    let (lab, _gw, _m) = stun(&hold);
    // Neighbours resolved first, so the session's first answer is not late
    // (a late answer can miss a session that just expired).
    let _warm = mapped(&lab, Host::Client1, 40799);
    let (c1, m1) = mapped(&lab, Host::Client1, 40700);
    assert_eq!(m1.port(), 40700);
    // Idle: the session expires (2 s, seen by a sweep within 1 s more) and
    // the port is held for 6 s from then.
    std::thread::sleep(Duration::from_secs(4));
    let (c2, during_hold) = mapped(&lab, Host::Client2, 40700);
    assert_ne!(during_hold.port(), 40700, "held port went to another host");
    // The old endpoint takes its port back.
    assert_eq!(udp_mapping(&c1, STUN).port(), 40700);
    drop(c2);
    // Once client1 is idle past timeout + hold, the port is free for others.
    std::thread::sleep(Duration::from_secs(10));
    let (_c2, after_hold) = mapped(&lab, Host::Client2, 40700);
    assert_eq!(after_hold.port(), 40700);
}

// ---- ICMP errors (RFC 5508 REQ-3..6, RFC 5382 REQ-9, RFC 4787 REQ-12) ----

fn raw_icmp(lab: &Lab, h: Host) -> UdpSocket {
    raw_icmp_socket(lab, h).into()
}

/// The first ICMP error (type 3/11/12) `socket` receives within `within`,
/// as the whole IP packet.
fn next_icmp_error(socket: &UdpSocket, within: Duration) -> Option<Vec<u8>> {
    receive_raw(socket, within, |p| {
        let ihl = usize::from(p[0] & 0x0f) * 4;
        (p.len() > ihl && matches!(p[ihl], 3 | 11 | 12)).then(|| p.to_vec())
    })
}

/// Hands `each` every packet (the whole IP packet) the raw `socket`
/// receives within `within`, until it returns something.
fn receive_raw<T>(
    socket: &UdpSocket,
    within: Duration,
    mut each: impl FnMut(&[u8]) -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        if let Ok(n) = socket.recv(&mut buf)
            && let Some(t) = each(&buf[..n])
        {
            return Some(t);
        }
    }
    None
}

fn ip_at(b: &[u8], off: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[off], b[off + 1], b[off + 2], b[off + 3])
}

fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

/// Checks an ICMP error packet as an inside host receives it: addressed to
/// `inside`, quoting `inside:port -> remote`, every checksum right (the
/// quoted L4 one too, when the whole datagram is quoted).
fn assert_error_restored(pkt: &[u8], inside: Ipv4Addr, port: u16, remote: Ipv4Addr, proto: u8) {
    let ihl = usize::from(pkt[0] & 0x0f) * 4;
    assert_eq!(ip_at(pkt, 16), inside, "outer destination");
    assert_eq!(internet_checksum(&pkt[..ihl]), 0, "outer IP checksum");
    let icmp = &pkt[ihl..];
    assert_eq!(internet_checksum(icmp), 0, "ICMP checksum");
    let q = &icmp[8..];
    let qihl = usize::from(q[0] & 0x0f) * 4;
    assert_eq!(ip_at(q, 12), inside, "quoted source restored");
    assert_eq!(ip_at(q, 16), remote, "quoted destination kept");
    assert_eq!(internet_checksum(&q[..qihl]), 0, "quoted IP checksum");
    assert_eq!(q[9], proto);
    let l4 = &q[qihl..];
    let quoted_port = if proto == 1 { be16(l4, 4) } else { be16(l4, 0) };
    assert_eq!(quoted_port, port, "quoted port restored");
    let tot = usize::from(be16(q, 2));
    let udp_without_checksum = proto == 17 && be16(l4, 6) == 0;
    if q.len() >= tot && proto != 1 && !udp_without_checksum {
        // The whole datagram is quoted: its L4 checksum must verify.
        assert_eq!(ip_l4_checksum(q), 0, "quoted L4 checksum");
    } else if proto == 1 {
        assert_eq!(
            internet_checksum(&q[qihl..tot.min(q.len())]),
            0,
            "quoted echo checksum"
        );
    }
}

fn set_ttl(socket: &Socket, ttl: u32) {
    socket.set_ttl_v4(ttl).expect("IP_TTL");
}

#[test]
fn rfc5508_req3_time_exceeded_quote_is_restored_for_udp_tcp_and_echo() {
    // Checksums complete on the wire (as from a real NIC), so the quote
    // carries a full L4 checksum to verify rather than a partial one.
    let tx_off = |lab: &Lab| {
        lab.ethtool(Host::Client1, HOST_IF, &["tx", "off"])
            .expect("ethtool")
    };
    let (lab, mut gw) = nat_after(tx_off, &[]);
    let errors = raw_icmp(&lab, Host::Client1);
    // UDP, TTL 2: expires at the router, one hop past the gateway.
    let udp = lab
        .in_ns(Host::Client1, || {
            let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
            s.bind(&SockAddr::from(sa(CLIENT1_IP, 40800)))?;
            Ok::<_, std::io::Error>(s)
        })
        .expect("ns")
        .expect("udp socket");
    set_ttl(&udp, 2);
    udp.send_to(&[7u8; 100], &SockAddr::from(sa(SERVER_IP, 5555)))
        .expect("send");
    let e = next_icmp_error(&errors, Duration::from_secs(3)).expect("Time Exceeded for UDP");
    assert_eq!(e[20], 11, "Time Exceeded");
    assert_eq!(
        ip_at(&e, 12),
        Ipv4Addr::new(192, 0, 2, 1),
        "from the router"
    );
    assert_error_restored(&e, CLIENT1_IP, 40800, SERVER_IP, 17);

    // TCP SYN, TTL 2.
    let tcp = lab
        .in_ns(Host::Client1, || {
            let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
            s.bind(&SockAddr::from(sa(CLIENT1_IP, 40801)))?;
            s.set_nonblocking(true)?;
            Ok::<_, std::io::Error>(s)
        })
        .expect("ns")
        .expect("tcp socket");
    set_ttl(&tcp, 2);
    let _ = tcp.connect(&SockAddr::from(sa(SERVER_IP, 5556)));
    let e = next_icmp_error(&errors, Duration::from_secs(3)).expect("Time Exceeded for TCP");
    assert_error_restored(&e, CLIENT1_IP, 40801, SERVER_IP, 6);

    // ICMP echo, TTL 2.
    let echo = raw_icmp_socket(&lab, Host::Client1);
    set_ttl(&echo, 2);
    let msg = echo_message(8, 0x5151, 1, b"ttl two");
    echo.send_to(&msg, &SockAddr::from(sa(SERVER_IP, 0)))
        .expect("send echo");
    let e = loop {
        let e = next_icmp_error(&errors, Duration::from_secs(3)).expect("Time Exceeded for echo");
        // Skip a late duplicate about the TCP SYN's retransmission.
        if e[20 + 8 + 9] == 1 {
            break e;
        }
    };
    assert_error_restored(&e, CLIENT1_IP, 0x5151, SERVER_IP, 1);
    gw.stop().expect("stop");
    assert!(gw.counter("tc_ext", "tc_in_icmp_error_forwarded") >= 3);
}

#[test]
fn rfc5508_traceroute_through_the_gateway_shows_every_hop() {
    let (lab, _gw) = nat(&[]);
    assert_traceroute_shows_every_hop(&lab, &[]);
}

/// `traceroute <method>` from client1 to the server shows the gateway, the
/// router and the server: the probes' Time Exceeded from the router (behind
/// the NAT) come back translated. `method`: none (UDP), `-I` (ICMP echo),
/// `-T` (TCP SYN).
fn assert_traceroute_shows_every_hop(lab: &Lab, method: &[&str]) {
    let argv = [
        &["traceroute", "-n", "-q", "1", "-w", "2", "-m", "5"],
        method,
        &["198.51.100.10"],
    ]
    .concat();
    let out = lab
        .exec_timeout(Host::Client1, &argv, Duration::from_secs(30))
        .expect("traceroute");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let hops: Vec<String> = text
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
        .collect();
    assert_eq!(
        hops,
        ["10.1.0.1", "192.0.2.1", "198.51.100.10"],
        "traceroute {method:?} said:\n{text}"
    );
}

/// A 1500-byte DF ping from client1 to the server gets Fragmentation Needed
/// (MTU 1400) back, translated, and client1's kernel learns the path MTU.
fn assert_df_ping_learns_mtu_1400(lab: &Lab) {
    let big = lab
        .exec_unchecked(
            Host::Client1,
            &[
                "ping",
                "-n",
                "-c",
                "2",
                "-i",
                "0.5",
                "-W",
                "1",
                "-M",
                "do",
                "-s",
                "1472",
                "198.51.100.10",
            ],
        )
        .expect("ping");
    let text =
        String::from_utf8_lossy(&big.stdout).into_owned() + &String::from_utf8_lossy(&big.stderr);
    assert!(
        text.contains("mtu = 1400") || text.contains("mtu=1400"),
        "no Fragmentation Needed came back: {text}"
    );
    let route = lab
        .exec(Host::Client1, &["ip", "route", "get", "198.51.100.10"])
        .expect("ip route get");
    let route = String::from_utf8_lossy(&route.stdout).into_owned();
    assert!(route.contains("mtu 1400"), "path MTU not learned: {route}");
}

/// Router's link toward the server gets a 1400-byte MTU.
fn narrow_link(lab: &Lab) {
    lab.exec(Host::Router, &["ip", "link", "set", "r-srv", "mtu", "1400"])
        .expect("mtu");
}

#[test]
fn rfc5508_req3_fragmentation_needed_reaches_the_inside_host_so_pmtud_works() {
    let (lab, mut gw) = nat_after(narrow_link, &[]);
    // A 1500-byte DF ping: the router answers Fragmentation Needed (MTU
    // 1400) to the SNAT address; translated, the client learns the MTU.
    assert_df_ping_learns_mtu_1400(&lab);
    // And a packet that fits the path goes through.
    let fits = lab
        .exec_unchecked(
            Host::Client1,
            &[
                "ping",
                "-n",
                "-c",
                "1",
                "-W",
                "2",
                "-M",
                "do",
                "-s",
                "1372",
                "198.51.100.10",
            ],
        )
        .expect("ping");
    assert!(
        fits.status.success(),
        "{}",
        String::from_utf8_lossy(&fits.stdout)
    );
    gw.stop().expect("stop");
    assert!(gw.counter("tc_ext", "tc_in_icmp_error_forwarded") >= 1);
}

#[test]
fn rfc5382_req9_tcp_upload_recovers_through_pmtud_over_a_1400_byte_link() {
    let (lab, _gw) = nat_after(narrow_link, &[]);
    let listener = lab
        .tcp_listener(Host::Server, sa(SERVER_IP, 5601))
        .expect("listener");
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut total = 0usize;
        let mut buf = [0u8; 65536];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => total += n,
                Err(e) => panic!("upload stalled after {total} bytes: {e}"),
            }
        }
        let _ = s.write_all(total.to_string().as_bytes());
        total
    });
    let mut c = client_tcp(&lab, Host::Client1, 0, sa(SERVER_IP, 5601)).expect("connect");
    let data = vec![0x5au8; 2 << 20];
    c.write_all(&data).expect("upload");
    c.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut answer = String::new();
    c.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    c.read_to_string(&mut answer).expect("answer");
    assert_eq!(server.join().expect("server"), data.len());
    assert_eq!(answer, data.len().to_string());
}

/// A Time Exceeded "from the router" about client1's UDP session, built by
/// hand: the quote as the router would send it, then `mangle` applied.
fn forged_error(mapping: SocketAddrV4, dport: u16, mangle: impl Fn(&mut Vec<u8>)) -> Vec<u8> {
    let mut quoted = vec![
        0x45, 0, 0, 36, 0, 1, 0x40, 0, 1, 17, 0, 0, 192, 0, 2, 2, 198, 51, 100, 10,
    ];
    quoted[12..16].copy_from_slice(&mapping.ip().octets());
    let c = internet_checksum(&quoted);
    quoted[10..12].copy_from_slice(&c.to_be_bytes());
    quoted.extend_from_slice(&mapping.port().to_be_bytes());
    quoted.extend_from_slice(&dport.to_be_bytes());
    quoted.extend_from_slice(&[0, 16, 0, 0]);
    quoted.extend_from_slice(b"payload!");
    let mut msg = vec![11u8, 0, 0, 0, 0, 0, 0, 0];
    msg.extend_from_slice(&quoted);
    let c = internet_checksum(&msg);
    msg[2..4].copy_from_slice(&c.to_be_bytes());
    mangle(&mut msg);
    msg
}

/// A UDP session client1:`client_port` → server:`server_port`: the two
/// sockets and the mapping the server saw.
fn udp_session(
    lab: &Lab,
    server_port: u16,
    client_port: u16,
) -> (UdpSocket, UdpSocket, SocketAddrV4) {
    let server = lab
        .udp_socket(Host::Server, sa(SERVER_IP, server_port))
        .expect("server");
    let c = client_udp(lab, Host::Client1, client_port);
    c.send_to(b"hi", sa(SERVER_IP, server_port)).expect("send");
    server
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut buf = [0u8; 64];
    let (_, from) = server.recv_from(&mut buf).expect("arrives");
    let SocketAddr::V4(mapping) = from else {
        panic!("v4")
    };
    (server, c, mapping)
}

/// Sends ICMP messages from the router to `mapping`'s address.
fn from_router(lab: &Lab, mapping: SocketAddrV4) -> impl Fn(&[u8]) {
    let router = raw_icmp_socket(lab, Host::Router);
    move |msg| {
        router
            .send_to(msg, &SockAddr::from(sa(*mapping.ip(), 0)))
            .expect("sending an ICMP message from the router");
    }
}

fn raw_icmp_socket(lab: &Lab, h: Host) -> Socket {
    lab.in_ns(h, || {
        Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))
    })
    .expect("ns")
    .expect("raw ICMP socket")
}

#[test]
fn rfc5508_req3_errors_with_bad_checksums_or_no_session_are_dropped() {
    let (lab, mut gw) = nat(&[]);
    let (_server, _c, mapping) = udp_session(&lab, 5700, 40900);
    let send = from_router(&lab, mapping);
    let errors = raw_icmp(&lab, Host::Client1);
    // Bad ICMP checksum.
    send(&forged_error(mapping, 5700, |m| m[2] ^= 0x40));
    // Bad quoted IP checksum (ICMP checksum fixed up to match).
    send(&forged_error(mapping, 5700, |m| {
        m[8 + 10] ^= 0x01;
        m[2] = 0;
        m[3] = 0;
        let c = internet_checksum(m);
        m[2..4].copy_from_slice(&c.to_be_bytes());
    }));
    // No session toward that remote port.
    send(&forged_error(mapping, 5799, |_| {}));
    assert!(
        next_icmp_error(&errors, Duration::from_secs(1)).is_none(),
        "a bad or untracked error reached the inside host"
    );
    // The control: the same error, intact, is translated.
    send(&forged_error(mapping, 5700, |_| {}));
    let e = next_icmp_error(&errors, Duration::from_secs(2)).expect("intact error translated");
    assert_error_restored(&e, CLIENT1_IP, 40900, SERVER_IP, 17);
    gw.stop().expect("stop");
    assert_eq!(gw.counter("tc_ext", "drop_bad_checksum"), 2);
    assert_eq!(gw.counter("tc_ext", "drop_icmp_error_untracked"), 1);
}

#[test]
fn rfc5508_req6_icmp_errors_never_end_or_refresh_a_mapping() {
    let (lab, _gw) = nat(&["--udp-timeout", "2", "--sweep-interval", "1"]);
    let (server, c, mapping) = udp_session(&lab, 5710, 40910);
    let send = from_router(&lab, mapping);
    let error = forged_error(mapping, 5710, |_| {});
    // Errors do not end it: after three, the server still gets through.
    for _ in 0..3 {
        send(&error);
    }
    server.send_to(b"still", mapping).expect("send");
    let got = recv_all_within(&c, Duration::from_millis(500)).expect("recv");
    assert_eq!(got.len(), 1, "the mapping ended: {got:?}");
    // Errors every 300 ms for 4 s: were they refreshing the session, the
    // server's datagram at the end would still get in.
    for _ in 0..13 {
        send(&error);
        std::thread::sleep(Duration::from_millis(300));
    }
    server.send_to(b"late", mapping).expect("send");
    let got = recv_all_within(&c, Duration::from_millis(800)).expect("recv");
    assert!(got.is_empty(), "the mapping outlived its timeout: {got:?}");
}

// ---- Hairpinning (RFC 4787 REQ-9, RFC 5382 REQ-8) ----

#[test]
fn rfc4787_req9_udp_hairpinning_shows_the_external_source() {
    let (lab, mut gw, _m) = stun(&[]);
    let (c1, m1) = mapped(&lab, Host::Client1, 41100);
    let (c2, m2) = mapped(&lab, Host::Client2, 41101);
    // Hole punching with the default (strictest) filtering: client2's
    // packet toward client1's mapping is refused by client1's binding, but
    // opens client2's side; client1's then gets through, and the answer.
    c2.send_to(b"punch", m1).expect("send");
    assert!(
        recv_from(&c1, m2, Duration::from_millis(300)).is_empty(),
        "filtered"
    );
    c1.send_to(b"hello via the mapping", m2).expect("send");
    let got = recv_from(&c2, m1, Duration::from_millis(800));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        got[0].0,
        SocketAddr::V4(m1),
        "the receiver sees the sender's external endpoint"
    );
    assert_eq!(got[0].1, b"hello via the mapping");
    c2.send_to(b"answer", m1).expect("send");
    let back = recv_from(&c1, m2, Duration::from_millis(800));
    assert_eq!(back.len(), 1, "{back:?}");
    assert_eq!(back[0].0, SocketAddr::V4(m2));
    gw.stop().expect("stop");
    assert!(gw.counter("tc_int", "tc_hairpin_forwarded") >= 2);
}

#[test]
fn rfc5382_req8_tcp_hairpinning_shows_the_external_source() {
    let (lab, _gw) = nat(&["--filtering", "endpoint-independent"]);
    // Client2's endpoint 41200 gets a mapping by talking out, then listens
    // on the same port.
    let m2 = tcp_mapping(&lab, Host::Client2, 41200, sa(SERVER_IP, 7010));
    let listener = lab
        .tcp_listener(Host::Client2, sa(CLIENT2_IP, 41200))
        .expect("listener");
    let m1 = tcp_mapping(&lab, Host::Client1, 41201, sa(SERVER_IP, 7011));
    let accepted = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().expect("accept");
        let got = receive(&mut s, 5);
        s.write_all(b"pong!").expect("write");
        (peer, got)
    });
    let mut c = client_tcp(&lab, Host::Client1, 41201, m2).expect("connect to the mapping");
    c.write_all(b"ping!").expect("write");
    assert_eq!(receive(&mut c, 5), b"pong!");
    let (peer, got) = accepted.join().expect("accept thread");
    assert_eq!(got, b"ping!");
    assert_eq!(
        peer,
        SocketAddr::V4(m1),
        "the receiver sees the external endpoint"
    );
}

/// What arrives at `socket` from `from` within `within` (a late duplicate
/// answer of the mirror is not what these tests look for).
fn recv_from(
    socket: &UdpSocket,
    from: SocketAddrV4,
    within: Duration,
) -> Vec<(SocketAddr, Vec<u8>)> {
    recv_all_within(socket, within)
        .expect("recv")
        .into_iter()
        .filter(|(f, _)| *f == SocketAddr::V4(from))
        .collect()
}

// ---- Fragmentation by the gateway (RFC 4787 REQ-13) ----

/// The gateway's ext link (and the router's side of it) get a 1400-byte MTU,
/// smaller than the inside's 1500.
fn narrow_ext(lab: &Lab) {
    lab.exec(Host::Nat, &["ip", "link", "set", "ext", "mtu", "1400"])
        .expect("mtu");
    lab.exec(Host::Router, &["ip", "link", "set", "r-nat", "mtu", "1400"])
        .expect("mtu");
}

#[test]
fn rfc4787_req13_df_packet_too_big_for_the_ext_link_gets_fragmentation_needed() {
    let (lab, _gw) = nat_after(narrow_ext, &[]);
    assert_df_ping_learns_mtu_1400(&lab);
}

#[test]
fn rfc4787_req13a_packet_without_df_is_translated_and_fragmented() {
    let (lab, mut gw) = nat_after(narrow_ext, &[]);
    let server = lab
        .udp_socket(Host::Server, sa(SERVER_IP, 5800))
        .expect("server");
    let client = lab
        .in_ns(Host::Client1, || {
            let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
            s.bind(&SockAddr::from(sa(CLIENT1_IP, 41300)))?;
            // IP_MTU_DISCOVER = IP_PMTUDISC_DONT: DF clear.
            let dont: libc::c_int = 0;
            let rc = unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&s),
                    libc::IPPROTO_IP,
                    libc::IP_MTU_DISCOVER,
                    &dont as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0, "IP_MTU_DISCOVER");
            Ok::<_, std::io::Error>(s)
        })
        .expect("ns")
        .expect("socket");
    // One 1472-byte datagram: a 1500-byte packet that fits inside but not
    // on the 1400-byte ext link.
    let payload: Vec<u8> = (0..1472u32).map(|i| (i * 7 % 251) as u8).collect();
    client
        .send_to(&payload, &SockAddr::from(sa(SERVER_IP, 5800)))
        .expect("send");
    server
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let mut buf = [0u8; 4096];
    let (n, from) = server
        .recv_from(&mut buf)
        .expect("the datagram arrives whole");
    assert_eq!(&buf[..n], &payload[..], "reassembled byte for byte");
    assert_eq!(from.ip(), std::net::IpAddr::V4(NAT_EXT_IP));
    gw.stop().expect("stop");
    assert_eq!(
        gw.counter("tc_int", "tc_translated_for_kernel_fragmentation"),
        1,
        "the loader's log:\n{}",
        gw.log().join("\n")
    );
}

// ---- TCP session timers (RFC 5382 REQ-5, RFC 7857 section 2.2) ----

/// The next "flows" report the loader logs after this call (it logs one
/// per `--stats-interval`): (count, the flow lines).
fn next_flow_report(gw: &Gateway) -> (usize, Vec<String>) {
    let seen = gw.log().len();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = gw.log();
        let fresh = &log[seen.min(log.len())..];
        if let Some(i) = fresh
            .iter()
            .position(|l| l.contains(" flows") && l.contains("count="))
        {
            // The flow lines follow their count line; wait for the next
            // report to start so they are all in.
            if fresh[i + 1..].iter().any(|l| l.contains("stats ")) {
                let count = fresh[i]
                    .split_whitespace()
                    .find_map(|kv| kv.strip_prefix("count=").and_then(|n| n.parse().ok()))
                    .expect("count");
                let flows = fresh[i + 1..]
                    .iter()
                    .take_while(|l| l.contains("flow "))
                    .cloned()
                    .collect();
                return (count, flows);
            }
        }
        assert!(Instant::now() < deadline, "no flow report: {log:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn rfc7857_a_rst_leaves_the_session_for_the_transitory_timeout_not_zero() {
    let timers = "--tcp-transitory-timeout 4 --sweep-interval 1";
    let reports = "--stats-interval 1 --show-flows 10";
    let (lab, gw) = nat(&flags(&format!("{timers} {reports}")));
    let listener = lab
        .tcp_listener(Host::Server, sa(SERVER_IP, 5900))
        .expect("listener");
    let c = client_tcp(&lab, Host::Client1, 0, sa(SERVER_IP, 5900)).expect("connect");
    let (_accepted, _) = listener.accept().expect("accept");
    // SO_LINGER 0: closing sends a RST.
    Socket::from(c)
        .set_linger(Some(Duration::ZERO))
        .expect("linger");
    let reset_at = Instant::now();
    // Just after the RST the session is still there, closing.
    let (count, flows) = next_flow_report(&gw);
    assert_eq!(count, 1, "{flows:#?}");
    assert!(flows[0].contains("closing"), "{flows:#?}");
    // Gone only once the transitory timeout has passed.
    loop {
        let (count, flows) = next_flow_report(&gw);
        if count == 0 {
            break;
        }
        assert!(
            reset_at.elapsed() < Duration::from_secs(8),
            "still there: {flows:#?}"
        );
    }
    assert!(
        reset_at.elapsed() >= Duration::from_secs(4),
        "removed after {:?}, before the 4 s transitory timeout",
        reset_at.elapsed()
    );
}

// ---- ICMP errors from inside (RFC 5508 REQ-5, REQ-7) ----

/// Receives on a connected UDP socket until `within`; whether the kernel
/// reported the peer unreachable (an ICMP error matched the socket).
fn refused_within(socket: &UdpSocket, within: Duration) -> bool {
    socket.set_read_timeout(Some(within)).expect("timeout");
    let mut buf = [0u8; 64];
    matches!(
        socket.recv(&mut buf),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

#[test]
fn rfc5508_req5_icmp_error_from_an_inside_host_is_translated_out() {
    let (lab, mut gw) = nat(&[]);
    let (server, client, mapping) = udp_session(&lab, 5720, 41400);
    // The client goes away: its kernel answers the next datagram with Port
    // Unreachable, quoting server -> 10.1.0.11:41400.
    drop(client);
    let errors = raw_icmp(&lab, Host::Server);
    server.connect(mapping).expect("connect");
    server.send(b"anyone?").expect("send");
    let e = next_icmp_error(&errors, Duration::from_secs(3)).expect("Port Unreachable arrives");
    let ihl = usize::from(e[0] & 0x0f) * 4;
    assert_eq!((e[ihl], e[ihl + 1]), (3, 3), "Port Unreachable");
    assert_eq!(ip_at(&e, 12), NAT_EXT_IP, "from the SNAT address");
    let q = &e[ihl + 8..];
    assert_eq!(ip_at(q, 16), NAT_EXT_IP, "quoted destination = the mapping");
    assert_eq!(be16(q, 22), mapping.port(), "quoted port = the mapping's");
    assert_eq!(internet_checksum(&e[ihl..]), 0, "ICMP checksum");
    assert_eq!(internet_checksum(&q[..20]), 0, "quoted IP checksum");
    // And the server's own stack matched it to its socket: the error is
    // pending there, reported by the next call.
    let second_send = server.send(b"anyone?");
    let told = match &second_send {
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionRefused,
        Ok(_) => refused_within(&server, Duration::from_secs(2)),
    };
    assert!(
        told,
        "the server's socket was not told (second send: {second_send:?}; error seen: {e:02x?})"
    );
    gw.stop().expect("stop");
    assert!(gw.counter("tc_int", "tc_out_icmp_error_forwarded") >= 1);
}

#[test]
fn rfc5508_req7_hairpinned_icmp_error_goes_back_to_the_inside_sender() {
    let (lab, mut gw, _m) = stun(&["--filtering", "endpoint-independent"]);
    let (b, m2) = mapped(&lab, Host::Client2, 41501);
    drop(b);
    let a = client_udp(&lab, Host::Client1, 41500);
    a.connect(m2).expect("connect");
    a.send(b"are you there?").expect("send");
    assert!(
        refused_within(&a, Duration::from_secs(2)),
        "client2's Port Unreachable did not come back through the hairpin"
    );
    gw.stop().expect("stop");
    assert!(gw.counter("tc_int", "tc_out_icmp_error_forwarded") >= 1);
}

// ---- Out of ports (RFC 5508 REQ-8) ----

/// Checks an out-of-ports error as the inside host receives it (the whole
/// IP packet): Destination Unreachable code 13 from the gateway's inside
/// address, TTL 64, both checksums right, quoting `inside:port -> remote`.
/// Returns the quoted packet.
fn assert_out_of_ports_error(e: &[u8], inside: SocketAddrV4, remote: SocketAddrV4) -> Vec<u8> {
    let ihl = usize::from(e[0] & 0x0f) * 4;
    assert_eq!((e[ihl], e[ihl + 1]), (3, 13), "type 3 code 13");
    assert_eq!(
        ip_at(e, 12),
        nat_lab::NAT_INT_IP,
        "from the gateway's --int address"
    );
    assert_eq!(ip_at(e, 16), *inside.ip(), "to the sender");
    assert_eq!(e[8], 64, "TTL");
    assert_eq!(e[9], 1, "ICMP");
    assert_eq!(usize::from(be16(e, 2)), e.len(), "IP total length");
    assert_eq!(internet_checksum(&e[..ihl]), 0, "IP checksum");
    assert_eq!(internet_checksum(&e[ihl..]), 0, "ICMP checksum");
    let q = &e[ihl + 8..];
    let qihl = usize::from(q[0] & 0x0f) * 4;
    assert!(q.len() >= qihl + 8, "RFC 792: IP header + 8 bytes quoted");
    assert_eq!(internet_checksum(&q[..qihl]), 0, "quoted IP checksum");
    assert_eq!(ip_at(q, 12), *inside.ip(), "quoted source untranslated");
    assert_eq!(ip_at(q, 16), *remote.ip(), "quoted destination");
    assert_eq!(be16(q, qihl), inside.port(), "quoted source port");
    assert_eq!(be16(q, qihl + 2), remote.port(), "quoted destination port");
    q.to_vec()
}

/// Whether an error means "no route to host" (what Linux makes of ICMP
/// unreachable code 13: EHOSTUNREACH, a hard error).
fn is_host_unreachable(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::EHOSTUNREACH)
}

#[test]
fn rfc5508_req8_out_of_ports_sends_icmp_unreachable_code_13() {
    // One external port, taken by client1 for UDP and for TCP.
    let (lab, mut gw, _m) = stun(&["--port-range", "41000-41000"]);
    let server_udp = STUN;
    let server_tcp = sa(SERVER_IP, 5600);
    let (_c1, m1) = mapped(&lab, Host::Client1, 41000);
    assert_eq!(m1.port(), 41000);
    let listener = lab
        .tcp_listener(Host::Server, server_tcp)
        .expect("listener");
    let holder =
        client_tcp(&lab, Host::Client1, 41000, server_tcp).expect("client1 takes the TCP port");
    let (_accepted, peer) = listener.accept().expect("accept");
    assert_eq!(peer, SocketAddr::V4(sa(NAT_EXT_IP, 41000)));

    let errors = raw_icmp(&lab, Host::Client2);
    // UDP with a complete checksum (as from a real NIC): XDP sees the
    // exhaustion first and hands the packet to TC, which answers.
    lab.exec(Host::Client2, &["ethtool", "-K", "eth0", "tx", "off"])
        .expect("ethtool");
    let c2_udp = sa(CLIENT2_IP, 41000);
    let c2 = client_udp(&lab, Host::Client2, c2_udp.port());
    c2.connect(server_udp).expect("connect");
    c2.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    c2.send(b"no port for me").expect("send");
    let e = next_icmp_error(&errors, Duration::from_secs(3)).expect("an ICMP error for UDP");
    let q = assert_out_of_ports_error(&e, c2_udp, server_udp);
    // The whole datagram is quoted, exactly as client2 sent it: its UDP
    // checksum (complete here) still verifies.
    assert_eq!(usize::from(be16(&q, 2)), q.len(), "whole datagram quoted");
    assert_eq!(q[8], 64, "quoted TTL as sent");
    assert_eq!(&q[28..], b"no port for me");
    assert_eq!(ip_l4_checksum(&q), 0, "quoted UDP checksum");
    // The connected socket learns it as a hard error.
    let mut buf = [0u8; 64];
    let err = c2
        .recv(&mut buf)
        .expect_err("the UDP socket gets the error");
    assert!(is_host_unreachable(&err), "UDP socket error: {err:?}");

    // TCP, checksum offload on (a partial checksum, straight to TC): the
    // connect fails at once with "no route to host", not a timeout.
    lab.exec(Host::Client2, &["ethtool", "-K", "eth0", "tx", "on"])
        .expect("ethtool");
    let c2_tcp = sa(CLIENT2_IP, 41001);
    let started = Instant::now();
    let err = lab
        .tcp_connect(
            Host::Client2,
            Some(c2_tcp),
            server_tcp,
            Duration::from_secs(10),
        )
        .expect_err("no port left for client2's TCP");
    let took = started.elapsed();
    let io = err
        .downcast_ref::<std::io::Error>()
        .unwrap_or_else(|| panic!("not an I/O error: {err:#}"));
    assert!(is_host_unreachable(io), "connect error: {err:#}");
    assert!(
        took < Duration::from_secs(2),
        "connect failed only after {took:?}"
    );
    let e = loop {
        let e = next_icmp_error(&errors, Duration::from_secs(3)).expect("an ICMP error for TCP");
        if e[20 + 8 + 9] == 6 {
            break e;
        }
    };
    let q = assert_out_of_ports_error(&e, c2_tcp, server_tcp);
    assert_eq!(q[20 + 13] & 0x02, 0x02, "quotes the SYN");
    drop(holder);

    gw.stop().expect("stop");
    assert!(gw.counter("xdp_int", "xdp_to_tc_no_free_port") >= 1);
    assert!(gw.counter("tc_int", "drop_no_free_port") >= 2);
    assert!(gw.counter("tc_int", "icmp_out_of_ports_sent") >= 2);
    assert_eq!(gw.counter("tc_int", "icmp_out_of_ports_rate_limited"), 0);
}

// ---- NICs that cannot take redirected XDP frames ----

/// Everything that was lost when the gateway's NICs refused redirected XDP
/// frames (issue 14) goes through, by the TC fallback: ping, a RST from a
/// closed port, traceroute with UDP, ICMP and TCP probes, path MTU
/// discovery. Checksums are complete on the wire, so XDP, not a partial
/// checksum, decides; the counters say TC carried what XDP would have.
fn assert_everything_passes_through_the_tc_fallback(peers: PeerNapi) {
    let prepare = |lab: &Lab| {
        lab.complete_checksums_on_the_wire()
            .expect("complete checksums");
        narrow_link(lab);
    };
    let (lab, mut gw) = nat_lab_with(LabOptions::gateway_peers(peers), prepare, &[]);
    let report = ping(&lab, Host::Client1, SERVER_IP, 3, Duration::from_secs(3)).expect("ping");
    assert!(report.all_replied(), "{}", report.output);
    match client_tcp(&lab, Host::Client1, 0, sa(SERVER_IP, 5999)) {
        Err(e) => assert!(
            e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused),
            "the server's RST did not come back: {e:#}"
        ),
        Ok(_) => panic!("nothing listens on 5999"),
    }
    for method in [&[][..], &["-I"], &["-T"]] {
        assert_traceroute_shows_every_hop(&lab, method);
    }
    assert_df_ping_learns_mtu_1400(&lab);
    gw.stop().expect("stop");
    for (xdp, tc, xdp_fwd, tc_fwd) in [
        ("xdp_int", "tc_int", "xdp_out_forwarded", "tc_out_forwarded"),
        ("xdp_ext", "tc_ext", "xdp_in_forwarded", "tc_in_forwarded"),
    ] {
        assert!(gw.counter(xdp, "xdp_to_tc_no_xdp_xmit") >= 3, "{xdp}");
        assert_eq!(gw.counter(xdp, xdp_fwd), 0, "{xdp}");
        assert_eq!(gw.counter(xdp, "drop_redirect_refused"), 0, "{xdp}");
        assert!(gw.counter(tc, tc_fwd) >= 3, "{tc}");
    }
    let log = gw.log();
    for nic in ["ext", "int"] {
        let warned = format!("{nic} cannot take redirected XDP frames");
        assert_eq!(
            log.iter().filter(|l| l.contains(&warned)).count(),
            1,
            "one warning names {nic}: {log:#?}"
        );
    }
    assert!(
        log.iter()
            .any(|l| l.contains("stats xdp_egress: xdp_int=to_tc xdp_ext=to_tc")),
        "{log:#?}"
    );
}

#[test]
fn nics_whose_peers_got_napi_after_link_up_pass_everything_through_the_tc_fallback() {
    assert_everything_passes_through_the_tc_fallback(PeerNapi::AfterUp);
}

#[test]
fn nics_whose_peers_run_no_napi_pass_everything_through_the_tc_fallback() {
    assert_everything_passes_through_the_tc_fallback(PeerNapi::Off);
}

#[test]
fn generic_xdp_redirects_into_nics_that_cannot_take_xdp_frames() {
    // Generic mode sends a redirected packet as an skb: no ndo_xdp_xmit.
    let lab = lab_with(LabOptions::gateway_peers(PeerNapi::Off));
    lab.complete_checksums_on_the_wire()
        .expect("complete checksums");
    let mut gw = gateway(&lab, &flags("--xdp-mode generic"));
    let report = ping(&lab, Host::Client1, SERVER_IP, 3, Duration::from_secs(3)).expect("ping");
    assert!(report.all_replied(), "{}", report.output);
    gw.stop().expect("stop");
    assert!(gw.counter("xdp_ext", "xdp_in_forwarded") >= 3);
    for xdp in ["xdp_int", "xdp_ext"] {
        assert_eq!(gw.counter(xdp, "xdp_to_tc_no_xdp_xmit"), 0, "{xdp}");
        assert_eq!(gw.counter(xdp, "drop_redirect_refused"), 0, "{xdp}");
    }
    assert!(
        gw.log()
            .iter()
            .any(|l| l.contains("stats xdp_egress: xdp_int=redirect_skb xdp_ext=redirect_skb")),
        "{:#?}",
        gw.log()
    );
}

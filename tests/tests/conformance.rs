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

use nat_lab::{CLIENT1_IP, CLIENT2_IP, Gateway, Host, Lab, NAT_EXT_IP, SERVER_IP, recv_all_within};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const SERVER2_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);

fn lab() -> Lab {
    let lab = Lab::new().expect("building the lab (needs root)");
    lab.exec(
        Host::Server,
        &["ip", "addr", "add", "198.51.100.20/24", "dev", "eth0"],
    )
    .expect("second server address");
    lab
}

fn gateway(lab: &Lab, extra: &[&str]) -> Gateway {
    let mut args = vec!["--stats-interval", "0"];
    args.extend_from_slice(extra);
    Gateway::start(lab, &args).expect("starting nat-loader")
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
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

/// A TCP listener in the server namespace that writes each peer's address
/// and closes.
fn tcp_mirror(lab: &Lab, bind: SocketAddrV4) -> JoinHandle<()> {
    let listener = lab.tcp_listener(Host::Server, bind).expect("listener");
    std::thread::spawn(move || {
        if let Ok((mut s, peer)) = listener.accept() {
            let _ = s.write_all(peer.to_string().as_bytes());
        }
    })
}

fn tcp_mapping(lab: &Lab, src: SocketAddrV4, server: SocketAddrV4) -> SocketAddrV4 {
    let mut s = lab
        .tcp_connect(Host::Client1, Some(src), server, Duration::from_secs(3))
        .expect("connect through the gateway");
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read mapping");
    text.parse()
        .unwrap_or_else(|_| panic!("mirror said {text:?}"))
}

/// Raw ICMP echo request with identifier `id` from `from` to `dst`.
fn icmp_echo(lab: &Lab, from: Host, dst: Ipv4Addr, id: u16) {
    let socket = lab
        .in_ns(from, || {
            Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))
        })
        .expect("ns")
        .expect("raw ICMP socket");
    let mut msg = vec![8u8, 0, 0, 0];
    msg.extend_from_slice(&id.to_be_bytes());
    msg.extend_from_slice(&1u16.to_be_bytes());
    msg.extend_from_slice(b"conformance");
    let c = nat_lab::packet::internet_checksum(&msg);
    msg[2..4].copy_from_slice(&c.to_be_bytes());
    socket
        .send_to(&msg, &SockAddr::from(sa(dst, 0)))
        .expect("send echo");
}

/// Identifiers of the echo requests arriving at `dst` (a raw socket in the
/// server namespace) within `within`.
fn echo_ids_seen(lab: &Lab, dst: Ipv4Addr, within: Duration, send: impl FnOnce()) -> Vec<u16> {
    let socket = lab
        .in_ns(Host::Server, || {
            Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))
        })
        .expect("ns")
        .expect("raw ICMP socket");
    let socket: UdpSocket = socket.into();
    send();
    let deadline = Instant::now() + within;
    let mut ids = Vec::new();
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        if let Ok(n) = socket.recv(&mut buf) {
            let ihl = usize::from(buf[0] & 0x0f) * 4;
            let daddr = Ipv4Addr::new(buf[16], buf[17], buf[18], buf[19]);
            if n >= ihl + 8 && buf[ihl] == 8 && daddr == dst {
                ids.push(u16::from_be_bytes([buf[ihl + 4], buf[ihl + 5]]));
            }
        }
    }
    ids
}

#[test]
fn rfc4787_req1_endpoint_independent_mapping_udp() {
    let lab = lab();
    let _gw = gateway(&lab, &[]);
    let _m1 = UdpMirror::start(&lab, sa(SERVER_IP, 3478));
    let _m2 = UdpMirror::start(&lab, sa(SERVER2_IP, 3479));
    let socket = lab
        .udp_socket(Host::Client1, sa(CLIENT1_IP, 40000))
        .expect("client socket");
    let a = udp_mapping(&socket, sa(SERVER_IP, 3478));
    let b = udp_mapping(&socket, sa(SERVER2_IP, 3479));
    assert_eq!(*a.ip(), NAT_EXT_IP, "translated to the SNAT address");
    assert_eq!(a, b, "one external endpoint whatever the remote");
    assert_eq!(a.port(), 40000, "port preserved while free");
}

#[test]
fn rfc5382_req1_endpoint_independent_mapping_tcp() {
    let lab = lab();
    let _gw = gateway(&lab, &[]);
    let t1 = tcp_mirror(&lab, sa(SERVER_IP, 7001));
    let t2 = tcp_mirror(&lab, sa(SERVER2_IP, 7002));
    let src = sa(CLIENT1_IP, 40100);
    let a = tcp_mapping(&lab, src, sa(SERVER_IP, 7001));
    let b = tcp_mapping(&lab, src, sa(SERVER2_IP, 7002));
    t1.join().expect("mirror 1");
    t2.join().expect("mirror 2");
    assert_eq!(*a.ip(), NAT_EXT_IP);
    assert_eq!(a, b, "one external endpoint whatever the remote");
}

#[test]
fn rfc5508_req1a_icmp_query_identifier_is_mapped_endpoint_independently() {
    let lab = lab();
    let _gw = gateway(&lab, &[]);
    let to1 = echo_ids_seen(&lab, SERVER_IP, Duration::from_millis(2500), || {
        icmp_echo(&lab, Host::Client1, SERVER_IP, 0x4242)
    });
    let to2 = echo_ids_seen(&lab, SERVER2_IP, Duration::from_millis(2500), || {
        icmp_echo(&lab, Host::Client1, SERVER2_IP, 0x4242)
    });
    // Client2's echo with the same identifier must get another one.
    let other = echo_ids_seen(&lab, SERVER_IP, Duration::from_millis(2500), || {
        icmp_echo(&lab, Host::Client2, SERVER_IP, 0x4242)
    });
    assert_eq!(to1.len(), 1, "{to1:?}");
    assert_eq!(to1, to2, "one external identifier whatever the remote");
    assert_eq!(to1[0], 0x4242, "identifier preserved while free");
    assert_eq!(other.len(), 1, "{other:?}");
    assert_ne!(other[0], 0x4242, "no identifier overloading");
}

#[test]
fn rfc4787_req3_no_port_overloading_across_inside_hosts() {
    let lab = lab();
    let _gw = gateway(&lab, &[]);
    let _m = UdpMirror::start(&lab, sa(SERVER_IP, 3478));
    let c1 = lab
        .udp_socket(Host::Client1, sa(CLIENT1_IP, 40200))
        .expect("socket");
    let c2 = lab
        .udp_socket(Host::Client2, sa(CLIENT2_IP, 40200))
        .expect("socket");
    let a = udp_mapping(&c1, sa(SERVER_IP, 3478));
    let b = udp_mapping(&c2, sa(SERVER_IP, 3478));
    assert_eq!(a.port(), 40200);
    assert_ne!(a, b, "two inside endpoints never share an external one");
}

#[test]
fn rfc4787_req3a_ports_below_1024_map_below_1024() {
    let lab = lab();
    let _gw = gateway(&lab, &[]);
    let _m = UdpMirror::start(&lab, sa(SERVER_IP, 3478));
    // 500 is outside the default low range (600-1023), so it cannot be
    // preserved; 700 can.
    for (port, preserved) in [(500u16, false), (700, true)] {
        let s = lab
            .udp_socket(Host::Client1, sa(CLIENT1_IP, port))
            .expect("socket");
        let m = udp_mapping(&s, sa(SERVER_IP, 3478));
        assert!(
            (600..1024).contains(&m.port()),
            "inside port {port} mapped to {m}"
        );
        assert_eq!(m.port() == port, preserved, "{port} -> {m}");
    }
    let s = lab
        .udp_socket(Host::Client1, sa(CLIENT1_IP, 2000))
        .expect("socket");
    assert!(udp_mapping(&s, sa(SERVER_IP, 3478)).port() >= 1024);
}

#[test]
fn rfc4787_req4_port_parity_is_preserved() {
    let lab = lab();
    let _gw = gateway(&lab, &[]);
    let _m = UdpMirror::start(&lab, sa(SERVER_IP, 3478));
    // Client2 takes each port first, so client1's mapping is a retry.
    let mut sockets = Vec::new();
    for port in 41000u16..41010 {
        let c2 = lab
            .udp_socket(Host::Client2, sa(CLIENT2_IP, port))
            .expect("socket");
        assert_eq!(udp_mapping(&c2, sa(SERVER_IP, 3478)).port(), port);
        let c1 = lab
            .udp_socket(Host::Client1, sa(CLIENT1_IP, port))
            .expect("socket");
        let m = udp_mapping(&c1, sa(SERVER_IP, 3478));
        assert_ne!(m.port(), port);
        assert_eq!(m.port() % 2, port % 2, "{port} -> {m}: parity lost");
        sockets.push((c1, c2));
    }
}

/// Client1 sends from 40300 to the server's 3478; then three remotes send
/// to the mapping: the same endpoint, the same address from another port,
/// another address. Returns which of the three arrived.
fn filtering_outcome(extra: &[&str]) -> ([bool; 3], u64) {
    let lab = lab();
    let mut gw = gateway(&lab, extra);
    let _m = UdpMirror::start(&lab, sa(SERVER_IP, 3478));
    let c = lab
        .udp_socket(Host::Client1, sa(CLIENT1_IP, 40300))
        .expect("socket");
    let mapping = udp_mapping(&c, sa(SERVER_IP, 3478));
    let senders = [sa(SERVER_IP, 3480), sa(SERVER2_IP, 3478)];
    for (i, src) in senders.iter().enumerate() {
        let s = lab.udp_socket(Host::Server, *src).expect("sender");
        s.send_to(format!("from-{i}").as_bytes(), mapping)
            .expect("send");
    }
    let got = recv_all_within(&c, Duration::from_millis(800)).expect("recv");
    gw.stop().expect("stop");
    let arrived = |ip: Ipv4Addr, port: u16| {
        got.iter()
            .any(|(from, _)| *from == SocketAddr::V4(sa(ip, port)))
    };
    (
        [true, arrived(SERVER_IP, 3480), arrived(SERVER2_IP, 3478)],
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
    let lab = lab();
    let mut args = vec!["--udp-timeout", "2", "--sweep-interval", "1"];
    args.extend_from_slice(extra);
    let _gw = gateway(&lab, &args);
    let server = lab
        .udp_socket(Host::Server, sa(SERVER_IP, 3490))
        .expect("server socket");
    let c = lab
        .udp_socket(Host::Client1, sa(CLIENT1_IP, 40400))
        .expect("socket");
    c.send_to(b"hello", sa(SERVER_IP, 3490)).expect("probe");
    server
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut buf = [0u8; 64];
    let (_, mapping) = server.recv_from(&mut buf).expect("probe arrives");
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
    let lab = lab();
    let mut gw = gateway(&lab, &[]);
    // Client1's TCP endpoint 40500 gets a binding by talking to port 7003.
    let t = tcp_mirror(&lab, sa(SERVER_IP, 7003));
    let m = tcp_mapping(&lab, sa(CLIENT1_IP, 40500), sa(SERVER_IP, 7003));
    t.join().expect("mirror");
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
    let lab = lab();
    let _gw = gateway(&lab, &[]);
    // A binding for 40600, as a rendezvous server would see it.
    let t = tcp_mirror(&lab, sa(SERVER_IP, 7005));
    let m = tcp_mapping(&lab, sa(CLIENT1_IP, 40600), sa(SERVER_IP, 7005));
    t.join().expect("mirror");
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
    let mut buf = [0u8; 12];
    srv.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    srv.read_exact(&mut buf).expect("read");
    assert_eq!(&buf, b"hello across");
}

#[test]
fn rfc6888_released_port_is_held_for_its_endpoint_then_freed() {
    let lab = lab();
    let _gw = gateway(
        &lab,
        &[
            "--udp-timeout",
            "1",
            "--sweep-interval",
            "1",
            "--port-hold",
            "4",
        ],
    );
    let _m = UdpMirror::start(&lab, sa(SERVER_IP, 3478));
    let c1 = lab
        .udp_socket(Host::Client1, sa(CLIENT1_IP, 40700))
        .expect("socket");
    assert_eq!(udp_mapping(&c1, sa(SERVER_IP, 3478)).port(), 40700);
    // Idle: the session expires (1 s + a sweep) and the port is held.
    std::thread::sleep(Duration::from_millis(2500));
    let c2 = lab
        .udp_socket(Host::Client2, sa(CLIENT2_IP, 40700))
        .expect("socket");
    let during_hold = udp_mapping(&c2, sa(SERVER_IP, 3478));
    assert_ne!(during_hold.port(), 40700, "held port went to another host");
    // The old endpoint takes its port back.
    assert_eq!(udp_mapping(&c1, sa(SERVER_IP, 3478)).port(), 40700);
    drop(c2);
    // Once client1 is idle past timeout + hold, the port is free for others.
    std::thread::sleep(Duration::from_secs(7));
    let c2 = lab
        .udp_socket(Host::Client2, sa(CLIENT2_IP, 40700))
        .expect("socket");
    assert_eq!(udp_mapping(&c2, sa(SERVER_IP, 3478)).port(), 40700);
}

//! `--mss-clamp`: the MSS option of SYNs and SYN-ACKs crossing the gateway
//! is lowered to the configured value (both directions), with the TCP
//! checksum kept right, and left alone without the flag.

use std::{
    net::{SocketAddrV4, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use nat_lab::{
    CLIENT1_IP, Gateway, HOST_IF, Host, Lab, NAT_EXT_IP, SERVER_IP, gateway, lab,
    packet::ip_l4_checksum,
};
use socket2::{Domain, Protocol, Socket, Type};

/// A raw socket in `h` that receives a copy of every TCP segment arriving
/// there (as whole IP packets).
fn tcp_capture(lab: &Lab, h: Host) -> UdpSocket {
    let s = lab
        .in_ns(h, || {
            Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::TCP))
        })
        .expect("ns")
        .expect("raw TCP socket");
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    s.into()
}

/// The first captured segment with the given ports and SYN set (with ACK
/// for a SYN-ACK), within 3 s.
fn captured_syn(socket: &UdpSocket, sport: u16, dport: u16, ack: bool) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        if let Ok(n) = socket.recv(&mut buf) {
            let p = &buf[..n];
            let ihl = usize::from(p[0] & 0x0f) * 4;
            let t = &p[ihl..];
            let flags = t[13];
            if u16::from_be_bytes([t[0], t[1]]) == sport
                && u16::from_be_bytes([t[2], t[3]]) == dport
                && flags & 0x02 != 0
                && (flags & 0x10 != 0) == ack
            {
                return p.to_vec();
            }
        }
    }
    panic!(
        "no SYN{} {sport} -> {dport} captured",
        if ack { "-ACK" } else { "" }
    );
}

/// The MSS option of a captured SYN, after checking its TCP checksum.
fn mss_of(p: &[u8]) -> u16 {
    assert_eq!(ip_l4_checksum(p), 0, "TCP checksum of {p:02x?}");
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let tot = usize::from(u16::from_be_bytes([p[2], p[3]]));
    let seg = &p[ihl..tot];
    let doff = usize::from(seg[12] >> 4) * 4;
    let opts = &seg[20..doff];
    let mut i = 0;
    while i < opts.len() {
        match opts[i] {
            0 => break,
            1 => i += 1,
            2 => return u16::from_be_bytes([opts[i + 2], opts[i + 3]]),
            _ => i += usize::from(opts[i + 1]).max(2),
        }
    }
    panic!("no MSS option in {p:02x?}");
}

fn tcp_maxseg(s: &TcpStream) -> u32 {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid socket and an int-sized buffer with its length.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_MAXSEG,
            &mut v as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_MAXSEG: {}", std::io::Error::last_os_error());
    v as u32
}

/// One connection client1 → server through a gateway started with
/// `extra`: the MSS options the server saw in the SYN and the client in
/// the SYN-ACK, and TCP_MAXSEG of both connected sockets.
fn handshake(lab: &Lab, extra: &[&str], port: u16) -> (u16, u16, u32, u32, Gateway) {
    let gw = gateway(lab, extra);
    let at_server = tcp_capture(lab, Host::Server);
    let at_client = tcp_capture(lab, Host::Client1);
    let server = SocketAddrV4::new(SERVER_IP, port);
    let listener = lab.tcp_listener(Host::Server, server).expect("listener");
    let src = SocketAddrV4::new(CLIENT1_IP, port);
    let client = lab
        .tcp_connect(Host::Client1, Some(src), server, Duration::from_secs(3))
        .expect("connect through the gateway");
    let (accepted, peer) = listener.accept().expect("accept");
    assert_eq!(peer.ip(), NAT_EXT_IP, "translated");
    let syn = captured_syn(&at_server, peer.port(), port, false);
    let syn_ack = captured_syn(&at_client, port, port, true);
    (
        mss_of(&syn),
        mss_of(&syn_ack),
        tcp_maxseg(&accepted),
        tcp_maxseg(&client),
        gw,
    )
}

#[test]
fn tcp_mss_is_clamped_when_configured() {
    let lab = lab();

    // Offloads on: the SYNs reach the gateway with partial checksums.
    let (syn, syn_ack, srv, cli, mut gw) = handshake(&lab, &["--mss-clamp", "1200"], 5700);
    assert_eq!(syn, 1200, "MSS of the SYN at the server");
    assert_eq!(syn_ack, 1200, "MSS of the SYN-ACK at the client");
    assert!(srv <= 1200, "server socket's MSS {srv}");
    assert!(cli <= 1200, "client socket's MSS {cli}");
    gw.stop().expect("stop");
    assert!(gw.counter("tc_int", "event_mss_clamped") >= 1);
    assert!(gw.counter("tc_ext", "event_mss_clamped") >= 1);

    // Offloads off: complete checksums, which XDP would translate itself;
    // it hands the SYNs to TC to clamp them.
    for h in [Host::Client1, Host::Server] {
        lab.ethtool(h, HOST_IF, &["tx", "off"]).expect("ethtool");
    }
    let (syn, syn_ack, _, _, mut gw) = handshake(&lab, &["--mss-clamp", "1200"], 5701);
    assert_eq!((syn, syn_ack), (1200, 1200));
    gw.stop().expect("stop");
    assert!(gw.counter("xdp_int", "xdp_to_tc_mss_clamp") >= 1);
    assert!(gw.counter("xdp_ext", "xdp_to_tc_mss_clamp") >= 1);

    // A clamp above what the hosts announce changes nothing.
    let (syn, syn_ack, _, _, mut gw) = handshake(&lab, &["--mss-clamp", "1500"], 5702);
    assert_eq!((syn, syn_ack), (1460, 1460));
    gw.stop().expect("stop");
    assert_eq!(gw.counter("tc_int", "event_mss_clamped"), 0);
}

#[test]
fn tcp_mss_is_untouched_without_mss_clamp() {
    let lab = lab();
    let (syn, syn_ack, srv, cli, mut gw) = handshake(&lab, &[], 5703);
    assert_eq!((syn, syn_ack), (1460, 1460), "a 1500-byte MTU's MSS");
    assert!(srv > 1200 && cli > 1200, "socket MSS {srv} / {cli}");
    gw.stop().expect("stop");
    assert_eq!(gw.counter("tc_int", "event_mss_clamped"), 0);
}

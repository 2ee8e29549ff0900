//! End to end: the real loader in the lab's `nat` namespace, real traffic
//! from the clients to the server. Each test also shows that without the
//! programs the same traffic fails, so the kernel is not doing the work.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    time::Duration,
};

use aya::programs::{SchedClassifier, TcAttachType};
use nat_lab::{
    CLIENT1_IP, CLIENT2_IP, EXT_IF, Flow, Gateway, HOST_IF, Host, INT_IF, Lab, LabOptions,
    NAT_EXT_IP, PRIVATE_NET, SERVER_IP, SW_NAT_PORT, accept_within, flags, gateway, lab, lab_with,
    ping, recv_all_within, run_loader, tcp_transfer, udp_exchange, udp_send,
};

const MB: usize = 1 << 20;

/// Whether anything of ours is still attached to `ifname` in `nat`.
fn programs_attached(lab: &Lab, ifname: &str) -> (bool, usize) {
    let out = lab
        .exec(Host::Nat, &["ip", "-d", "link", "show", ifname])
        .expect("ip link");
    let xdp = String::from_utf8_lossy(&out.stdout).contains("prog/xdp");
    let name = ifname.to_string();
    let tcx = lab
        .in_ns(Host::Nat, move || {
            SchedClassifier::query_tcx(&name, TcAttachType::Ingress)
                .map(|(_, progs)| progs.len())
                .expect("querying TCX")
        })
        .expect("in nat");
    (xdp, tcx)
}

/// Neither XDP nor TCX programs on either NIC of `nat`.
fn assert_nothing_attached(lab: &Lab, when: &str) {
    for ifname in [INT_IF, EXT_IF] {
        let left = programs_attached(lab, ifname);
        assert_eq!(left, (false, 0), "{when}: programs left on {ifname}");
    }
}

#[test]
fn tcp_carries_megabytes_through_the_gateway_and_the_server_sees_the_snat_address() {
    let lab = lab();
    let mut gw = gateway(&lab, &[]);
    let report = tcp_transfer(&lab, &Flow::to_server(Host::Client1, 8080), 4 * MB)
        .expect("4 MB each way through the gateway, SHA-256 verified");
    assert_eq!(report.server_saw.ip(), IpAddr::V4(NAT_EXT_IP));
    assert_eq!(report.bytes_to_server, 4 * MB);
    assert_eq!(report.bytes_to_client, 4 * MB);
    gw.stop().expect("stopping the loader");
    // Sockets send with checksum offload (partial checksums): XDP hands
    // those to TC, which translates them.
    let log = gw.log();
    assert!(gw.counter("tc_int", "tc_out_forwarded") > 0, "{log:#?}");
    assert!(gw.counter("tc_ext", "tc_in_forwarded") > 0, "{log:#?}");
}

#[test]
fn with_checksum_offload_off_the_xdp_fast_path_translates_and_checksums_stay_valid() {
    let lab = lab();
    lab.complete_checksums_on_the_wire().expect("ethtool");
    let mut gw = gateway(&lab, &[]);
    let report = tcp_transfer(&lab, &Flow::to_server(Host::Client1, 8081), 2 * MB)
        .expect("2 MB each way, SHA-256 verified; the receivers verify every checksum");
    assert_eq!(report.server_saw.ip(), IpAddr::V4(NAT_EXT_IP));
    let udp = udp_exchange(&lab, &Flow::to_server(Host::Client1, 5300), 20).expect("UDP exchange");
    assert_eq!(udp.answered, 20);
    gw.stop().expect("stopping the loader");
    let out = gw.counter("xdp_int", "xdp_out_forwarded");
    let back = gw.counter("xdp_ext", "xdp_in_forwarded");
    assert!(
        out > 1000,
        "outbound packets on the XDP fast path: {out}\n{:#?}",
        gw.log()
    );
    assert!(
        back > 1000,
        "inbound packets on the XDP fast path: {back}\n{:#?}",
        gw.log()
    );
}

#[test]
fn udp_exchange_through_the_gateway_uses_the_snat_address() {
    let lab = lab();
    let _gw = gateway(&lab, &[]);
    let report = udp_exchange(&lab, &Flow::to_server(Host::Client1, 5301), 50)
        .expect("UDP exchange through the gateway");
    assert_eq!(report.answered, 50);
    assert_eq!(
        report.single_source().map(|a| a.ip()),
        Some(IpAddr::V4(NAT_EXT_IP)),
        "every datagram from one translated source: {:?}",
        report.server_saw
    );
}

#[test]
fn ping_through_the_gateway_is_answered() {
    let lab = lab();
    let _gw = gateway(&lab, &[]);
    let r = ping(&lab, Host::Client1, SERVER_IP, 5, Duration::from_secs(5)).expect("ping runs");
    assert!(r.all_replied(), "{}", r.output);
}

/// A TOML config file (`--config`) sets what its keys say, and a flag on
/// the command line wins over a key: the external port the server sees
/// lies in the file's `port-range`, the file's `filtering` lets a datagram
/// from another port of the server in, and with `--port-range` given too
/// the port lies in the flag's range.
#[test]
fn a_config_file_sets_port_range_and_filtering_and_a_flag_overrides_it() {
    struct RemoveOnDrop(PathBuf);
    impl Drop for RemoveOnDrop {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let file = RemoveOnDrop(
        std::env::temp_dir().join(format!("natlab-{}-nat-loader.toml", std::process::id())),
    );
    std::fs::write(
        &file.0,
        "port-range = \"20000-20099\"\nfiltering = \"endpoint-independent\"\n",
    )
    .expect("writing the config file");
    let config = file.0.to_str().expect("a UTF-8 path");
    let lab = lab();
    // A source port outside both ranges, so the gateway must pick one.
    let client = SocketAddrV4::new(CLIENT1_IP, 45100);
    let mapping_to = |port: u16| -> SocketAddrV4 {
        let flow = Flow::to_server(Host::Client1, port)
            .src_ip(CLIENT1_IP)
            .src_port(client.port());
        let report = udp_exchange(&lab, &flow, 5).expect("UDP exchange through the gateway");
        match report.single_source() {
            Some(SocketAddr::V4(a)) if *a.ip() == NAT_EXT_IP => a,
            other => panic!("the server saw {other:?}: {:?}", report.server_saw),
        }
    };

    let mut gw = Gateway::start(&lab, &["--config", config]).expect("nat-loader with the file");
    let mapped = mapping_to(5310);
    assert!(
        (20000..=20099).contains(&mapped.port()),
        "{mapped} is outside the file's port-range"
    );
    let c = lab
        .udp_socket(Host::Client1, client)
        .expect("client socket");
    udp_send(
        &lab,
        Host::Server,
        Some(SocketAddrV4::new(SERVER_IP, 5311)),
        mapped,
        b"other port",
        1,
    )
    .expect("sending from another server port");
    let got = recv_all_within(&c, Duration::from_millis(800)).expect("receiving");
    assert!(
        got.iter()
            .any(|(from, _)| *from == SocketAddr::V4(SocketAddrV4::new(SERVER_IP, 5311))),
        "endpoint-independent filtering (the file's) let nothing in: {got:?}\n{:#?}",
        gw.log()
    );
    drop(c);
    gw.stop().expect("stopping the loader");

    let mut gw = Gateway::start(&lab, &["--config", config, "--port-range", "30000-30099"])
        .expect("nat-loader with the file and a flag");
    let mapped = mapping_to(5312);
    assert!(
        (30000..=30099).contains(&mapped.port()),
        "{mapped} is outside the flag's port-range (the file's is 20000-20099)"
    );
    gw.stop().expect("stopping the loader");
}

#[test]
fn two_clients_with_the_same_source_port_both_work() {
    let lab = lab();
    let _gw = gateway(&lab, &[]);
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| {
            let f = Flow::to_server(Host::Client1, 8082)
                .src_ip(CLIENT1_IP)
                .src_port(45000);
            tcp_transfer(&lab, &f, MB)
        });
        let b = s.spawn(|| {
            let f = Flow::to_server(Host::Client2, 8083)
                .src_ip(CLIENT2_IP)
                .src_port(45000);
            tcp_transfer(&lab, &f, MB)
        });
        (a.join().expect("thread"), b.join().expect("thread"))
    });
    let (a, b) = (
        a.expect("client1's transfer"),
        b.expect("client2's transfer"),
    );
    assert_eq!(a.server_saw.ip(), IpAddr::V4(NAT_EXT_IP));
    assert_eq!(b.server_saw.ip(), IpAddr::V4(NAT_EXT_IP));

    // UDP: both to the same server port at once, so their external ports
    // must differ for the replies to find their way back.
    let ua = Flow::to_server(Host::Client1, 5302)
        .src_ip(CLIENT1_IP)
        .src_port(45001);
    let ub = Flow::to_server(Host::Client2, 5303)
        .src_ip(CLIENT2_IP)
        .src_port(45001);
    let ra = udp_exchange(&lab, &ua, 10).expect("client1 UDP");
    let rb = udp_exchange(&lab, &ub, 10).expect("client2 UDP");
    assert_eq!((ra.answered, rb.answered), (10, 10));
}

#[test]
fn unsolicited_inbound_from_the_internet_reaches_nothing_inside() {
    let lab = lab();
    // Give the "Internet" a route to the private subnet, as an attacker on
    // the ext link would have: only the gateway stands in the way.
    let net = format!("{PRIVATE_NET}/24");
    lab.exec(
        Host::Router,
        &["ip", "route", "add", &net, "via", &NAT_EXT_IP.to_string()],
    )
    .expect("route to the private subnet");
    let probe = |lab: &Lab| -> (usize, bool) {
        let sock = lab
            .udp_socket(
                Host::Client1,
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 6000),
            )
            .expect("client UDP socket");
        let listener = lab
            .tcp_listener(
                Host::Client1,
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 6001),
            )
            .expect("client TCP listener");
        udp_send(
            lab,
            Host::Server,
            None,
            SocketAddrV4::new(CLIENT1_IP, 6000),
            b"unsolicited",
            5,
        )
        .expect("sending");
        // Long enough for a SYN retransmission (1 s), in case the first SYN
        // waited on neighbour resolution.
        let _ = lab.tcp_connect(
            Host::Server,
            None,
            SocketAddrV4::new(CLIENT1_IP, 6001),
            Duration::from_secs(3),
        );
        let got = recv_all_within(&sock, Duration::from_millis(500)).expect("receiving");
        let accepted = accept_within(&listener, Duration::from_millis(200)).expect("accepting");
        (got.len(), accepted.is_some())
    };
    // Control: without the gateway's programs the kernel forwards it in.
    let (udp, tcp) = probe(&lab);
    assert!(
        udp > 0 && tcp,
        "the lab must let it through without the programs: udp {udp} tcp {tcp}"
    );
    let mut gw = gateway(&lab, &[]);
    let (udp, tcp) = probe(&lab);
    gw.stop().expect("stopping the loader");
    assert_eq!(udp, 0, "no unsolicited datagram reaches the client");
    assert!(!tcp, "no unsolicited connection reaches the client");
    let dropped =
        gw.counter("xdp_ext", "drop_unsolicited") + gw.counter("tc_ext", "drop_unsolicited");
    assert!(dropped > 0, "counted as unsolicited drops: {:#?}", gw.log());
}

#[test]
fn without_the_loader_traffic_fails_and_after_it_stops_nothing_of_it_remains() {
    let lab = lab();
    let flow = Flow::to_server(Host::Client1, 8084).timeout(Duration::from_secs(3));
    let udp = Flow::to_server(Host::Client1, 5304).timeout(Duration::from_secs(2));
    // The kernel forwards (ip_forward is on) but translates nothing, and
    // the Internet has no route back to a private address.
    assert!(
        tcp_transfer(&lab, &flow, 64 * 1024).is_err(),
        "TCP must fail without the gateway"
    );
    assert!(udp_exchange(&lab, &udp, 3).map(|r| r.answered).unwrap_or(0) == 0);
    let r = ping(&lab, Host::Client1, SERVER_IP, 2, Duration::from_secs(2)).expect("ping runs");
    assert_eq!(r.received, 0, "{}", r.output);

    let mut gw = gateway(&lab, &[]);
    assert_eq!(programs_attached(&lab, INT_IF), (true, 1));
    assert_eq!(programs_attached(&lab, EXT_IF), (true, 1));
    tcp_transfer(&lab, &Flow::to_server(Host::Client1, 8085), 64 * 1024)
        .expect("TCP works with the gateway");
    let probe = SocketAddrV4::new(nat_lab::NAT_INT_IP, nat_common::DEFAULT_PROBE_PORT);
    lab.tcp_connect(Host::Client1, None, probe, Duration::from_secs(2))
        .expect("the health probe port answers while the gateway runs");
    let status = gw.stop().expect("stopping the loader");
    assert!(status.success(), "clean exit: {status:?}\n{:#?}", gw.log());
    assert!(
        lab.tcp_connect(Host::Client1, None, probe, Duration::from_secs(2))
            .is_err(),
        "the health probe port is closed once the loader stopped"
    );

    assert_nothing_attached(&lab, "after the loader stopped");
    let flow = Flow::to_server(Host::Client1, 8086).timeout(Duration::from_secs(3));
    assert!(
        tcp_transfer(&lab, &flow, 64 * 1024).is_err(),
        "TCP fails again once it stopped"
    );
}

#[test]
fn idle_flows_are_swept_after_their_timeout() {
    let lab = lab();
    let timeouts = flags("--udp-timeout 1 --icmp-timeout 1 --sweep-interval 1");
    let gw = gateway(&lab, &timeouts);
    udp_exchange(&lab, &Flow::to_server(Host::Client1, 5305), 3).expect("UDP");
    let r = ping(&lab, Host::Client1, SERVER_IP, 1, Duration::from_secs(3)).expect("ping runs");
    assert!(r.all_replied(), "{}", r.output);
    // The two flows may expire in one sweep or in two (the UDP one may go
    // before the ping even starts).
    let field = |line: &str, key: &str| -> usize {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key).and_then(|n| n.parse().ok()))
            .unwrap_or(0)
    };
    let sweeps = || -> Vec<String> {
        gw.log()
            .into_iter()
            .filter(|l| l.contains("swept conntrack"))
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while sweeps().iter().map(|l| field(l, "expired=")).sum::<usize>() < 2
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let sweeps = sweeps();
    let expired: usize = sweeps.iter().map(|l| field(l, "expired=")).sum();
    assert_eq!(
        expired, 2,
        "the UDP and ICMP flows were not swept: {sweeps:#?}"
    );
    assert!(
        sweeps
            .iter()
            .any(|l| field(l, "remaining=") == 0 && l.contains("remaining=0")),
        "{sweeps:#?}"
    );
    assert!(
        sweeps.iter().all(|l| field(l, "orphans=") == 0),
        "{sweeps:#?}"
    );
}

#[test]
fn loader_enables_ip_forwarding_and_restores_it_on_exit() {
    let lab = lab_with(LabOptions::nat_forwarding_off());
    assert_eq!(ip_forward(&lab), "0");
    let mut gw = gateway(&lab, &[]);
    assert_eq!(ip_forward(&lab), "1");
    tcp_transfer(&lab, &Flow::to_server(Host::Client1, 8087), 64 * 1024)
        .expect("TCP through the gateway");
    gw.stop().expect("stop");
    assert_eq!(ip_forward(&lab), "0", "restored on exit");
}

/// `net.ipv4.ip_forward` in `nat`.
fn ip_forward(lab: &Lab) -> String {
    lab.read_sysctl(Host::Nat, "net/ipv4/ip_forward")
        .expect("reading ip_forward")
}

#[test]
fn bad_invocations_fail_with_one_clear_line_and_leave_the_host_as_it_was() {
    let lab = lab_with(LabOptions::nat_forwarding_off());
    lab.exec(
        Host::Nat,
        &[
            "ip", "link", "add", "noaddr", "type", "veth", "peer", "name", "noaddr-p",
        ],
    )
    .expect("an interface without an address");
    // (command prefix, the loader's arguments, what its error must say)
    let as_nobody = "setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all";
    let cases = [
        ("", "--ext eth9 --int int", "interface eth9 not found"),
        ("", "--ext ext --int nope0", "interface nope0 not found"),
        ("", "--ext ext --int ext", "are the same interface"),
        ("", "--ext noaddr --int int", "has no IPv4 address"),
        (
            "",
            "--ext ext --int int --port-range 2000-1000",
            "MIN <= MAX",
        ),
        ("", "--ext ext --int int --max-flows 0", "at least one flow"),
        (
            "",
            "--ext ext --int int --max-flows 16777217",
            "above the largest table, 16777216 flows",
        ),
        (
            "",
            "--ext ext --int int --snat-ip 10.0.0.0/16",
            "more than 64 addresses",
        ),
        (
            "",
            "--ext ext --int int --max-fragments 0",
            "at least one datagram",
        ),
        ("", "--int int", "--ext"),
        (as_nobody, "--ext ext --int int", "needs root"),
    ];
    for (prefix, args, expected) in cases {
        let (prefix, args) = (flags(prefix), flags(args));
        let (ok, stderr) = run_loader(&lab, &prefix, &args).expect("running the loader");
        assert!(!ok, "{args:?} must fail");
        assert!(
            stderr.contains(expected),
            "{args:?}: expected {expected:?} in:\n{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?} panicked:\n{stderr}");
        let error_lines = stderr.lines().filter(|l| l.contains("error")).count();
        assert!(
            error_lines <= 1,
            "{args:?}: one error line expected:\n{stderr}"
        );
        assert_nothing_attached(&lab, &format!("{args:?}"));
        assert_eq!(ip_forward(&lab), "0", "{args:?} changed forwarding");
    }
}

/// Sends a UDP datagram client1 → server:6100 as a raw frame with
/// destination MAC `dst_mac`, from the switch's port toward the gateway
/// (as a switch flooding the frame would), `count` times.
fn inject_to_gateway(lab: &Lab, dst_mac: [u8; 6], count: usize) {
    use nat_lab::packet::{Csum, L4 as PL4, Packet};
    let frame = Packet {
        dst_mac,
        src_mac: lab.mac(Host::Client1, HOST_IF).expect("client1's MAC"),
        src: CLIENT1_IP,
        dst: SERVER_IP,
        ttl: 64,
        options: vec![],
        l4: PL4::Udp {
            sport: 6101,
            dport: 6100,
        },
        payload: b"flooded".to_vec(),
        csum: Csum::Full,
    }
    .build();
    let ifindex = lab.ifindex(Host::Sw, SW_NAT_PORT).expect("ifindex") as i32;
    lab.in_ns(Host::Sw, move || {
        // SAFETY: plain libc calls on a socket this closure owns.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            assert!(fd >= 0, "packet socket");
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = ifindex;
            sll.sll_halen = 6;
            sll.sll_addr[..6].copy_from_slice(&dst_mac);
            for _ in 0..count {
                let n = libc::sendto(
                    fd,
                    frame.as_ptr() as *const libc::c_void,
                    frame.len(),
                    0,
                    &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                );
                assert_eq!(n as usize, frame.len(), "sendto");
            }
            libc::close(fd);
        }
    })
    .expect("in the switch namespace");
}

/// In a fresh lab with the gateway: injects 5 frames toward the MAC
/// `dst_mac` picks (see [`inject_to_gateway`]); the datagrams that reach
/// the server within `within`, and the stopped gateway.
fn server_gets_frames_to(
    dst_mac: impl Fn(&Lab) -> [u8; 6],
    within: Duration,
) -> (Vec<(SocketAddr, Vec<u8>)>, Gateway) {
    let lab = lab();
    let mut gw = gateway(&lab, &[]);
    let server = lab
        .udp_socket(Host::Server, SocketAddrV4::new(SERVER_IP, 6100))
        .expect("server socket");
    inject_to_gateway(&lab, dst_mac(&lab), 5);
    let got = recv_all_within(&server, within).expect("receiving");
    gw.stop().expect("stop");
    (got, gw)
}

#[test]
fn frames_addressed_to_another_machines_mac_are_not_translated() {
    let (got, gw) =
        server_gets_frames_to(|_| [0x02, 0, 0, 0, 0, 0x99], Duration::from_millis(1500));
    assert!(
        got.is_empty(),
        "a frame for another MAC was translated: {got:?}"
    );
    assert_eq!(
        gw.counter("xdp_int", "pass_other_host"),
        5,
        "{:#?}",
        gw.log()
    );
    // The control: the same frames to the gateway's MAC get through (the
    // first datagram may wait for neighbour resolution).
    let int_mac = |lab: &Lab| lab.mac(Host::Nat, INT_IF).expect("int's MAC");
    let (got, _) = server_gets_frames_to(int_mac, Duration::from_secs(3));
    assert!(!got.is_empty(), "the control did not get through");
}

//! The egress policy end to end: the real loader in the lab with a config
//! file of `[[policy.rule]]`s, real connections from the clients. Allowed
//! flows are translated; denied ones get their rule's answer (silence, an
//! ICMP "administratively prohibited", a TCP reset); anti-spoofing drops
//! sources outside the inside prefixes; SIGHUP swaps the policy under live
//! streams, and a bad file changes nothing.

use std::{
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    path::PathBuf,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use nat_lab::{
    EchoStreams, Flow, Gateway, Host, Lab, NAT_EXT_IP, SERVER_IP, gateway, lab, recv_all_within,
    tcp_transfer, udp_exchange, udp_send,
};

/// A config file for one test, removed when dropped.
struct ConfigFile(PathBuf);

impl ConfigFile {
    fn new(text: &str) -> ConfigFile {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "natlab-policy-{}-{}.toml",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let f = ConfigFile(path);
        f.write(text);
        f
    }

    fn write(&self, text: &str) {
        std::fs::write(&self.0, text).expect("writing the config file");
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("utf-8 path")
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A `[[policy.rule]]` table.
fn rule(name: &str, keys: &str) -> String {
    format!("[[policy.rule]]\nname = \"{name}\"\n{keys}\n")
}

/// The loader with the config file `file` and `extra` flags.
#[track_caller]
fn gateway_with(lab: &Lab, file: &ConfigFile, extra: &[&str]) -> Gateway {
    let mut args = vec!["--config", file.path()];
    args.extend_from_slice(extra);
    gateway(lab, &args)
}

fn server(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(SERVER_IP, port)
}

/// Connects from client1 to the server's `port` (a listener is there):
/// the result and how long it took.
fn connect(lab: &Lab, port: u16, timeout: Duration) -> (std::io::Result<TcpStream>, Duration) {
    let _listener = lab
        .tcp_listener(Host::Server, server(port))
        .expect("listener");
    try_connect(lab, port, timeout)
}

/// [`connect`] without a listener of its own.
fn try_connect(lab: &Lab, port: u16, timeout: Duration) -> (std::io::Result<TcpStream>, Duration) {
    let start = Instant::now();
    let r = lab
        .tcp_connect(Host::Client1, None, server(port), timeout)
        .map_err(|e| {
            e.downcast::<std::io::Error>()
                .unwrap_or_else(|e| std::io::Error::other(format!("{e:#}")))
        });
    (r, start.elapsed())
}

#[track_caller]
fn assert_connects(lab: &Lab, port: u16) {
    let (r, _) = connect(lab, port, Duration::from_secs(5));
    if let Err(e) = r {
        panic!("TCP to port {port} must be allowed: {e}");
    }
}

#[track_caller]
fn assert_silently_dropped(lab: &Lab, port: u16) {
    let (r, _) = connect(lab, port, Duration::from_secs(2));
    match r {
        Ok(_) => panic!("TCP to port {port} must be denied"),
        Err(e) => assert!(
            matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock)
                || e.to_string().contains("timed out"),
            "a silent drop times out; port {port}: {e}"
        ),
    }
}

/// Sends SIGHUP to the loader and waits for its verdict on the file.
fn reload(gw: &Gateway, expect: &str) -> String {
    let pid = gw.pid().expect("loader running") as i32;
    let before = gw.log().len();
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0, "kill -HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(l) = gw.log()[before..].iter().find(|l| l.contains("SIGHUP")) {
            assert!(l.contains(expect), "reload: {l}");
            return l.clone();
        }
        assert!(Instant::now() < deadline, "no reload line: {:#?}", gw.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The flows rule `name` decided, from the loader's exit log.
fn hits(gw: &Gateway, name: &str) -> u64 {
    let log = gw.log();
    let key = format!("rule={name} ");
    log.iter()
        .filter(|l| l.contains("policy hits"))
        .find(|l| l.contains(&key))
        .and_then(|l| l.rsplit("flows=").next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no hits logged for rule {name}: {log:#?}"))
}

#[test]
fn an_allowed_destination_works_and_a_denied_one_is_dropped_and_counted_per_rule() {
    let lab = lab();
    let file = ConfigFile::new(&format!(
        "{}{}",
        rule(
            "no-udp-5300",
            "protocol = \"udp\"\nports = \"5300\"\naction = \"deny\""
        ),
        rule(
            "web",
            "destination = \"198.51.100.0/24\"\nprotocol = \"tcp\"\nports = \"8080\"\n\
             action = \"allow\""
        ),
    ));
    let mut gw = gateway_with(&lab, &file, &["--policy-default", "drop"]);
    let report = tcp_transfer(&lab, &Flow::to_server(Host::Client1, 8080), 1 << 16)
        .expect("allowed destination");
    assert_eq!(report.server_saw.ip(), NAT_EXT_IP);
    let udp = udp_exchange(
        &lab,
        &Flow::to_server(Host::Client1, 5300).timeout(Duration::from_secs(2)),
        5,
    );
    assert!(
        udp.as_ref().map_or(true, |r| r.answered == 0),
        "denied UDP got through: {udp:?}"
    );
    // Not matched by either rule: the default (drop).
    assert_silently_dropped(&lab, 8081);
    gw.stop().expect("stop");
    // The UDP datagram and the SYN (and its retransmissions).
    assert!(gw.counter("tc_int", "drop_policy_denied") >= 2);
    assert!(hits(&gw, "no-udp-5300") >= 1, "{:#?}", gw.log());
    assert_eq!(hits(&gw, "web"), 1);
    assert!(hits(&gw, "default") >= 1);
}

#[test]
fn a_denied_tcp_flow_answered_with_a_reset_is_refused_at_once() {
    let lab = lab();
    let file = ConfigFile::new(&rule(
        "no-8090",
        "protocol = \"tcp\"\nports = \"8090\"\naction = \"deny\"\nanswer = \"tcp-reset\"",
    ));
    let mut gw = gateway_with(&lab, &file, &[]);
    let (r, took) = connect(&lab, 8090, Duration::from_secs(5));
    let e = r.expect_err("denied");
    assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{e}");
    assert!(took < Duration::from_secs(1), "refused in {took:?}");
    assert_connects(&lab, 8091);
    gw.stop().expect("stop");
    assert!(gw.counter("tc_int", "drop_policy_reset") >= 1);
    assert!(gw.counter("tc_int", "event_policy_rst_sent") >= 1);
    assert_eq!(hits(&gw, "no-8090"), 1);
}

#[test]
fn a_denied_flow_answered_with_icmp_prohibited_fails_with_host_unreachable() {
    let lab = lab();
    let file = ConfigFile::new(&rule(
        "no-8092",
        "destination = \"198.51.100.10\"\nprotocol = \"tcp\"\nports = \"8092\"\n\
         action = \"deny\"\nanswer = \"icmp-prohibited\"",
    ));
    let mut gw = gateway_with(&lab, &file, &[]);
    let (r, took) = connect(&lab, 8092, Duration::from_secs(5));
    let e = r.expect_err("denied");
    assert_eq!(e.raw_os_error(), Some(libc::EHOSTUNREACH), "{e}");
    assert!(took < Duration::from_secs(1), "failed in {took:?}");
    assert_connects(&lab, 8093);
    gw.stop().expect("stop");
    assert!(gw.counter("tc_int", "drop_policy_prohibited") >= 1);
    assert!(gw.counter("tc_int", "event_policy_icmp_sent") >= 1);
}

#[test]
fn a_rules_port_range_protocol_and_inside_prefix_are_respected_first_match_winning() {
    let lab = lab();
    let file = ConfigFile::new(&format!(
        "{}{}",
        // Client2 may; checked first.
        rule(
            "client2-9000",
            "inside = \"10.1.0.12/32\"\nprotocol = \"tcp\"\nports = \"9000-9001\"\naction = \"allow\""
        ),
        rule(
            "no-9000",
            "protocol = \"tcp\"\nports = \"9000-9001\"\naction = \"deny\"\nanswer = \"tcp-reset\""
        ),
    ));
    let mut gw = gateway_with(&lab, &file, &[]);
    for port in [9000, 9001] {
        let (r, _) = connect(&lab, port, Duration::from_secs(5));
        let e = r.expect_err("client1 is denied");
        assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "port {port}: {e}");
    }
    for port in [8999, 9002] {
        assert_connects(&lab, port);
    }
    // UDP to the same ports: not this rule's protocol.
    let udp = udp_exchange(&lab, &Flow::to_server(Host::Client1, 9000), 3).expect("UDP 9000");
    assert_eq!(udp.answered, 3);
    // Client2 matches the first rule.
    let tcp = tcp_transfer(&lab, &Flow::to_server(Host::Client2, 9001), 1 << 12);
    assert!(tcp.is_ok(), "client2 is allowed: {tcp:?}");
    gw.stop().expect("stop");
    assert_eq!(hits(&gw, "no-9000"), 2);
    assert_eq!(hits(&gw, "client2-9000"), 1);
}

#[test]
fn spoofed_inside_sources_are_dropped_and_counted_unless_anti_spoofing_is_off() {
    let lab = lab();
    // An address outside --int's subnet, on client1.
    let spoofed = Ipv4Addr::new(10, 77, 0, 5);
    lab.exec(
        Host::Client1,
        &["ip", "addr", "add", &format!("{spoofed}/32"), "dev", "eth0"],
    )
    .expect("ip addr");
    let file = ConfigFile::new("");
    let from = Some(SocketAddrV4::new(spoofed, 0));
    let arrivals = |port: u16| {
        let socket = lab
            .udp_socket(Host::Server, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
            .expect("bind");
        udp_send(&lab, Host::Client1, from, server(port), b"spoofed", 5).expect("send");
        recv_all_within(&socket, Duration::from_secs(2)).expect("receive")
    };
    let mut gw = gateway_with(&lab, &file, &[]);
    let seen = arrivals(5400);
    assert!(
        seen.is_empty(),
        "spoofed datagrams reached the server: {seen:?}"
    );
    // The subnet's own address still works.
    let ok = udp_exchange(&lab, &Flow::to_server(Host::Client1, 5401), 3).expect("UDP");
    assert_eq!(ok.answered, 3);
    gw.stop().expect("stop");
    assert!(gw.counter("tc_int", "drop_spoofed_source") >= 5);

    let mut gw = gateway_with(&lab, &file, &["--no-anti-spoofing"]);
    let seen = arrivals(5402);
    assert_eq!(
        seen.len(),
        5,
        "with --no-anti-spoofing the flow is translated"
    );
    assert!(seen.iter().all(|(from, _)| from.ip() == NAT_EXT_IP));
    gw.stop().expect("stop");
    assert_eq!(gw.counter("tc_int", "drop_spoofed_source"), 0);
}

#[test]
fn a_reload_under_20_live_tcp_streams_changes_new_flows_verdicts_and_breaks_none() {
    let lab = lab();
    let file = ConfigFile::new(&rule(
        "unrelated",
        "protocol = \"udp\"\nports = \"1\"\naction = \"deny\"",
    ));
    let gw = gateway_with(&lab, &file, &[]);
    let streams =
        EchoStreams::start(&lab, Host::Client1, Host::Server, server(7000), 20).expect("streams");
    assert_connects(&lab, 7001);
    // Deny the streams' own port too: established flows are not judged
    // again.
    file.write(&rule(
        "no-7000",
        "protocol = \"tcp\"\nports = \"7000-7001\"\naction = \"deny\"\nanswer = \"tcp-reset\"",
    ));
    reload(&gw, "egress policy reloaded");
    for port in [7000, 7001] {
        let (r, _) = try_connect(&lab, port, Duration::from_secs(5));
        let e = r.expect_err("new flows follow the new policy");
        assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "port {port}: {e}");
    }
    streams
        .wait_for_round_trips(20, Duration::from_secs(30))
        .expect("the streams go on");
    let reports = streams.finish();
    let broken: Vec<_> = reports.iter().filter(|r| r.error.is_some()).collect();
    assert!(broken.is_empty(), "broken streams: {broken:#?}");
    assert_eq!(reports.len(), 20);
}

#[test]
fn an_invalid_file_leaves_the_old_policy_in_force_with_a_one_line_error() {
    let lab = lab();
    let good = rule(
        "no-7002",
        "protocol = \"tcp\"\nports = \"7002\"\naction = \"deny\"\nanswer = \"tcp-reset\"",
    );
    let file = ConfigFile::new(&good);
    let gw = gateway_with(&lab, &file, &[]);
    // Line 7: the second rule (its header).
    file.write(&format!(
        "{good}{}",
        rule("bad", "protocol = \"sctp\"\naction = \"deny\"")
    ));
    let line = reload(&gw, "not reloaded");
    assert!(
        line.contains(file.path())
            && line.contains("line 7:")
            && line.contains("\"sctp\" is not a protocol"),
        "{line}"
    );
    let (r, _) = connect(&lab, 7002, Duration::from_secs(5));
    assert_eq!(
        r.expect_err("still denied").kind(),
        ErrorKind::ConnectionRefused
    );
    assert_connects(&lab, 7003);
}

#[test]
fn thousands_of_rules_load_and_decide_by_first_match() {
    let lab = lab();
    // 4,096 rules: 4,094 for other destinations (10.200.0.0/16's /32s and
    // 198.51.100.0/24's neighbours), then the two that decide here.
    let mut text = String::new();
    for i in 0..4094u32 {
        let dst = if i < 4000 {
            Ipv4Addr::from(0x0ac8_0000 | i)
        } else {
            Ipv4Addr::from(0xc633_6500 | ((i - 4000) % 256))
        };
        let dst = if dst == SERVER_IP {
            Ipv4Addr::new(10, 201, 0, 1)
        } else {
            dst
        };
        text += &rule(
            &format!("other-{i}"),
            &format!("destination = \"{dst}\"\nprotocol = \"tcp\"\naction = \"deny\""),
        );
    }
    text += &rule(
        "server-7100",
        "destination = \"198.51.100.10\"\nprotocol = \"tcp\"\nports = \"7100\"\n\
         action = \"deny\"\nanswer = \"tcp-reset\"",
    );
    text += &rule(
        "server",
        "destination = \"198.51.100.0/24\"\naction = \"allow\"",
    );
    let file = ConfigFile::new(&text);
    let mut gw = gateway_with(&lab, &file, &["--policy-default", "drop"]);
    let (r, _) = connect(&lab, 7100, Duration::from_secs(5));
    assert_eq!(r.expect_err("denied").kind(), ErrorKind::ConnectionRefused);
    assert_connects(&lab, 7101);
    gw.stop().expect("stop");
    assert_eq!(hits(&gw, "server-7100"), 1);
    assert_eq!(hits(&gw, "server"), 1);
}

#[test]
fn policy_apply_recheck_ends_the_established_flows_the_new_policy_denies_and_keeps_the_others() {
    let bpffs = nat_lab::Bpffs::new().expect("mounting a bpffs for the pins");
    let pins = bpffs.pin_dir();
    let pins = pins.to_str().expect("utf-8 path");
    let lab = lab();
    let file = ConfigFile::new("");
    let gw = gateway_with(&lab, &file, &["--bpffs-dir", pins]);
    let doomed =
        EchoStreams::start(&lab, Host::Client1, Host::Server, server(7200), 3).expect("streams");
    let kept =
        EchoStreams::start(&lab, Host::Client1, Host::Server, server(7210), 3).expect("streams");
    file.write(&rule(
        "no-7200",
        "protocol = \"tcp\"\nports = \"7200\"\naction = \"deny\"\nanswer = \"tcp-reset\"",
    ));
    let before = gw.log().len();
    let (ok, stderr) = nat_lab::run_loader(
        &lab,
        &[],
        &["policy", "apply", "--recheck", "--bpffs-dir", pins],
    )
    .expect("nat-loader policy apply");
    assert!(ok, "policy apply failed: {stderr}");
    let line = gw
        .wait_for_log(
            &["SIGUSR1", "egress policy reloaded"],
            Duration::from_secs(10),
        )
        .unwrap_or_else(|| panic!("no reload: {:#?}", &gw.log()[before..]));
    assert!(line.contains("ended=3"), "{line}");
    // The next packet of each denied stream finds no session and is
    // answered with a reset; meanwhile the others go on (50 round trips
    // take the denied ones well past their next packet).
    kept.wait_for_round_trips(50, Duration::from_secs(30))
        .expect("the allowed streams go on");
    let doomed = doomed.finish();
    assert!(
        doomed.iter().all(|r| r.error.is_some()),
        "every denied stream ended: {doomed:#?}"
    );
    let kept = kept.finish();
    assert!(
        kept.iter().all(|r| r.error.is_none()),
        "no allowed stream broke: {kept:#?}"
    );
}

#[test]
fn on_the_xdp_fast_path_a_silent_deny_drops_in_xdp_and_answers_are_left_to_tc() {
    let lab = lab();
    // Complete checksums: XDP, not TC, sees the new flows first.
    lab.complete_checksums_on_the_wire().expect("ethtool");
    let file = ConfigFile::new(&format!(
        "{}{}",
        rule(
            "drop-7300",
            "protocol = \"tcp\"\nports = \"7300\"\naction = \"deny\""
        ),
        rule(
            "reset-7301",
            "protocol = \"tcp\"\nports = \"7301\"\naction = \"deny\"\nanswer = \"tcp-reset\""
        ),
    ));
    let mut gw = gateway_with(&lab, &file, &[]);
    assert_silently_dropped(&lab, 7300);
    let (r, took) = connect(&lab, 7301, Duration::from_secs(5));
    assert_eq!(r.expect_err("denied").kind(), ErrorKind::ConnectionRefused);
    assert!(took < Duration::from_secs(1), "refused in {took:?}");
    assert_connects(&lab, 7302);
    gw.stop().expect("stop");
    assert!(gw.counter("xdp_int", "drop_policy_denied") >= 1);
    assert_eq!(gw.counter("tc_int", "drop_policy_denied"), 0);
    assert!(gw.counter("xdp_int", "xdp_to_tc_policy_answer") >= 1);
    assert!(gw.counter("tc_int", "event_policy_rst_sent") >= 1);
    // One hit per flow decision: XDP's hand-over counted none.
    assert_eq!(hits(&gw, "reset-7301"), 1);
    assert!(hits(&gw, "drop-7300") >= 1);
}

#[test]
fn policy_show_prints_the_running_policy_with_names_destinations_and_hits() {
    let bpffs = nat_lab::Bpffs::new().expect("mounting a bpffs for the pins");
    let pins = bpffs.pin_dir();
    let pins = pins.to_str().expect("utf-8 path");
    let lab = lab();
    let file = ConfigFile::new(&format!(
        "policy-default = \"icmp-prohibited\"\n{}{}",
        rule(
            "web",
            "destination = \"198.51.100.0/24\"\nprotocol = \"tcp\"\nports = \"8000-8100\"\n\
             action = \"allow\""
        ),
        rule(
            "no-7400",
            "inside = \"10.1.0.0/24\"\nprotocol = \"tcp\"\nports = \"7400\"\naction = \"deny\"\n\
             answer = \"tcp-reset\""
        ),
    ));
    let _gw = gateway_with(&lab, &file, &["--bpffs-dir", pins]);
    assert_connects(&lab, 8050);
    let (r, _) = connect(&lab, 7400, Duration::from_secs(5));
    assert_eq!(r.expect_err("denied").kind(), ErrorKind::ConnectionRefused);
    let bin = nat_lab::loader_path().expect("loader");
    let bin = bin.to_str().expect("utf-8 path");
    let out = lab
        .exec(
            Host::Nat,
            &[
                bin,
                "policy",
                "show",
                "--bpffs-dir",
                pins,
                "--config",
                file.path(),
            ],
        )
        .expect("nat-loader policy show");
    let text = String::from_utf8_lossy(&out.stdout);
    let row = |name: &str| {
        text.lines()
            .find(|l| l.split_whitespace().any(|w| w == name))
            .unwrap_or_else(|| panic!("no row for {name}:\n{text}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        row("web"),
        [
            "1",
            "web",
            "0.0.0.0/0",
            "198.51.100.0/24",
            "tcp",
            "8000-8100",
            "allow",
            "1"
        ],
        "{text}"
    );
    assert_eq!(
        row("no-7400"),
        [
            "2",
            "no-7400",
            "10.1.0.0/24",
            "0.0.0.0/0",
            "tcp",
            "7400",
            "deny",
            "(tcp-reset)",
            "1"
        ],
        "{text}"
    );
    assert_eq!(
        row("default"),
        [
            "default",
            "0.0.0.0/0",
            "0.0.0.0/0",
            "any",
            "any",
            "deny",
            "(icmp-prohibited)",
            "0"
        ],
        "{text}"
    );
}

#[test]
fn a_flow_opened_from_outside_on_an_endpoint_independent_binding_is_judged_as_egress() {
    let lab = lab();
    let file = ConfigFile::new(&rule(
        "no-udp-with-6000",
        "destination = \"198.51.100.10\"\nprotocol = \"udp\"\nports = \"6000\"\n\
         action = \"deny\"\nanswer = \"icmp-prohibited\"",
    ));
    let mut gw = gateway_with(&lab, &file, &["--filtering", "endpoint-independent"]);
    let client = lab
        .udp_socket(Host::Client1, SocketAddrV4::new(nat_lab::CLIENT1_IP, 5555))
        .expect("client socket");
    let first = lab
        .udp_socket(Host::Server, server(5500))
        .expect("server socket");
    client.send_to(b"hello", server(5500)).expect("send");
    let got = recv_all_within(&first, Duration::from_secs(2)).expect("receive");
    let mapped = match got.first() {
        Some((std::net::SocketAddr::V4(a), _)) => *a,
        other => panic!("the server got {other:?}"),
    };
    assert_eq!(*mapped.ip(), NAT_EXT_IP);
    // The binding lets anyone in, but the policy denies the inside's
    // talking with the server's port 6000.
    let denied = lab.udp_socket(Host::Server, server(6000)).expect("socket");
    let allowed = lab.udp_socket(Host::Server, server(6001)).expect("socket");
    for _ in 0..3 {
        denied.send_to(b"denied", mapped).expect("send");
    }
    allowed.send_to(b"allowed", mapped).expect("send");
    let got = recv_all_within(&client, Duration::from_secs(2)).expect("receive");
    let from: Vec<_> = got.iter().map(|(a, _)| a.to_string()).collect();
    assert_eq!(from, ["198.51.100.10:6001"]);
    gw.stop().expect("stop");
    let dropped =
        gw.counter("xdp_ext", "drop_policy_denied") + gw.counter("tc_ext", "drop_policy_denied");
    assert_eq!(dropped, 3);
    assert_eq!(hits(&gw, "no-udp-with-6000"), 3);
}

//! Tests of the namespace lab itself (no gateway programs loaded). Need root.

use nat_lab::*;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn assert_pings(lab: &Lab, from: Host, dst: Ipv4Addr) {
    let report = ping(lab, from, dst, 3, Duration::from_secs(3)).expect("run ping");
    assert!(
        report.all_replied(),
        "{from} -> {dst} lost pings:\n{}",
        report.output
    );
}

#[test]
fn lab_connects_each_link() {
    let lab = lab();
    assert_pings(&lab, Host::Client1, NAT_INT_IP);
    assert_pings(&lab, Host::Client2, NAT_INT_IP);
    assert_pings(&lab, Host::Client1, CLIENT2_IP);
    assert_pings(&lab, Host::Nat, ROUTER_NAT_IP);
    assert_pings(&lab, Host::Router, SERVER_IP);
    // Routed through the router: the server's side has a route to the
    // gateway's public address, which translated replies depend on.
    assert_pings(&lab, Host::Server, NAT_EXT_IP);
}

#[test]
fn lab_removes_every_namespace_when_dropped() {
    let (names, pid) = {
        let lab = lab();
        let mut cmd = lab.command(Host::Nat, &["sleep", "600"]);
        // Null stdio: a survivor must not hold the test harness's pipes open.
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        let child = lab.spawn_command(&mut cmd).expect("spawn sleep in nat");
        let pid = child.id();
        // Leak the handle: the lab itself must still kill what runs inside.
        std::mem::forget(child);
        (all_names(&lab), pid)
    };
    assert_namespaces_gone(&names);
    assert_reaped_after_kill(pid);

    let mut names = Vec::new();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let lab = lab();
        names = all_names(&lab);
        panic!("deliberate panic while the lab is alive");
    }));
    assert!(result.is_err(), "the closure should have panicked");
    assert_eq!(names.len(), 6, "the lab was built before the panic");
    assert_namespaces_gone(&names);
}

#[test]
fn lab_new_removes_namespaces_left_by_dead_processes() {
    // A pid that surely is dead: a child we started and reaped.
    let mut child = Command::new("true").spawn().expect("spawn true");
    let dead = child.id();
    child.wait().expect("reap true");
    let stale = format!("{NS_PREFIX}{dead}-0-client1");
    let out = Command::new("ip")
        .args(["netns", "add", &stale])
        .output()
        .expect("run ip netns add");
    assert!(out.status.success(), "ip netns add {stale}: {out:?}");

    let _lab = lab();
    assert!(
        !Path::new("/run/netns").join(&stale).exists(),
        "stale namespace {stale} survived Lab::new"
    );
}

#[test]
fn lab_has_no_route_back_to_private_subnet() {
    let lab = lab();
    let port = 7001;
    let listener = lab
        .udp_socket(
            Host::Client1,
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port),
        )
        .expect("bind UDP in client1");
    let target = SocketAddrV4::new(CLIENT1_IP, port);

    udp_send(&lab, Host::Server, None, target, b"from server", 5).expect("send from server");
    let got = recv_all_within(&listener, Duration::from_secs(1)).expect("listen in client1");
    assert!(got.is_empty(), "server reached client1: {got:?}");

    let report = ping(&lab, Host::Server, CLIENT1_IP, 2, Duration::from_secs(2)).expect("ping");
    assert_eq!(report.received, 0, "{}", report.output);

    // Control: the same listener does hear a neighbour, so silence above
    // means "not routed", not "listener broken".
    udp_send(&lab, Host::Client2, None, target, b"from client2", 1).expect("send from client2");
    let got = recv_all_within(&listener, Duration::from_secs(1)).expect("listen in client1");
    assert_eq!(got.len(), 1, "client2 -> client1 should arrive: {got:?}");
    assert_eq!(got[0].0.ip(), CLIENT2_IP);
}

#[test]
fn lab_without_gateway_forwards_clients_untranslated_and_replies_never_return() {
    let lab = lab();
    let dst = SocketAddrV4::new(SERVER_IP, 7002);
    let flow = Flow::new(Host::Client1, Host::Server, dst).timeout(Duration::from_secs(2));
    let err = udp_exchange(&lab, &flow, 1).expect_err("no reply can route back to 10.1.0.11");
    // The kernel in nat forwarded the request with its private source.
    let msg = format!("{err:#}");
    assert!(
        msg.contains(&format!("from [{CLIENT1_IP}:")),
        "the server should have seen the private source: {msg}"
    );
}

#[test]
fn lab_with_nat_forwarding_off_delivers_nothing_to_server() {
    let lab = lab_with(LabOptions::nat_forwarding_off());
    let port = 7003;
    let listener = lab
        .udp_socket(Host::Server, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
        .expect("bind UDP in server");
    udp_send(
        &lab,
        Host::Client1,
        None,
        SocketAddrV4::new(SERVER_IP, port),
        b"x",
        3,
    )
    .expect("send from client1");
    let got = recv_all_within(&listener, Duration::from_secs(1)).expect("listen in server");
    assert!(got.is_empty(), "nat forwarded with ip_forward=0: {got:?}");
}

#[test]
fn lab_turns_gro_on_for_every_veth_and_tx_checksum_off_before_endpoints() {
    let lab = lab();
    let veth_ends = [
        (Host::Client1, HOST_IF),
        (Host::Client2, HOST_IF),
        (Host::Sw, SW_CLIENT1_PORT),
        (Host::Sw, SW_CLIENT2_PORT),
        (Host::Sw, SW_NAT_PORT),
        (Host::Nat, INT_IF),
        (Host::Nat, EXT_IF),
        (Host::Router, ROUTER_NAT_IF),
        (Host::Router, ROUTER_SRV_IF),
        (Host::Server, HOST_IF),
    ];
    let tx_off = [
        (Host::Sw, SW_CLIENT1_PORT),
        (Host::Sw, SW_CLIENT2_PORT),
        (Host::Router, ROUTER_SRV_IF),
    ];
    for (h, dev) in veth_ends {
        let out = lab.exec(h, &["ethtool", "-k", dev]).expect("ethtool -k");
        let features = String::from_utf8_lossy(&out.stdout);
        let feature = |name: &str| {
            features
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                .unwrap_or_else(|| panic!("{h}/{dev} has no {name} line"))
                .to_string()
        };
        assert!(
            feature("generic-receive-offload").starts_with("on"),
            "GRO off on {h}/{dev}"
        );
        let tx = feature("tx-checksumming");
        if tx_off.contains(&(h, dev)) {
            assert!(tx.starts_with("off"), "tx checksum on at {h}/{dev}");
        } else {
            assert!(tx.starts_with("on"), "tx checksum changed at {h}/{dev}");
        }
    }
    for (h, value) in [(Host::Nat, "1"), (Host::Router, "1")] {
        let out = lab
            .exec(h, &["sysctl", "-n", "net.ipv4.ip_forward"])
            .expect("sysctl");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), value, "{h}");
    }
    for h in Host::ALL {
        let out = lab
            .exec(h, &["sysctl", "-n", "net.ipv6.conf.all.disable_ipv6"])
            .expect("sysctl");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1", "{h}");
    }
}

#[test]
fn lab_gateway_peers_decide_whether_int_and_ext_take_redirected_xdp_frames() {
    use nat_loader::xdp_features::{NDO_XMIT, Netdev};
    for (peers, takes) in [
        (PeerNapi::Before, true),
        (PeerNapi::AfterUp, false),
        (PeerNapi::Off, false),
    ] {
        let lab = lab_with(LabOptions::gateway_peers(peers));
        for nic in [INT_IF, EXT_IF] {
            let index = lab.ifindex(Host::Nat, nic).expect("ifindex");
            let features = lab
                .in_ns(Host::Nat, || Netdev::open()?.xdp_features(index))
                .expect("in nat")
                .expect("xdp-features");
            assert_eq!(
                features & NDO_XMIT != 0,
                takes,
                "{peers:?} {nic}: {features:#x}"
            );
        }
        // The far ends run NAPI (GRO) in both labs but the last.
        let gro = stdout_of(&lab, Host::Router, &["ethtool", "-k", ROUTER_NAT_IF]);
        assert_eq!(
            gro.contains("generic-receive-offload: on"),
            peers != PeerNapi::Off,
            "{peers:?}: {gro}"
        );
    }
}

fn stdout_of(lab: &Lab, h: Host, argv: &[&str]) -> String {
    String::from_utf8_lossy(&lab.exec(h, argv).expect("run").stdout).into_owned()
}

#[test]
fn lab_creates_no_interface_in_root_namespace() {
    let _lab = lab();
    let out = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .expect("ip link show");
    let root = String::from_utf8_lossy(&out.stdout);
    for name in [
        INT_IF,
        EXT_IF,
        ROUTER_NAT_IF,
        ROUTER_SRV_IF,
        SW_CLIENT1_PORT,
        SW_CLIENT2_PORT,
        SW_NAT_PORT,
    ] {
        assert!(
            !root.contains(&format!(": {name}@")) && !root.contains(&format!(": {name}:")),
            "{name} appeared in the root namespace:\n{root}"
        );
    }
}

#[test]
fn tcp_transfer_verifies_both_directions_and_reports_addresses() {
    let lab = lab();
    let dst = SocketAddrV4::new(NAT_INT_IP, 7004);
    let flow = Flow::new(Host::Client1, Host::Nat, dst).src_port(41000);
    let report = tcp_transfer(&lab, &flow, 3 << 20).expect("TCP client1 -> nat");
    let client1 = SocketAddr::from((CLIENT1_IP, 41000));
    assert_eq!(report.client_addr, client1);
    assert_eq!(
        report.server_saw, client1,
        "no translation on a direct link"
    );
    assert_eq!(report.client_saw, SocketAddr::from(dst));
    assert_eq!(report.bytes_to_server, 3 << 20);
    assert_eq!(report.bytes_to_client, 3 << 20);
}

#[test]
fn udp_exchange_gets_every_reply_and_reports_the_source_seen() {
    let lab = lab();
    let dst = SocketAddrV4::new(NAT_INT_IP, 7005);
    let flow = Flow::new(Host::Client2, Host::Nat, dst)
        .src_ip(CLIENT2_IP)
        .src_port(42000);
    let report = udp_exchange(&lab, &flow, 20).expect("UDP client2 -> nat");
    assert_eq!(report.answered, 20);
    assert_eq!(report.server_saw.len(), 20);
    assert_eq!(
        report.single_source(),
        Some(SocketAddr::from((CLIENT2_IP, 42000)))
    );
}

#[test]
fn traffic_helpers_fail_within_their_timeout_when_nothing_answers() {
    let lab = lab();
    let timeout = Duration::from_secs(2);
    // Without a gateway, SYN-ACKs and UDP replies have no way back.
    let dst = SocketAddrV4::new(SERVER_IP, 7006);
    let flow = Flow::new(Host::Client1, Host::Server, dst).timeout(timeout);

    let limit = timeout + Duration::from_secs(2);
    let start = Instant::now();
    tcp_transfer(&lab, &flow, 1000).expect_err("TCP cannot complete without NAT");
    let tcp_took = start.elapsed();
    assert!(tcp_took < limit, "{tcp_took:?}");

    let start = Instant::now();
    udp_exchange(&lab, &flow, 3).expect_err("UDP cannot complete without NAT");
    let udp_took = start.elapsed();
    assert!(udp_took < limit, "{udp_took:?}");

    let start = Instant::now();
    let accepted = tcp_accepts_within(&lab, Host::Client1, 7007, Duration::from_millis(300))
        .expect("listen in client1");
    assert_eq!(accepted, None);
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[test]
fn in_ns_runs_the_closure_inside_the_namespace() {
    let lab = lab();
    // Binding an address works only where an interface has it.
    let bind_client1 = |h| {
        lab.in_ns(h, || std::net::UdpSocket::bind((CLIENT1_IP, 0)).is_ok())
            .expect("enter namespace")
    };
    assert!(bind_client1(Host::Client1));
    assert!(!bind_client1(Host::Client2));
}

#[test]
fn labs_in_parallel_get_distinct_namespaces() {
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(lab);
        let b = s.spawn(lab);
        (
            a.join().expect("first lab thread"),
            b.join().expect("second lab thread"),
        )
    });
    assert_ne!(a.id(), b.id());
    assert_pings(&a, Host::Client1, NAT_INT_IP);
    assert_pings(&b, Host::Client1, NAT_INT_IP);
}

fn all_names(lab: &Lab) -> Vec<String> {
    Host::ALL.iter().map(|&h| lab.ns(h).to_string()).collect()
}

fn assert_namespaces_gone(names: &[String]) {
    for name in names {
        assert!(
            !Path::new("/run/netns").join(name).exists(),
            "namespace {name} still exists"
        );
    }
}

/// The leaked child must have been killed: it is reapable right away.
fn assert_reaped_after_kill(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut status = 0;
        // SAFETY: waitpid on our own child with a valid out-pointer.
        let r = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
        if r == pid as libc::pid_t {
            assert!(
                libc::WIFSIGNALED(status),
                "sleep exited instead of being killed"
            );
            return;
        }
        assert!(
            r == 0,
            "waitpid({pid}) failed: {}",
            std::io::Error::last_os_error()
        );
        assert!(
            Instant::now() < deadline,
            "process {pid} still alive after drop"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

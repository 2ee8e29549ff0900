//! The SNAT address pool (`--snat-ip` with several addresses): paired
//! pooling (RFC 4787 REQ-2: an inside host gets one external address for
//! all its flows), inside hosts spread over the addresses, and draining:
//! an address removed from the pool across a restart that adopts the
//! dataplane keeps its flows and gets no new ones. Checked where it counts,
//! by the addresses the server sees.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    path::Path,
    time::Duration,
};

use nat_common::{PAIR_BUCKETS, pair_bucket};
use nat_lab::{
    Bpffs, EXT_IF, Flow, Gateway, HOST_IF, Host, Lab, NAT_EXT_IP, PREFIX_LEN, SERVER_IP, lab,
    loader_path, udp_exchange,
};

/// The pool: the lab's ext address and three more on `ext`.
const POOL: [Ipv4Addr; 4] = [
    NAT_EXT_IP,
    Ipv4Addr::new(192, 0, 2, 3),
    Ipv4Addr::new(192, 0, 2, 4),
    Ipv4Addr::new(192, 0, 2, 5),
];
const POOL_FLAG: &str = "192.0.2.2-192.0.2.5";
/// Inside hosts: client1's own address and these, added to it.
const HOSTS: u8 = 16;

fn inside_host(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 1, 0, 100 + i)
}

/// A lab whose gateway has the whole pool on `ext` and whose client1
/// speaks for [`HOSTS`] inside hosts.
fn pool_lab() -> Lab {
    let lab = lab();
    for a in &POOL[1..] {
        let cidr = format!("{a}/{PREFIX_LEN}");
        lab.exec(Host::Nat, &["ip", "addr", "add", &cidr, "dev", EXT_IF])
            .expect("adding a pool address to ext");
    }
    for i in 0..HOSTS {
        let cidr = format!("{}/{PREFIX_LEN}", inside_host(i));
        lab.exec(Host::Client1, &["ip", "addr", "add", &cidr, "dev", HOST_IF])
            .expect("adding an inside host address");
    }
    lab
}

fn start(lab: &Lab, pins: &Path, pool: &str, extra: &[&str]) -> Gateway {
    let dir = pins.display().to_string();
    let mut args = vec!["--snat-ip", pool, "--bpffs-dir", &dir];
    args.extend(extra);
    if !extra.contains(&"--stats-interval") {
        args.extend(["--stats-interval", "0"]);
    }
    Gateway::start_bin(lab, &loader_path().expect("loader"), &args).expect("starting nat-loader")
}

/// The one address the server saw a UDP exchange of `src` (ephemeral
/// port) to `port` come from. Each exchange has a server port of its own:
/// a child another test thread forks may hold a closed socket's port for
/// a moment (until its exec closes the fd).
fn seen_from(lab: &Lab, src: Ipv4Addr, port: u16) -> Ipv4Addr {
    let flow = Flow::to_server(Host::Client1, port).src_ip(src);
    let r = udp_exchange(lab, &flow, 3)
        .unwrap_or_else(|e| panic!("UDP exchange {src} -> :{port} through the gateway: {e:#}"));
    match r.single_source().map(|a| a.ip()) {
        Some(IpAddr::V4(a)) => a,
        other => panic!(
            "{src} -> :{port}: the server saw {other:?} ({:?})",
            r.server_saw
        ),
    }
}

/// The pool address the documented pairing gives an inside host when the
/// pool's active addresses are `active`, in slot order: the bucket of its
/// address (`nat_common::pair_bucket`) modulo their number.
fn paired_with(host: Ipv4Addr, active: &[Ipv4Addr]) -> Ipv4Addr {
    let b = pair_bucket(u32::from_ne_bytes(host.octets()));
    assert!(b < PAIR_BUCKETS);
    active[b as usize % active.len()]
}

#[test]
fn one_inside_host_keeps_one_external_address_across_destinations_and_hosts_spread() {
    let lab = pool_lab();
    let bpffs = Bpffs::new().expect("bpffs");
    let mut gw = start(&lab, &bpffs.pin_dir(), POOL_FLAG, &[]);

    // Paired: ten flows of one host, each its own binding (a new source
    // port) to another destination port, all from one address.
    let host = inside_host(0);
    let seen: BTreeSet<Ipv4Addr> = (0..10).map(|i| seen_from(&lab, host, 5400 + i)).collect();
    assert_eq!(
        seen.len(),
        1,
        "one host, several external addresses: {seen:?}"
    );
    let addr = *seen.iter().next().expect("one");
    assert!(POOL.contains(&addr), "{addr} is not in the pool");
    assert_eq!(addr, paired_with(host, &POOL));

    // Spread: the hosts use the pool's addresses as the pairing says.
    let mut by_addr: BTreeMap<Ipv4Addr, usize> = BTreeMap::new();
    for i in 0..HOSTS {
        let h = inside_host(i);
        let a = seen_from(&lab, h, 5500 + i as u16);
        assert_eq!(a, paired_with(h, &POOL), "host {h}");
        assert_eq!(
            seen_from(&lab, h, 5520 + i as u16),
            a,
            "host {h}, second flow"
        );
        *by_addr.entry(a).or_default() += 1;
    }
    assert!(
        by_addr.len() >= 3,
        "{HOSTS} hosts on too few addresses: {by_addr:?}"
    );
    gw.stop().expect("stopping the loader");
    // Port use per address, in the stats at exit: each address the hosts
    // used has UDP bindings.
    for a in by_addr.keys() {
        let head = format!("stats pool {a}: state=active ");
        let log = gw.log();
        let line = log
            .iter()
            .find(|l| l.contains(&head))
            .unwrap_or_else(|| panic!("no `{head}` line in the log"));
        let udp: usize = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("udp="))
            .and_then(|v| v.split('/').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no udp=<in use>/<free> in `{line}`"));
        assert!(udp > 0, "{a} shows no UDP binding: {line}");
    }
}

#[test]
fn a_drained_address_keeps_its_flows_and_takes_no_new_ones() {
    let lab = pool_lab();
    let bpffs = Bpffs::new().expect("bpffs");
    let pins = bpffs.pin_dir();
    let mut gw = start(&lab, &pins, POOL_FLAG, &[]);

    // A TCP connection of client1's own address: its address drains.
    let client = nat_lab::CLIENT1_IP;
    let drained = paired_with(client, &POOL);
    let dst = SocketAddrV4::new(SERVER_IP, 7100);
    let listener = lab
        .tcp_listener(Host::Server, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 7100))
        .expect("listener");
    let mut conn = lab
        .tcp_connect(Host::Client1, None, dst, Duration::from_secs(5))
        .expect("connecting through the gateway");
    let (mut served, from) = listener.accept().expect("accept");
    assert_eq!(from.ip(), IpAddr::V4(drained), "the connection's address");
    let round_trip = |conn: &mut std::net::TcpStream, served: &mut std::net::TcpStream, n: u8| {
        conn.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        conn.write_all(&[n; 100]).expect("client write");
        let mut buf = [0u8; 100];
        served.read_exact(&mut buf).expect("server read");
        served.write_all(&buf).expect("server write");
        let mut back = [0u8; 100];
        conn.read_exact(&mut back).expect("client read");
        assert_eq!(back, [n; 100]);
    };
    round_trip(&mut conn, &mut served, 1);

    // Hand over (the dataplane stays), and adopt it with a pool without
    // that address.
    gw.signal_and_wait(libc::SIGKILL).expect("SIGKILL");
    let rest: Vec<Ipv4Addr> = POOL.iter().copied().filter(|a| *a != drained).collect();
    let flag: Vec<String> = rest.iter().map(|a| a.to_string()).collect();
    // Short timers, so that the drained address's last flow ends soon
    // after its connection closes.
    let timers = [
        "--stats-interval",
        "1",
        "--sweep-interval",
        "1",
        "--tcp-transitory-timeout",
        "1",
        "--port-hold",
        "1",
    ];
    let mut gw = start(&lab, &pins, &flag.join(","), &timers);
    assert!(
        gw.wait_for_log(&["adopted=true"], Duration::from_secs(5))
            .is_some(),
        "not adopted: {:#?}",
        gw.log()
    );

    // The old connection goes on, still from the drained address (the
    // server's socket would get nothing from another one).
    for n in 2..5 {
        round_trip(&mut conn, &mut served, n);
    }
    // New flows, of that host too, go to the active addresses only.
    let now = seen_from(&lab, client, 5600);
    assert_ne!(now, drained, "a new flow got the drained address");
    assert_eq!(now, paired_with(client, &rest));
    for i in 0..HOSTS {
        let a = seen_from(&lab, inside_host(i), 5610 + i as u16);
        assert!(rest.contains(&a), "host {i}: {a} is not active");
    }
    let draining = format!("stats pool {drained}: state=draining tcp=1/");
    assert!(
        gw.wait_for_log(&[&draining], Duration::from_secs(5))
            .is_some(),
        "no `{draining}` line: the drained address's binding is not shown"
    );
    // Its last flow over, the drained address leaves the pool.
    drop(conn);
    drop(served);
    let gone = format!("address={drained}");
    assert!(
        gw.wait_for_log(&["has drained", &gone], Duration::from_secs(20))
            .is_some(),
        "the drained address's slot was not freed after its last flow: {:#?}",
        gw.log()
            .into_iter()
            .filter(|l| l.contains("swept") || l.contains("pool"))
            .collect::<Vec<_>>()
    );
    gw.stop().expect("stopping the loader");
}

#[test]
fn with_auto_an_address_added_to_ext_joins_the_pool_and_new_hosts_get_it() {
    let lab = lab();
    let bpffs = Bpffs::new().expect("bpffs");
    let mut gw = start(&lab, &bpffs.pin_dir(), "auto", &[]);
    for i in 0..HOSTS {
        let cidr = format!("{}/{PREFIX_LEN}", inside_host(i));
        lab.exec(Host::Client1, &["ip", "addr", "add", &cidr, "dev", HOST_IF])
            .expect("adding an inside host address");
    }
    // One address on ext: everybody has it.
    let before: BTreeSet<Ipv4Addr> = (0..4)
        .map(|i| seen_from(&lab, inside_host(i), 5700 + i as u16))
        .collect();
    assert_eq!(before, BTreeSet::from([NAT_EXT_IP]));
    for a in &POOL[1..] {
        let cidr = format!("{a}/{PREFIX_LEN}");
        lab.exec(Host::Nat, &["ip", "addr", "add", &cidr, "dev", EXT_IF])
            .expect("adding an address to ext");
    }
    // The pool's maps written, all four active.
    assert!(
        gw.wait_for_log(&["SNAT pool updated", "active=4"], Duration::from_secs(5))
            .is_some(),
        "the new addresses did not join the pool: {:#?}",
        gw.log()
            .into_iter()
            .filter(|l| l.contains("SNAT"))
            .collect::<Vec<_>>()
    );
    // Hosts with bindings keep their address for new ones (paired
    // pooling); the others pair as the four-address pool says.
    let bucket = |h: Ipv4Addr| pair_bucket(u32::from_ne_bytes(h.octets()));
    let bound: Vec<u32> = (0..4).map(|i| bucket(inside_host(i))).collect();
    let mut spread = BTreeSet::new();
    for i in 0..HOSTS {
        let h = inside_host(i);
        let want = if bound.contains(&bucket(h)) {
            NAT_EXT_IP
        } else {
            paired_with(h, &POOL)
        };
        let got = seen_from(&lab, h, 5720 + i as u16);
        assert_eq!(got, want, "host {h}");
        spread.insert(got);
    }
    assert!(
        spread.len() >= 3,
        "the new addresses are not used: {spread:?}"
    );
    gw.stop().expect("stopping the loader");
}

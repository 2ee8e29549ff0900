//! Observability end to end: a real Prometheus (Debian's) scrapes the lab
//! gateway's `/metrics` and PromQL sees the counters move by what the test
//! sent; the endpoint is refused from the `--ext` side; `promtool` accepts
//! the exposition; `nat-loader conntrack` shows the lab's flows.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::Duration,
};

use nat_lab::{
    CLIENT1_IP, EXT_IF, Flow, Host, Lab, NAT_EXT_IP, NAT_INT_IP, PRIVATE_NET, SERVER_IP, flags,
    gateway, lab, ping, prometheus::Prometheus, prometheus::http_get, run_loader, tcp_transfer,
    udp_exchange, udp_send,
};

const METRICS_PORT: u16 = 9100;
const WAIT: Duration = Duration::from_secs(20);

fn metrics_at(ip: Ipv4Addr) -> SocketAddrV4 {
    SocketAddrV4::new(ip, METRICS_PORT)
}

/// Routes the router's traffic for the private subnet via the gateway's
/// ext address, as an attacker on the ext link could.
fn route_private_net_via_gateway(lab: &Lab) {
    let net = format!("{PRIVATE_NET}/24");
    lab.exec(
        Host::Router,
        &["ip", "route", "add", &net, "via", &NAT_EXT_IP.to_string()],
    )
    .expect("route to the private subnet");
}

/// Waits until `promql` equals `want` (the scrape after the traffic).
#[track_caller]
fn expect_value(prom: &Prometheus, lab: &Lab, promql: &str, want: f64) {
    if let Err(e) = prom.wait_for(lab, promql, |v| v == want, WAIT) {
        panic!(
            "expected {promql} == {want}: {e:#}\nprometheus log:\n{}",
            prom.log()
        );
    }
}

/// The current value of `promql` once it has one.
#[track_caller]
fn value(prom: &Prometheus, lab: &Lab, promql: &str) -> f64 {
    prom.wait_for(lab, promql, |_| true, WAIT)
        .unwrap_or_else(|e| panic!("{promql}: {e:#}\nprometheus log:\n{}", prom.log()))
}

/// `nat_traffic_<what>_total` of one direction and protocol.
fn traffic(what: &str, dir: &str, proto: &str) -> String {
    format!(r#"nat_traffic_{what}_total{{direction="{dir}",protocol="{proto}"}}"#)
}

const OUT: &str = r#"sum(nat_forwarded_packets_total{direction="outbound"})"#;
const IN: &str = r#"sum(nat_forwarded_packets_total{direction="inbound"})"#;
const ATTEMPTS: &str = "sum(nat_connection_attempts_total)";

#[test]
fn prometheus_sees_tcp_udp_icmp_drops_port_exhaustion_health_and_drain_move_by_what_was_sent() {
    let lab = lab();
    route_private_net_via_gateway(&lab);
    // Four external ports per protocol: easy to exhaust.
    let mut gw = gateway(
        &lab,
        &flags(
            "--metrics-listen 0.0.0.0:9100 --port-range 40000-40003 --sweep-interval 1 \
             --drain-seconds 4",
        ),
    );
    let prom = Prometheus::start(&lab, Host::Client2, metrics_at(NAT_INT_IP)).expect("prometheus");
    expect_value(&prom, &lab, r#"up{job="nat"}"#, 1.0);

    // UDP: 20 requests, 20 replies, one new session.
    let (out0, in0, att0) = (
        value(&prom, &lab, OUT),
        value(&prom, &lab, IN),
        value(&prom, &lab, ATTEMPTS),
    );
    let udp = udp_exchange(&lab, &Flow::to_server(Host::Client1, 5300), 20).expect("UDP");
    assert_eq!(udp.answered, 20);
    expect_value(&prom, &lab, OUT, out0 + 20.0);
    expect_value(&prom, &lab, IN, in0 + 20.0);
    expect_value(&prom, &lab, ATTEMPTS, att0 + 1.0);
    expect_value(&prom, &lab, &traffic("packets", "outbound", "udp"), 20.0);
    expect_value(&prom, &lab, &traffic("packets", "inbound", "udp"), 20.0);
    expect_value(
        &prom,
        &lab,
        r#"nat_sessions{protocol="udp",state="answered"}"#,
        1.0,
    );

    // ICMP: 3 echo requests, 3 replies, one new session.
    let (out0, in0, att0) = (
        value(&prom, &lab, OUT),
        value(&prom, &lab, IN),
        value(&prom, &lab, ATTEMPTS),
    );
    let p = ping(&lab, Host::Client1, SERVER_IP, 3, Duration::from_secs(5)).expect("ping");
    assert!(p.all_replied(), "{}", p.output);
    expect_value(&prom, &lab, OUT, out0 + 3.0);
    expect_value(&prom, &lab, IN, in0 + 3.0);
    expect_value(&prom, &lab, ATTEMPTS, att0 + 1.0);
    // ping's default: 56 bytes of data, in ICMP (8), IPv4 (20), Ethernet (14).
    let frame = f64::from(56 + 8 + 20 + 14);
    for dir in ["outbound", "inbound"] {
        expect_value(&prom, &lab, &traffic("packets", dir, "icmp"), 3.0);
        expect_value(&prom, &lab, &traffic("bytes", dir, "icmp"), 3.0 * frame);
    }
    expect_value(
        &prom,
        &lab,
        r#"nat_sessions{protocol="icmp",state="answered"}"#,
        1.0,
    );

    // TCP: one connection (its segment count is the stacks' business, at
    // least SYN, ACK and FIN go out).
    let (out0, att0) = (value(&prom, &lab, OUT), value(&prom, &lab, ATTEMPTS));
    let t = tcp_transfer(&lab, &Flow::to_server(Host::Client1, 5400), 4096).expect("TCP");
    assert_eq!(t.server_saw.ip(), NAT_EXT_IP);
    expect_value(&prom, &lab, ATTEMPTS, att0 + 1.0);
    prom.wait_for(&lab, OUT, |v| v >= out0 + 3.0, WAIT)
        .expect("TCP segments forwarded out");
    expect_value(&prom, &lab, r#"sum(nat_sessions{protocol="tcp"})"#, 1.0);
    prom.wait_for(
        &lab,
        &traffic("packets", "outbound", "tcp"),
        |v| v >= 3.0,
        WAIT,
    )
    .expect("TCP traffic counted");

    // Drops by reason: 5 unsolicited datagrams from outside.
    let unsolicited = r#"sum(nat_dropped_packets_total{reason="drop_unsolicited"})"#;
    let by_hook = r#"sum(nat_packets_total{reason="drop_unsolicited",kind="verdict"})"#;
    let d0 = value(&prom, &lab, unsolicited);
    udp_send(
        &lab,
        Host::Server,
        None,
        SocketAddrV4::new(CLIENT1_IP, 6000),
        b"unsolicited",
        5,
    )
    .expect("sending");
    expect_value(&prom, &lab, unsolicited, d0 + 5.0);
    expect_value(&prom, &lab, by_hook, d0 + 5.0);

    // Port exhaustion: the UDP exchange holds one of the 4 ports; 5 more
    // inside endpoints want one each: 3 get it, 2 are refused.
    let errors = "nat_port_allocation_errors_total";
    let e0 = value(&prom, &lab, errors);
    for _ in 0..5 {
        udp_send(
            &lab,
            Host::Client1,
            None,
            SocketAddrV4::new(SERVER_IP, 5301),
            b"x",
            1,
        )
        .expect("sending");
    }
    expect_value(&prom, &lab, errors, e0 + 2.0);
    let ports =
        |m: &str| format!(r#"{m}{{snat_address="{NAT_EXT_IP}",protocol="udp",range="main"}}"#);
    expect_value(&prom, &lab, &ports("nat_external_ports_in_use"), 4.0);
    expect_value(&prom, &lab, &ports("nat_external_ports_free"), 0.0);

    // A health change: ext down, then up again.
    expect_value(&prom, &lab, "nat_healthy", 1.0);
    lab.exec(Host::Nat, &["ip", "link", "set", EXT_IF, "down"])
        .expect("ext down");
    expect_value(&prom, &lab, "nat_healthy", 0.0);
    expect_value(
        &prom,
        &lab,
        r#"nat_health_status{status="unhealthy",reason="ext is down"}"#,
        1.0,
    );
    lab.exec(Host::Nat, &["ip", "link", "set", EXT_IF, "up"])
        .expect("ext up");
    expect_value(&prom, &lab, "nat_healthy", 1.0);

    // SIGTERM: draining, still scraped while it forwards.
    expect_value(&prom, &lab, "nat_draining", 0.0);
    gw.signal_term().expect("SIGTERM");
    expect_value(&prom, &lab, "nat_draining", 1.0);
    assert!(
        gw.wait(Duration::from_secs(15)).expect("wait").is_some(),
        "the loader ends after its drain"
    );
}

#[test]
fn metrics_are_refused_from_the_ext_side_served_inside_and_promtool_accepts_them() {
    let lab = lab();
    route_private_net_via_gateway(&lab);
    let mut gw = gateway(&lab, &flags("--metrics-listen 0.0.0.0:9100"));
    // Inside: served, and a valid exposition.
    let (code, body) =
        http_get(&lab, Host::Client1, metrics_at(NAT_INT_IP), "/metrics").expect("scrape inside");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("nat_packets_total{"), "{body}");
    let file = std::env::temp_dir().join(format!("natlab-{}-metrics.txt", std::process::id()));
    std::fs::write(&file, &body).expect("writing the exposition");
    let check = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("promtool check metrics < {}", file.display()))
        .output()
        .expect("promtool");
    let _ = std::fs::remove_file(&file);
    assert!(
        check.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    // Outside: neither the ext address nor the int one (routed in through
    // ext) answers.
    for ip in [NAT_EXT_IP, NAT_INT_IP] {
        let r = http_get(&lab, Host::Router, metrics_at(ip), "/metrics");
        assert!(r.is_err(), "a scrape from outside to {ip} got {r:?}");
    }
    gw.stop().expect("stop");

    // Control: asked to, the same scrape from outside works (so what
    // refused it above was the gateway, not the lab's routing).
    let _gw = gateway(
        &lab,
        &flags("--metrics-listen 0.0.0.0:9100 --metrics-allow-ext"),
    );
    let (code, _) = http_get(&lab, Host::Router, metrics_at(NAT_EXT_IP), "/metrics")
        .expect("scrape from outside, allowed");
    assert_eq!(code, 200);
}

#[test]
fn a_metrics_address_on_ext_is_refused_at_start_with_a_clear_error() {
    let lab = lab();
    let listen = metrics_at(NAT_EXT_IP).to_string();
    let (ok, stderr) = run_loader(
        &lab,
        &[],
        &[
            "--int",
            "int",
            "--ext",
            "ext",
            "--drain-seconds",
            "0",
            "--metrics-listen",
            &listen,
        ],
    )
    .expect("running the loader");
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("is an address of --ext") && stderr.contains("--metrics-allow-ext"),
        "{stderr}"
    );
}

#[test]
fn conntrack_list_shows_the_flows_with_their_inside_external_and_remote_tuples() {
    let lab = lab();
    let gw = gateway(&lab, &[]);
    let udp = udp_exchange(&lab, &Flow::to_server(Host::Client1, 5300), 3).expect("UDP");
    let ext = udp.single_source().expect("one source");
    let t = tcp_transfer(&lab, &Flow::to_server(Host::Client1, 5400), 1024).expect("TCP");
    let list: serde_json::Value = serde_json::from_str(
        &gw.inspect(&["conntrack", "list", "-o", "json"])
            .expect("list"),
    )
    .expect("json");
    let flows = list.as_array().expect("an array");
    let find = |proto: &str, inside: SocketAddr| {
        flows
            .iter()
            .find(|f| f["protocol"] == proto && f["inside"] == inside.to_string())
            .unwrap_or_else(|| panic!("no {proto} flow from {inside}: {list:#}"))
    };
    let u = find("udp", udp.client_addr);
    assert_eq!(u["external"], ext.to_string(), "{u}");
    assert_eq!(u["remote"], format!("{SERVER_IP}:5300"), "{u}");
    assert_eq!(u["state"], "answered", "{u}");
    let c = find("tcp", t.client_addr);
    assert_eq!(c["external"], t.server_saw.to_string(), "{c}");
    assert_eq!(c["remote"], format!("{SERVER_IP}:5400"), "{c}");
    // Filters and count.
    let count = |args: &[&str]| -> u64 {
        let mut a = vec!["conntrack", "count", "-o", "json"];
        a.extend_from_slice(args);
        let v: serde_json::Value =
            serde_json::from_str(&gw.inspect(&a).expect("count")).expect("json");
        v["count"].as_u64().expect("a count")
    };
    assert_eq!(count(&["--proto", "udp"]), 1);
    assert_eq!(count(&["--inside", &CLIENT1_IP.to_string()]), 2);
    assert_eq!(count(&["--outside", "203.0.113.9"]), 0);
    assert_eq!(count(&["--port", "5400"]), 1);
    // Who has the UDP flow's external port.
    let get: serde_json::Value = serde_json::from_str(
        &gw.inspect(&[
            "conntrack",
            "get",
            &ext.port().to_string(),
            "--proto",
            "udp",
            "-o",
            "json",
        ])
        .expect("get"),
    )
    .expect("json");
    assert_eq!(
        get["bindings"][0]["inside"],
        udp.client_addr.to_string(),
        "{get:#}"
    );
}

#[test]
fn the_translation_log_holds_each_binding_with_the_external_port_the_server_saw() {
    let lab = lab();
    let path = std::env::temp_dir().join(format!("natlab-{}-translog.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&path);
    struct Remove(std::path::PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _remove = Remove(path.clone());
    // One external port: a second inside endpoint finds none. Short
    // timeouts: the binding is released and freed within seconds.
    let args = format!(
        "--translation-log {} --port-range 40000-40000 --udp-timeout 1 --port-hold 1 \
         --sweep-interval 1",
        path.display()
    );
    let mut gw = gateway(&lab, &flags(&args));
    let udp = udp_exchange(&lab, &Flow::to_server(Host::Client1, 5300), 3).expect("UDP");
    let ext = udp.single_source().expect("one source");
    assert_eq!(ext.port(), 40000);
    // Another endpoint: refused for want of a port.
    let other = lab
        .udp_socket(Host::Client2, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))
        .expect("socket");
    let other_addr = other.local_addr().expect("addr");
    other
        .send_to(b"x", SocketAddrV4::new(SERVER_IP, 5301))
        .expect("send");
    let lines = |want: &dyn Fn(&serde_json::Value) -> bool| -> Vec<serde_json::Value> {
        std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .filter(|v| want(v))
            .collect()
    };
    let inside = udp.client_addr.to_string();
    let of_flow = |event: &'static str| {
        let inside = inside.clone();
        move |v: &serde_json::Value| {
            v["event"] == event && v["protocol"] == "udp" && v["inside"] == inside
        }
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while lines(&of_flow("binding_freed")).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    gw.stop().expect("stop");
    let log = std::fs::read_to_string(&path).unwrap_or_default();
    let created = lines(&of_flow("binding_created"));
    assert_eq!(created.len(), 1, "{log}");
    assert_eq!(created[0]["external"], ext.to_string(), "{log}");
    assert!(
        created[0]["time"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z') && t.len() == 27),
        "RFC 3339 time: {log}"
    );
    for event in ["binding_released", "binding_freed"] {
        let l = lines(&of_flow(event));
        assert_eq!(l.len(), 1, "{event}: {log}");
        assert_eq!(l[0]["external"], ext.to_string(), "{event}: {log}");
    }
    let refused = lines(&|v| {
        v["event"] == "port_exhausted"
            && v["inside"] == format!("{}:{}", nat_lab::CLIENT2_IP, other_addr.port())
    });
    assert_eq!(refused.len(), 1, "{log}");

    // `journal`: the same lines in the loader's log.
    let gw = gateway(&lab, &flags("--translation-log journal"));
    let udp = udp_exchange(&lab, &Flow::to_server(Host::Client1, 5302), 1).expect("UDP");
    let ext = udp.single_source().expect("one source").to_string();
    let inside = udp.client_addr.to_string();
    let found = gw.wait_for_log(
        &["nat_translog", "binding_created", &ext, &inside],
        Duration::from_secs(5),
    );
    assert!(found.is_some(), "{:#?}", gw.log());
}

/// A million sessions: `conntrack count` and `list` read them in batches,
/// and a scrape, which reads the sweeper's summary instead of the table,
/// answers in under 50 ms. Prints the times (`-- --nocapture`).
#[test]
fn at_a_million_sessions_a_scrape_answers_within_50_ms_and_conntrack_reads_them_all() {
    use aya::maps::{HashMap, Map, MapData};
    use nat_common::{CtKey, CtValue, IPPROTO_UDP, MAP_CT_FWD};
    use std::time::Instant;

    const SESSIONS: u32 = 1 << 20;
    let lab = lab();
    let bpffs = nat_lab::Bpffs::new().expect("a bpffs for the pins");
    let pins = bpffs.pin_dir();
    let pins_arg = pins.to_string_lossy().into_owned();
    let mut args = flags("--metrics-listen 0.0.0.0:9100 --max-flows 1048576 --sweep-interval 5");
    args.extend(["--bpffs-dir", &pins_arg]);
    let mut gw = gateway(&lab, &args);
    // Fill the table as many flows would: valid sessions, fresh, so the
    // sweeper keeps them.
    let data = MapData::from_pin(pins.join(MAP_CT_FWD)).expect("the pinned sessions");
    let mut sessions: HashMap<MapData, CtKey, CtValue> =
        HashMap::try_from(Map::HashMap(data)).expect("a hash map");
    let raw = |a: Ipv4Addr| u32::from_ne_bytes(a.octets());
    let now = nat_loader::monotonic_ns();
    let filled = Instant::now();
    for i in 0..SESSIONS {
        let inside = Ipv4Addr::new(10, 1, (i >> 16) as u8, ((i >> 8) & 0xff) as u8);
        let port = (1024 + (i & 0xff)) as u16;
        let key = CtKey::new(
            IPPROTO_UDP,
            raw(inside),
            port.to_be(),
            raw(SERVER_IP),
            53u16.to_be(),
        );
        // Pool slot 0 (the gateway's one address), answered: table
        // pressure never evicts these.
        let value = CtValue::new(
            0,
            (i as u16).to_be(),
            nat_common::ticks(now),
            0,
            nat_common::CT_F_REPLIED,
        );
        sessions.insert(key, value, 0).expect("inserting a session");
    }
    eprintln!("filled {SESSIONS} sessions in {:?}", filled.elapsed());

    let t = Instant::now();
    let count: serde_json::Value = serde_json::from_str(
        &gw.inspect(&["conntrack", "count", "-o", "json"])
            .expect("count"),
    )
    .expect("json");
    let count_time = t.elapsed();
    assert_eq!(count["count"].as_u64(), Some(u64::from(SESSIONS)));
    let t = Instant::now();
    let listed = gw.inspect(&["conntrack", "list"]).expect("list");
    let list_time = t.elapsed();
    assert_eq!(listed.lines().count(), SESSIONS as usize);
    eprintln!(
        "nat-loader conntrack count: {count_time:?}, conntrack list (text): {list_time:?} \
         for {SESSIONS} sessions"
    );

    // The sweeper's pass over the million gives the metrics their gauges.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, body) =
            http_get(&lab, Host::Client1, metrics_at(NAT_INT_IP), "/metrics").expect("scrape");
        if body.contains(&format!(
            "nat_sessions{{protocol=\"udp\",state=\"answered\"}} {SESSIONS}"
        )) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no sweep summary of the million: {:?}",
            body.lines()
                .filter(|l| l.starts_with("nat_sessions"))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let (code, _) =
            http_get(&lab, Host::Client1, metrics_at(NAT_INT_IP), "/metrics").expect("scrape");
        times.push(t.elapsed());
        assert_eq!(code, 200);
    }
    times.sort();
    eprintln!(
        "scrape at {SESSIONS} sessions: min {:?}, median {:?}, max {:?}",
        times[0], times[2], times[4]
    );
    assert!(
        times[0] < Duration::from_millis(50),
        "a scrape took {:?} at best",
        times[0]
    );
    gw.stop().expect("stop");
}

/// Two instances behind the emulated internal load balancer, scraped by one
/// Prometheus: when one "stops" (its links down), Prometheus sees it go,
/// the load balancer takes it out, and the other instance's counters take
/// every new connection; when it comes back it is scraped healthy again.
#[test]
fn prometheus_sees_a_failover_the_stopped_instance_gone_and_new_flows_on_the_other() {
    use nat_lab::failover::{FailoverLab, int_ip};

    let mut lab = FailoverLab::new(2).expect("building the failover lab (needs root, nft)");
    for i in 0..2 {
        lab.start_instance(i, &flags("--metrics-listen 0.0.0.0:9100"))
            .expect("starting an instance");
    }
    lab.start_services().expect("echo server and prober");
    lab.wait_in_rotation(&[0, 1], Duration::from_secs(10))
        .expect("both in rotation");
    let targets = [metrics_at(int_ip(0)), metrics_at(int_ip(1))];
    let prom = Prometheus::start_in(lab.namespaces(), "lb", &targets).expect("prometheus in lb");
    let ns = lab.namespaces();
    let wait = |promql: &str, ok: &dyn Fn(f64) -> bool| -> f64 {
        prom.wait_for_in(ns, promql, ok, WAIT)
            .unwrap_or_else(|e| panic!("{e:#}\nprometheus log:\n{}", prom.log()))
    };
    let of = |metric: &str, i: usize| format!(r#"{metric}{{instance="{}"}}"#, targets[i]);
    for i in 0..2 {
        wait(&of("up", i), &|v| v == 1.0);
        wait(&of("nat_healthy", i), &|v| v == 1.0);
    }

    // Instance 1 stops: Prometheus loses it, the load balancer takes it out.
    lab.links_down(1).expect("links down");
    wait(&of("up", 1), &|v| v == 0.0);
    lab.wait_in_rotation(&[0], Duration::from_secs(10))
        .expect("instance 1 out of rotation");
    // Every new connection now goes through instance 0, and its counter
    // moves by exactly that many.
    let before = wait(&of("nat_connection_attempts_total", 0), &|_| true);
    let mut carried = 0;
    for _ in 0..10 {
        let via = lab
            .new_connection(Duration::from_secs(2))
            .expect("a new connection");
        assert_eq!(via, 0, "instance 1 is out of rotation");
        carried += 1;
    }
    wait(&of("nat_connection_attempts_total", 0), &|v| {
        v == before + f64::from(carried)
    });

    // Back: scraped and healthy again.
    lab.links_up(1).expect("links up");
    wait(&of("up", 1), &|v| v == 1.0);
    wait(&of("nat_healthy", 1), &|v| v == 1.0);
}

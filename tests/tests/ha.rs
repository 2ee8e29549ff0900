//! High availability, end to end with the real loader: health probes from
//! Azure's probe address on both NICs (and why policy routing is needed),
//! the probe failing fast when the dataplane breaks, failover behind an
//! emulated internal load balancer, and the SIGTERM drain.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use aya::programs::{SchedClassifier, TcAttachType};
use nat_lab::failover::{self, FailoverLab, PROBE_PORT, int_ip};
use nat_lab::netns::{Namespaces, connect};
use nat_lab::probers::{AZURE_PROBE_IP, PROBE_INT_GW, Probers};
use nat_lab::{EXT_IF, Gateway, Host, INT_IF, Lab, NAT_EXT_IP, NAT_INT_IP, gateway, lab};

fn stdout(o: std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Our rules and routes (protocol 190) left in a namespace, as text.
fn policy_left(run: &dyn Fn(&[&str]) -> String) -> String {
    let rules = run(&["ip", "-d", "rule", "show"]);
    let routes = run(&["ip", "route", "show", "table", "all", "proto", "190"]);
    let mut left: Vec<String> = rules
        .lines()
        .filter(|l| l.contains("proto 190") || l.contains("lookup 190") || l.contains("lookup 191"))
        .map(str::to_string)
        .collect();
    left.extend(routes.lines().map(str::to_string));
    left.join("\n")
}

/// (XDP attached, TCX programs, clsact/ingress qdisc) on `ifname`.
fn attached(
    ns: &dyn Fn(&[&str]) -> String,
    in_ns: &dyn Fn(String) -> usize,
    ifname: &str,
) -> (bool, usize, bool) {
    let xdp = ns(&["ip", "-d", "link", "show", ifname]).contains("prog/xdp");
    let qdisc = ns(&["tc", "qdisc", "show", "dev", ifname]);
    let tcx = in_ns(ifname.to_string());
    (
        xdp,
        tcx,
        qdisc.contains("clsact") || qdisc.contains("ingress"),
    )
}

/// No program, qdisc, policy rule or route of ours left in the lab's `nat`.
fn assert_nothing_of_ours_left(lab: &Lab) {
    let run = |argv: &[&str]| stdout(lab.exec(Host::Nat, argv).expect("in nat"));
    let tcx = |ifname: String| {
        lab.in_ns(Host::Nat, move || tcx_count(&ifname))
            .expect("in nat")
    };
    assert_eq!(attached(&run, &tcx, INT_IF), (false, 0, false));
    assert_eq!(attached(&run, &tcx, EXT_IF), (false, 0, false));
    let left = policy_left(&run);
    assert!(left.is_empty(), "rules or routes of ours left:\n{left}");
}

fn tcx_count(ifname: &str) -> usize {
    SchedClassifier::query_tcx(ifname, TcAttachType::Ingress)
        .map(|(_, p)| p.len())
        .expect("querying TCX")
}

/// Polls `probe` every 20 ms until it fails; how long that took.
fn time_until_refused(probe: impl Fn() -> bool, limit: Duration) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if !probe() {
            return Some(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

fn time_until_accepted(probe: impl Fn() -> bool, limit: Duration) -> Option<Duration> {
    time_until_refused(|| !probe(), limit)
}

/// GET /healthz: (status code, body).
fn healthz(lab: &Lab, port: u16) -> (u16, String) {
    let mut s = lab
        .tcp_connect(
            Host::Client1,
            None,
            SocketAddrV4::new(NAT_INT_IP, port),
            Duration::from_secs(2),
        )
        .expect("connecting to /healthz");
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    s.write_all(b"GET /healthz HTTP/1.0\r\nHost: nat\r\n\r\n")
        .expect("sending the request");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("reading the response");
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {resp:?}"));
    let body = resp
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or("")
        .trim()
        .to_string();
    (code, body)
}

#[test]
fn azure_probes_on_both_nics_are_answered_through_the_nic_they_came_in_on_and_the_int_side_needs_our_rules()
 {
    let lab = lab();
    let probers = Probers::attach(&lab).expect("adding the prober namespaces");
    let int_probe = SocketAddrV4::new(NAT_INT_IP, PROBE_PORT);
    let ext_probe = SocketAddrV4::new(NAT_EXT_IP, PROBE_PORT);
    let t = Duration::from_secs(2);
    let route_from = |src: Ipv4Addr| {
        stdout(
            lab.exec(
                Host::Nat,
                &[
                    "ip",
                    "route",
                    "get",
                    &AZURE_PROBE_IP.to_string(),
                    "from",
                    &src.to_string(),
                ],
            )
            .expect("ip route get"),
        )
    };

    // Control: the same loader without our rules. The ext probe works; the
    // int probe's answer follows the default route out of ext and never
    // reaches the prober that asked.
    let mut gw = gateway(&lab, &["--no-policy-routing"]);
    probers
        .probe_ext(ext_probe, t)
        .expect("the ext-side probe is answered without policy routing");
    assert!(
        probers.probe_int(int_probe, t).is_err(),
        "without our rules the int-side probe must fail"
    );
    assert!(
        route_from(NAT_INT_IP).contains("dev ext"),
        "{}",
        route_from(NAT_INT_IP)
    );
    gw.stop().expect("stopping");

    let gw_arg = PROBE_INT_GW.to_string();
    let mut gw = gateway(&lab, &["--int-gateway", &gw_arg]);
    for _ in 0..3 {
        probers
            .probe_int(int_probe, t)
            .expect("the int-side probe from 168.63.129.16 is answered");
        probers
            .probe_ext(ext_probe, t)
            .expect("the ext-side probe from 168.63.129.16 is answered");
    }
    // Through the NIC they came in on.
    let via_int = route_from(NAT_INT_IP);
    let via_ext = route_from(NAT_EXT_IP);
    assert!(
        via_int.contains("dev int") && via_int.contains("table 190"),
        "{via_int}"
    );
    assert!(
        via_ext.contains("dev ext") && via_ext.contains("table 191"),
        "{via_ext}"
    );
    // The ext gateway was discovered from the default route.
    assert!(
        gw.log()
            .iter()
            .any(|l| l.contains("policy routing") && l.contains("ext") && l.contains("192.0.2.1")),
        "{:#?}",
        gw.log()
    );
    let ours = policy_left(&|argv| stdout(lab.exec(Host::Nat, argv).expect("ip")));
    assert!(
        ours.contains("from 10.1.0.1 lookup 190") && ours.contains("from 192.0.2.2 lookup 191"),
        "our rules, as the cleanup check sees them:\n{ours}"
    );
    let status = gw.stop().expect("stopping");
    assert!(status.success(), "{:#?}", gw.log());
    let left = policy_left(&|argv| stdout(lab.exec(Host::Nat, argv).expect("ip")));
    assert!(left.is_empty(), "rules or routes of ours left:\n{left}");
    drop(probers);
}

/// The loader's bpf_link ids of `link_type` ("xdp" or "tcx") on `ifindex`,
/// from its fdinfo.
fn loader_links(pid: u32, link_type: &str, ifindex: u32) -> Vec<u32> {
    let mut ids = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).expect("fdinfo") {
        let Ok(text) = std::fs::read_to_string(e.expect("entry").path()) else {
            continue;
        };
        let field = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
        };
        if field("link_type:").as_deref() == Some(link_type)
            && field("ifindex:").and_then(|v| v.parse::<u32>().ok()) == Some(ifindex)
            && let Some(id) = field("link_id:").and_then(|v| v.parse().ok())
        {
            ids.push(id);
        }
    }
    ids
}

fn probe_ok(lab: &Lab) -> bool {
    lab.tcp_connect(
        Host::Client1,
        None,
        SocketAddrV4::new(NAT_INT_IP, PROBE_PORT),
        Duration::from_millis(300),
    )
    .is_ok()
}

#[test]
fn probe_is_refused_within_a_second_when_a_program_is_detached_from_outside() {
    let lab = lab();
    for (link_type, ifname) in [("xdp", EXT_IF), ("tcx", INT_IF)] {
        let mut gw = gateway(&lab, &[]);
        time_until_accepted(|| probe_ok(&lab), Duration::from_secs(3))
            .expect("the probe answers while healthy");
        let pid = gw.pid().expect("running");
        let ids = loader_links(
            pid,
            link_type,
            lab.ifindex(Host::Nat, ifname).expect("ifindex"),
        );
        assert_eq!(ids.len(), 1, "one {link_type} link on {ifname}: {ids:?}");
        let t = Instant::now();
        let out = std::process::Command::new("bpftool")
            .args(["link", "detach", "id", &ids[0].to_string()])
            .output()
            .expect("running bpftool");
        assert!(
            out.status.success(),
            "bpftool: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let took = time_until_refused(|| probe_ok(&lab), Duration::from_secs(3))
            .map(|_| t.elapsed())
            .unwrap_or_else(|| {
                panic!("probe still accepted 3 s after detaching {link_type} from {ifname}")
            });
        eprintln!("probe refused {took:.2?} after detaching the {link_type} program from {ifname}");
        assert!(took < Duration::from_secs(1), "took {took:?}");
        let what = if link_type == "xdp" { "XDP" } else { "TC" };
        assert!(
            gw.wait_for_log(&["unhealthy", what, ifname], Duration::from_secs(1))
                .is_some(),
            "{:#?}",
            gw.log()
        );
        let status = gw.stop().expect("stopping");
        assert!(
            status.success(),
            "a clean exit after the outside detach: {:#?}",
            gw.log()
        );
    }
}

#[test]
fn probe_is_refused_within_a_second_when_a_link_goes_down_and_answers_again_when_it_is_up() {
    let lab = lab();
    let mut gw = gateway(&lab, &["--health-port", "8080"]);
    // The first connection in a fresh lab waits for ARP.
    time_until_accepted(|| probe_ok(&lab), Duration::from_secs(3))
        .unwrap_or_else(|| panic!("the probe answers while healthy: {:#?}", gw.log()));
    assert_eq!(
        healthz(&lab, 8080),
        (200, r#"{"healthy":true}"#.to_string())
    );

    let took = probe_changes_after_ext(&lab, "down")
        .expect("probe still accepted 3 s after ext went down");
    eprintln!("probe refused {took:.2?} after ext went down");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    let (code, body) = healthz(&lab, 8080);
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains(r#""healthy":false"#) && body.contains("ext is down"),
        "{body}"
    );

    let back = probe_changes_after_ext(&lab, "up")
        .expect("probe not accepted again 3 s after ext came back");
    eprintln!("probe accepted again {back:.2?} after ext came back");
    assert_eq!(healthz(&lab, 8080).0, 200);
    // Its routes died with the link; the loader put them back.
    let routes = stdout(
        lab.exec(Host::Nat, &["ip", "route", "show", "table", "191"])
            .expect("ip route"),
    );
    assert!(routes.contains("default via 192.0.2.1"), "{routes}");
    let status = gw.stop().expect("stopping");
    assert!(status.success(), "{:#?}", gw.log());
}

/// Sets `ext` `state` ("down" or "up"); how long until the probe agrees
/// (refused while down, accepted again once up), if within 3 s.
fn probe_changes_after_ext(lab: &Lab, state: &str) -> Option<Duration> {
    let t = Instant::now();
    lab.exec(Host::Nat, &["ip", "link", "set", EXT_IF, state])
        .unwrap_or_else(|e| panic!("ext {state}: {e:#}"));
    let up = state == "up";
    time_until_refused(|| probe_ok(lab) != up, Duration::from_secs(3)).map(|_| t.elapsed())
}

/// ping's "N packets transmitted, M received" from its output.
fn ping_counts(output: &str) -> (u64, u64) {
    let summary = output
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("no ping summary in {output}"));
    let n = |i: usize| -> u64 {
        summary
            .split(", ")
            .nth(i)
            .and_then(|p| p.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("ping summary {summary:?}"))
    };
    (n(0), n(1))
}

/// Starts `ping <args> 198.51.100.10` in client1, its output piped.
fn ping_server(lab: &Lab, args: &[&str]) -> nat_lab::LabChild {
    let argv = [&["ping", "-n"], args, &["198.51.100.10"]].concat();
    let mut cmd = lab.command(Host::Client1, &argv);
    cmd.stdout(std::process::Stdio::piped());
    lab.spawn_command(&mut cmd).expect("starting ping")
}

/// Waits for a `ping_server` to end; its (transmitted, received).
fn ping_result(mut pinger: nat_lab::LabChild) -> (u64, u64) {
    let mut out = String::new();
    pinger
        .stdout
        .take()
        .expect("piped stdout")
        .read_to_string(&mut out)
        .expect("reading ping's output");
    pinger.wait().expect("ping ends");
    ping_counts(&out)
}

#[test]
fn when_ext_stops_taking_xdp_frames_under_a_running_gateway_tc_takes_over_within_a_second_and_only_the_counted_packets_are_lost()
 {
    let lab = lab();
    // Complete checksums: the pings take XDP, not a partial checksum's TC.
    lab.complete_checksums_on_the_wire()
        .expect("complete checksums");
    let mut gw = gateway(&lab, &[]);
    let (_, answered) = ping_result(ping_server(&lab, &["-c", "2", "-i", "0.2", "-W", "1"]));
    assert_eq!(answered, 2, "{:#?}", gw.log());
    let pinger = ping_server(&lab, &["-c", "60", "-i", "0.05", "-W", "1"]);
    std::thread::sleep(Duration::from_millis(700));
    // Nothing detached, nothing down: the router's end stops running NAPI,
    // and ext with it stops taking redirected frames.
    let t = Instant::now();
    lab.ethtool(Host::Router, nat_lab::ROUTER_NAT_IF, &["gro", "off"])
        .expect("gro off");
    let fallback = gw.wait_for_log(
        &[
            "ext cannot take redirected XDP frames",
            "hands the packets for it to TC",
        ],
        Duration::from_secs(2),
    );
    let took = t.elapsed();
    assert!(fallback.is_some(), "{:#?}", gw.log());
    eprintln!("TC took over {took:.2?} after ext lost ndo-xmit");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    let (sent, answered) = ping_result(pinger);
    gw.stop().expect("stop");
    let lost = sent - answered;
    // Traffic kept flowing; what was lost is what the kernel refused, all
    // of it counted, none of it as forwarded.
    assert!(lost < 20, "{lost} of {sent} lost");
    assert_eq!(gw.counter("xdp_int", "drop_redirect_refused"), lost);
    assert!(gw.counter("xdp_int", "xdp_to_tc_no_xdp_xmit") >= 30);
    assert!(gw.counter("tc_int", "tc_out_forwarded") >= 30);
    let unhealthy: Vec<String> = gw
        .log()
        .into_iter()
        .filter(|l| l.contains("unhealthy"))
        .collect();
    eprintln!("probe: {unhealthy:?}");
}

#[test]
fn refused_redirects_are_counted_exactly_and_fail_the_probe_within_a_second_until_they_stop() {
    let lab = lab();
    lab.complete_checksums_on_the_wire()
        .expect("complete checksums");
    let mut gw = gateway(&lab, &["--health-port", "8080"]);
    time_until_accepted(|| probe_ok(&lab), Duration::from_secs(3))
        .expect("the probe answers while healthy");
    let (_, answered) = ping_result(ping_server(&lab, &["-c", "2", "-i", "0.2", "-W", "1"]));
    assert_eq!(answered, 2);
    // The router's end takes no frame longer than its MTU; ext's own MTU
    // (1500) lets XDP redirect a 1438-byte packet, and the kernel drops it
    // when it flushes its queue to ext: a refusal the features do not
    // foretell.
    lab.exec(
        Host::Router,
        &["ip", "link", "set", nat_lab::ROUTER_NAT_IF, "mtu", "1400"],
    )
    .expect("mtu");
    let t = Instant::now();
    let pinger = ping_server(
        &lab,
        &["-c", "5", "-i", "0.2", "-W", "1", "-M", "do", "-s", "1410"],
    );
    let took = time_until_refused(|| probe_ok(&lab), Duration::from_secs(3))
        .map(|_| t.elapsed())
        .unwrap_or_else(|| panic!("probe still accepted 3 s into refusals: {:#?}", gw.log()));
    eprintln!("probe refused {took:.2?} after the refusals began");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    let (code, body) = healthz(&lab, 8080);
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("the kernel refuses XDP redirects into ext"),
        "{body}"
    );
    assert_eq!(ping_result(pinger), (5, 0));
    lab.exec(
        Host::Router,
        &["ip", "link", "set", nat_lab::ROUTER_NAT_IF, "mtu", "1500"],
    )
    .expect("mtu");
    let back = time_until_accepted(|| probe_ok(&lab), Duration::from_secs(5))
        .expect("the probe answers again once nothing is refused");
    eprintln!("probe accepted again {back:.2?} after the refusals stopped");
    gw.stop().expect("stop");
    assert_eq!(gw.counter("xdp_int", "drop_redirect_refused"), 5);
}

#[test]
fn the_probe_fails_within_a_second_when_the_snat_address_leaves_ext_and_answers_again_once_it_is_back()
 {
    let lab = lab();
    let mut gw = gateway(&lab, &["--health-port", "8080"]);
    time_until_accepted(|| probe_ok(&lab), Duration::from_secs(3))
        .expect("the probe answers while healthy");
    let t = Instant::now();
    lab.exec(
        Host::Nat,
        &["ip", "addr", "del", "192.0.2.2/24", "dev", EXT_IF],
    )
    .expect("ip addr del");
    lab.exec(
        Host::Nat,
        &["ip", "addr", "add", "192.0.2.3/24", "dev", EXT_IF],
    )
    .expect("ip addr add");
    let took = time_until_refused(|| probe_ok(&lab), Duration::from_secs(3))
        .map(|_| t.elapsed())
        .unwrap_or_else(|| panic!("probe still accepted 3 s later: {:#?}", gw.log()));
    eprintln!("probe refused {took:.2?} after the SNAT address left ext");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    let (code, body) = healthz(&lab, 8080);
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("SNAT address 192.0.2.2 is no longer configured on ext"),
        "{body}"
    );
    assert!(
        gw.wait_for_log(
            &["SNAT address was removed from ext", "192.0.2.2"],
            Duration::from_secs(1)
        )
        .is_some(),
        "{:#?}",
        gw.log()
    );
    lab.exec(
        Host::Nat,
        &["ip", "addr", "add", "192.0.2.2/24", "dev", EXT_IF],
    )
    .expect("ip addr add");
    time_until_accepted(|| probe_ok(&lab), Duration::from_secs(3))
        .expect("the probe answers again once the address is back");
    assert_eq!(healthz(&lab, 8080).0, 200);
    let status = gw.stop().expect("stopping");
    assert!(status.success(), "{:#?}", gw.log());
}

fn failover_lab(drain_first: Option<&str>) -> FailoverLab {
    let mut lab = FailoverLab::new(3).expect("building the failover lab (needs root, nft)");
    for i in 0..3 {
        let extra: Vec<&str> = match (i, drain_first) {
            (0, Some(secs)) => vec!["--drain-seconds", secs],
            _ => vec![],
        };
        lab.start_instance(i, &extra).expect("starting an instance");
    }
    lab.start_services().expect("echo server and prober");
    lab.wait_in_rotation(&[0, 1, 2], Duration::from_secs(10))
        .expect("all instances in rotation");
    lab
}

#[test]
fn failover_new_connections_succeed_within_3s_surviving_flows_continue_and_the_instance_rejoins() {
    let lab = failover_lab(None);
    let r = failover::drill(&lab, 1, 24).expect("the failover drill");
    eprintln!("{r:#?}");
    assert!(
        r.spread_before.iter().all(|&c| c > 0),
        "new flows spread over every instance: {:?}",
        r.spread_before
    );
    assert!(
        r.failed_attempts > 0,
        "some attempts hit the dead instance: {r:#?}"
    );
    assert!(
        r.failover <= Duration::from_secs(3),
        "new connections succeed again within 3 s: {:?}\n{}",
        r.failover,
        r.events
    );
    assert!(r.survivors > 0, "{r:#?}");
    assert!(
        r.survivors_broken.is_empty(),
        "no flow through a surviving instance breaks:\n{}",
        r.survivors_broken.join("\n")
    );
    assert!(
        r.spread_after[1] > 0,
        "the instance brought back gets new flows again: {:?}",
        r.spread_after
    );
}

#[test]
fn sigterm_drain_fails_the_probe_first_keeps_established_flows_and_then_leaves_nothing_behind() {
    let drain = Duration::from_secs(6);
    let mut lab = failover_lab(Some("6"));
    let mut gw0 = lab.take_gateway(0).expect("nat0's loader");
    let flows = lab.long_flows(24).expect("long-lived flows");
    let on0 = flows.instance.iter().filter(|i| **i == Some(0)).count();
    assert!(on0 > 0, "some flows through nat0: {:?}", flows.instance);
    let ns: &Namespaces = lab.namespaces();
    let run0 = |argv: &[&str]| stdout(ns.exec("nat0", argv).expect("in nat0"));
    let tcx0 = |ifname: String| {
        ns.in_ns("nat0", move || tcx_count(&ifname))
            .expect("in nat0")
    };
    let probe0 = || {
        ns.in_ns("lb", || {
            connect(
                Some(SocketAddrV4::new(AZURE_PROBE_IP, 0)),
                SocketAddrV4::new(int_ip(0), PROBE_PORT),
                Duration::from_millis(300),
            )
            .is_ok()
        })
        .expect("in lb")
    };
    assert!(probe0());

    let t0 = Instant::now();
    gw0.signal_term().expect("SIGTERM");
    let refused = time_until_refused(probe0, Duration::from_secs(2))
        .map(|_| t0.elapsed())
        .expect("nat0's probe still accepted 2 s after SIGTERM");
    eprintln!("probe refused {refused:.2?} after SIGTERM");
    assert!(refused < Duration::from_secs(1), "{refused:?}");
    // The probe fails first: the programs are still there.
    assert_eq!(attached(&run0, &tcx0, "int"), (true, 1, false));
    assert_eq!(attached(&run0, &tcx0, "ext"), (true, 1, false));

    // The load balancer takes it out; new flows land elsewhere while it drains.
    lab.wait_in_rotation(&[1, 2], Duration::from_secs(4))
        .expect("nat0 out of rotation");
    assert!(t0.elapsed() < drain, "taken out within the drain window");
    let spread = lab.spread(20).expect("new connections");
    assert!(t0.elapsed() < drain, "still draining");
    assert_eq!(
        spread[0], 0,
        "new flows avoid the draining instance: {spread:?}"
    );
    assert!(
        gw0.wait(Duration::ZERO).expect("waiting").is_none(),
        "nat0 still running"
    );
    // Established flows through nat0 keep exchanging well into the window.
    let before = flows.exchanges();
    std::thread::sleep(Duration::from_millis(1500));
    let after = flows.exchanges();
    assert!(t0.elapsed() < drain, "still draining: {:?}", t0.elapsed());
    for (k, inst) in flows.instance.iter().enumerate() {
        if *inst == Some(0) {
            assert!(
                after[k] >= before[k] + 5,
                "flow {k} through nat0 stalled during the drain: {} -> {} exchanges",
                before[k],
                after[k]
            );
        }
    }

    let status = gw0
        .wait(drain + Duration::from_secs(5))
        .expect("waiting")
        .expect("nat0 exits once the drain is over");
    let exited = Instant::now();
    assert!(status.success(), "{:#?}", gw0.log());
    let took = exited - t0;
    assert!(
        took >= drain,
        "forwarded for the whole drain window: exited after {took:?}"
    );
    let log = gw0.log();
    assert!(log.iter().any(|l| l.contains("draining")), "{log:#?}");

    let results = flows.finish();
    for (k, (inst, r)) in results.iter().enumerate() {
        match (inst, r.broke_at) {
            (Some(0), Some(at)) => assert!(
                at >= exited - Duration::from_millis(100),
                "flow {k} through nat0 broke {:?} after SIGTERM, during the drain: {:?}",
                at - t0,
                r.error
            ),
            (Some(0), None) => {}
            (_, None) => {}
            (i, Some(_)) => panic!("flow {k} through {i:?} broke: {:?}", r.error),
        }
    }
    // Nothing of ours left on nat0.
    assert_eq!(attached(&run0, &tcx0, "int"), (false, 0, false));
    assert_eq!(attached(&run0, &tcx0, "ext"), (false, 0, false));
    let left = policy_left(&run0);
    assert!(left.is_empty(), "rules or routes of ours left:\n{left}");
}

#[test]
fn a_second_sigterm_during_the_drain_stops_at_once_and_cleans_up() {
    let lab = lab();
    let mut gw = gateway(&lab, &["--drain-seconds", "30"]);
    time_until_accepted(|| probe_ok(&lab), Duration::from_secs(3)).expect("probe answers");
    gw.signal_term().expect("first SIGTERM");
    time_until_refused(|| probe_ok(&lab), Duration::from_secs(1))
        .expect("the probe fails at once on SIGTERM");
    assert!(
        gw.wait(Duration::from_secs(1)).expect("waiting").is_none(),
        "still draining (forwarding) after the first SIGTERM"
    );
    let t = Instant::now();
    gw.signal_term().expect("second SIGTERM");
    let status = gw
        .wait(Duration::from_secs(3))
        .expect("waiting")
        .expect("a second SIGTERM stops at once");
    eprintln!("exited {:.2?} after the second SIGTERM", t.elapsed());
    assert!(status.success(), "{:#?}", gw.log());
    assert_nothing_of_ours_left(&lab);
}

#[test]
fn purge_ours_removes_the_rules_and_routes_a_killed_loader_left_and_nothing_else() {
    let lab = lab();
    let gw_arg = PROBE_INT_GW.to_string();
    let mut gw = gateway(&lab, &["--int-gateway", &gw_arg]);
    let run = |argv: &[&str]| stdout(lab.exec(Host::Nat, argv).expect("in nat"));
    let main_before = run(&["ip", "route", "show", "table", "main"]);
    // SIGKILL: no cleanup runs, the rules and routes stay.
    let pid = gw.pid().expect("running");
    // SAFETY: kill(2) on our unreaped child.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    gw.wait(Duration::from_secs(5))
        .expect("waiting")
        .expect("killed");
    let left = policy_left(&run);
    assert!(
        left.contains("lookup 190") && left.contains("lookup 191"),
        "the killed loader left its rules:\n{left}"
    );
    let purge = || {
        lab.in_ns(Host::Nat, || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let handle = nat_loader::netif::connect().expect("netlink");
                nat_loader::routing::purge_ours(&handle).await
            })
        })
        .expect("in nat")
        .expect("purge_ours")
    };
    let (rules, routes) = purge();
    assert_eq!(rules, 2, "one rule per NIC address");
    assert!(routes >= 4, "subnet and default route per table: {routes}");
    let left = policy_left(&run);
    assert!(left.is_empty(), "left after purge_ours:\n{left}");
    assert_eq!(
        run(&["ip", "route", "show", "table", "main"]),
        main_before,
        "the main table is untouched"
    );
    assert_eq!(purge(), (0, 0), "a second purge finds nothing");
}

// ---- Azure Scheduled Events ----

/// The VM name the stub metadata service reports.
const STUB_VM: &str = "natvmss_3";

/// A stand-in for the instance metadata service on the `nat` namespace's
/// loopback (never the real 169.254.169.254): serves the VM's name and a
/// Scheduled Events document the test sets, and records every approval.
struct StubImds {
    addr: std::net::SocketAddr,
    events: std::sync::Arc<std::sync::Mutex<String>>,
    approvals: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StubImds {
    fn start(lab: &Lab) -> StubImds {
        use std::sync::{Arc, Mutex, atomic::AtomicBool};
        // A socket stays in the namespace it was made in, whichever thread
        // serves it.
        let listener = lab
            .in_ns(Host::Nat, || std::net::TcpListener::bind("127.0.0.1:0"))
            .expect("in nat")
            .expect("binding the stub metadata service");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("address");
        let events = Arc::new(Mutex::new(Self::document(None)));
        let approvals = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ev, ap, st) = (events.clone(), approvals.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => Self::serve(s, &ev, &ap),
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        StubImds {
            addr,
            events,
            approvals,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!(
            "http://{}/metadata/scheduledevents?api-version=2020-07-01",
            self.addr
        )
    }

    /// A Scheduled Events document: no event, or event `id` of `kind` for
    /// this VM.
    fn document(event: Option<(&str, &str)>) -> String {
        let events = match event {
            Some((id, kind)) => format!(
                r#"[{{"EventId":"{id}","EventType":"{kind}","ResourceType":"VirtualMachine","Resources":["{STUB_VM}"],"EventStatus":"Scheduled","NotBefore":"Sat, 21 Nov 2026 23:59:00 GMT","Description":"test","EventSource":"Platform","DurationInSeconds":-1}}]"#
            ),
            None => "[]".into(),
        };
        format!(r#"{{"DocumentIncarnation":1,"Events":{events}}}"#)
    }

    fn set(&self, event: Option<(&str, &str)>) {
        *self.events.lock().expect("lock") = Self::document(event);
    }

    fn approvals(&self) -> Vec<String> {
        self.approvals.lock().expect("lock").clone()
    }

    fn serve(
        mut s: std::net::TcpStream,
        events: &std::sync::Mutex<String>,
        approvals: &std::sync::Mutex<Vec<String>>,
    ) {
        let _ = s.set_nonblocking(false);
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut req = Vec::new();
        let mut buf = [0u8; 4096];
        // Head, then as much body as Content-Length says.
        let (head, body) = loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => req.extend_from_slice(&buf[..n]),
            }
            let Some(i) = req.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&req[..i]).into_owned();
            let want = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                })
                .unwrap_or(0);
            if req.len() >= i + 4 + want {
                break (
                    head,
                    String::from_utf8_lossy(&req[i + 4..i + 4 + want]).into_owned(),
                );
            }
        };
        let line = head.lines().next().unwrap_or("");
        let metadata_header = head
            .lines()
            .any(|l| l.eq_ignore_ascii_case("metadata: true"));
        let (code, text) = if !metadata_header {
            (400, "no Metadata: true header".to_string())
        } else if line.starts_with("GET /metadata/instance/compute/name") {
            (200, STUB_VM.to_string())
        } else if line.starts_with("GET /metadata/scheduledevents") {
            (200, events.lock().expect("lock").clone())
        } else if line.starts_with("POST /metadata/scheduledevents") {
            approvals.lock().expect("lock").push(body);
            (200, String::new())
        } else {
            (404, "not found".to_string())
        };
        let _ = write!(
            s,
            "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
            text.len()
        );
    }
}

impl Drop for StubImds {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn ping_through(lab: &Lab) -> bool {
    lab.exec(
        Host::Client1,
        &[
            "ping",
            "-c",
            "1",
            "-W",
            "1",
            &nat_lab::SERVER_IP.to_string(),
        ],
    )
    .is_ok()
}

/// A lab whose loader watches the stub metadata service's Scheduled
/// Events and drains `drain_seconds` before leaving; its probe answers.
fn watching_scheduled_events(drain_seconds: &str) -> (Lab, StubImds, Gateway) {
    let lab = lab();
    let imds = StubImds::start(&lab);
    let url = imds.url();
    let gw = gateway(
        &lab,
        &["--scheduled-events", &url, "--drain-seconds", drain_seconds],
    );
    time_until_accepted(|| probe_ok(&lab), Duration::from_secs(3)).expect("probe answers");
    (lab, imds, gw)
}

#[test]
fn scheduled_terminate_drains_keeps_forwarding_then_approves_and_leaves_nothing_behind() {
    let drain = Duration::from_secs(4);
    let (lab, imds, mut gw) = watching_scheduled_events("4");
    assert!(ping_through(&lab), "forwarding before the event");
    imds.set(Some(("9f3c-terminate", "Terminate")));
    let t0 = Instant::now();
    // Polled every second, then the probe closes at once.
    time_until_refused(|| probe_ok(&lab), Duration::from_secs(3))
        .expect("the probe fails once the event is seen");
    assert!(ping_through(&lab), "still forwarding during the drain");
    assert!(
        imds.approvals().is_empty(),
        "approved before the drain was over"
    );
    let status = gw
        .wait(drain + Duration::from_secs(5))
        .expect("waiting")
        .expect("the loader shuts down after the drain");
    let took = t0.elapsed();
    eprintln!("event seen, drained and approved; exited {took:.2?} after the event appeared");
    assert!(status.success(), "{:#?}", gw.log());
    assert!(
        took >= drain,
        "exited before the drain window was over: {took:?}"
    );
    let approvals = imds.approvals();
    assert_eq!(approvals.len(), 1, "{approvals:?}");
    let body: serde_json::Value = serde_json::from_str(&approvals[0]).expect("JSON approval");
    assert_eq!(body["StartRequests"][0]["EventId"], "9f3c-terminate");
    assert_nothing_of_ours_left(&lab);
}

#[test]
fn a_freeze_is_ignored_and_a_withdrawn_terminate_cancels_the_drain() {
    let (lab, imds, mut gw) = watching_scheduled_events("30");
    // A Freeze pauses the VM for seconds; its flows stay, so no drain.
    imds.set(Some(("f1", "Freeze")));
    // Polled every second: after 2.5 s it has been read twice.
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        !gw.log().iter().any(|l| l.contains("draining")),
        "drained for a Freeze: {:#?}",
        gw.log()
    );
    time_until_accepted(|| probe_ok(&lab), Duration::from_secs(2))
        .expect("the probe still answers");
    imds.set(Some(("t2", "Terminate")));
    time_until_refused(|| probe_ok(&lab), Duration::from_secs(3))
        .expect("the probe fails for a Terminate");
    imds.set(None);
    time_until_accepted(|| probe_ok(&lab), Duration::from_secs(3))
        .expect("the probe answers again once the event is withdrawn");
    assert!(
        gw.wait(Duration::from_millis(500))
            .expect("waiting")
            .is_none(),
        "still running"
    );
    assert!(imds.approvals().is_empty(), "{:?}", imds.approvals());
    // Shut down without the 30 s drain: a second SIGTERM stops at once.
    gw.signal_term().expect("SIGTERM");
    time_until_refused(|| probe_ok(&lab), Duration::from_secs(1)).expect("draining");
    gw.signal_term().expect("second SIGTERM");
    gw.wait(Duration::from_secs(5))
        .expect("waiting")
        .expect("stopped");
    assert!(
        gw.log().iter().any(|l| l.contains("withdrawn")),
        "{:#?}",
        gw.log()
    );
}

//! `cargo xtask demo`: builds the namespace lab, shows that without the
//! gateway the private subnet cannot reach the server, starts the real
//! `nat-loader`, sends real traffic through it and prints the translated
//! flows and counters the loader reports. Then it runs three instances
//! behind an emulated internal load balancer, stops one as a VM would stop,
//! and prints how long until new connections succeed again. The labs are
//! removed at the end (also on failure).

use std::{thread::sleep, time::Duration};

use anyhow::{Context, Result, ensure};
use nat_lab::failover::{self, FailoverLab, PROBE_INTERVAL, PROBE_THRESHOLD};
use nat_lab::{
    Bpffs, CLIENT1_IP, CLIENT2_IP, Flow, Gateway, Host, Lab, NAT_EXT_IP, SERVER_IP, ping,
    tcp_transfer, udp_exchange,
};

fn main() {
    if let Err(e) = run() {
        eprintln!("demo failed: {e:#}");
        std::process::exit(1);
    }
}

fn step(title: &str) {
    println!("\n=== {title}");
}

/// Prints the loader's log lines not printed yet.
fn show_log(gw: &Gateway, seen: &mut usize) {
    let log = gw.log();
    for line in &log[*seen..] {
        // Drop the timestamp and level: the message is what matters here.
        let msg = line
            .split_once("nat_loader")
            .map(|(_, m)| m)
            .unwrap_or(line);
        println!("  loader{msg}");
    }
    *seen = log.len();
}

fn run() -> Result<()> {
    step("building the lab: client1, client2 -> [int | nat | ext] -> router -> server");
    // The loader's pins (maps, links) live on a bpffs of this host, as on
    // a VM; declared before the lab so it is unmounted after the lab goes.
    let bpffs = Bpffs::new().context("mounting a BPF file system for the pins")?;
    let pin_dir = bpffs.pin_dir().display().to_string();
    let lab = Lab::new().context("building the lab (run as root)")?;
    println!("  private subnet 10.1.0.0/24, gateway ext {NAT_EXT_IP}, server {SERVER_IP}");
    println!("  the router has no route back to 10.1.0.0/24, as on the Internet");

    step("without the gateway: the kernel forwards but nothing translates");
    let flow = Flow::to_server(Host::Client1, 8080).timeout(Duration::from_secs(3));
    match tcp_transfer(&lab, &flow, 64 * 1024) {
        Ok(_) => println!("  unexpected: TCP worked without the gateway"),
        Err(e) => println!("  TCP client1 -> server fails as expected: {e:#}"),
    }

    step("starting nat-loader --int int --ext ext");
    let mut gw = Gateway::start(
        &lab,
        &[
            "--stats-interval",
            "1",
            "--show-flows",
            "10",
            "--bpffs-dir",
            &pin_dir,
        ],
    )?;
    let mut seen = 0;
    show_log(&gw, &mut seen);

    step("ping client1 -> server");
    let p = ping(&lab, Host::Client1, SERVER_IP, 3, Duration::from_secs(5))?;
    println!("  {}/{} echo replies", p.received, p.transmitted);
    ensure!(
        p.all_replied(),
        "ping through the gateway failed:\n{}",
        p.output
    );

    step("TCP client1 -> server, 8 MB each way, SHA-256 verified");
    let r = tcp_transfer(&lab, &Flow::to_server(Host::Client1, 8080), 8 << 20)?;
    println!(
        "  client {} reached the server, which saw {} (the gateway's address) in {:.2?}",
        r.client_addr, r.server_saw, r.elapsed
    );

    step("UDP client2 -> server, 20 datagrams");
    let u = udp_exchange(&lab, &Flow::to_server(Host::Client2, 5300), 20)?;
    println!(
        "  {} answered; the server saw {:?}",
        u.answered,
        u.single_source()
    );

    step("two clients, same source port 45000, same server port");
    for (host, ip) in [(Host::Client1, CLIENT1_IP), (Host::Client2, CLIENT2_IP)] {
        let f = Flow::to_server(host, 5301).src_ip(ip).src_port(45000);
        let u = udp_exchange(&lab, &f, 5)?;
        println!("  {ip}:45000 -> server saw {:?}", u.single_source());
    }

    step("checksum offload off, as frames arrive from a real NIC: the XDP fast path");
    lab.complete_checksums_on_the_wire()?;
    let r = tcp_transfer(&lab, &Flow::to_server(Host::Client1, 8081), 8 << 20)?;
    println!(
        "  8 MB each way in {:.2?}; watch xdp_out_forwarded / xdp_in_forwarded grow",
        r.elapsed
    );

    sleep(Duration::from_millis(1200));
    step("what the loader reports (counters per program, translated flows)");
    show_log(&gw, &mut seen);

    step("stopping the loader: it detaches everything");
    gw.stop()?;
    show_log(&gw, &mut seen);
    let out = lab.exec(Host::Nat, &["ip", "-d", "link", "show", "int"])?;
    let xdp_left = String::from_utf8_lossy(&out.stdout).contains("prog/xdp");
    println!("  XDP program left on int: {xdp_left}");
    step("removing the lab");
    drop(lab);
    println!("  done");
    failover_demo()
}

fn failover_demo() -> Result<()> {
    step("high availability: 3 NAT instances behind an emulated internal load balancer");
    println!("  client 10.9.0.2 -> lb (ECMP, L4 hash) -> nat0..nat2 -> router -> server");
    println!(
        "  the lb probes each instance's port 9999 from 168.63.129.16 every {PROBE_INTERVAL:?}; \
         {PROBE_THRESHOLD} failures take it out, {PROBE_THRESHOLD} successes put it back"
    );
    let mut lab = FailoverLab::new(3).context("building the failover lab")?;
    for i in 0..3 {
        lab.start_instance(i, &[])?;
    }
    lab.start_services()?;
    lab.wait_in_rotation(&[0, 1, 2], Duration::from_secs(10))?;
    println!("  all three instances answer their probes (replies leave by int: policy routing)");

    step("failover drill: 24 long-lived flows, then nat1 stops (its links go down)");
    let r = failover::drill(&lab, 1, 24)?;
    println!(
        "  new connections per instance before: {:?}",
        r.spread_before
    );
    println!("  load balancer events:\n{}", r.events);
    println!(
        "  nat1 taken out {:.2?} after it stopped; {} of {} new connections (one every 50 ms) failed meanwhile",
        r.removed_after, r.failed_attempts, r.attempts
    );
    println!(
        "  ==> failover time: new connections succeed again {:.2?} after the instance died",
        r.failover
    );
    println!(
        "  long-lived flows: {} through the survivors, {} broken; {} through nat1, lost with it ({} broke)",
        r.survivors,
        r.survivors_broken.len(),
        r.victims,
        r.victims_broken
    );
    println!(
        "  nat1 back: in rotation again {:.2?} after its links came up; new connections per instance: {:?}",
        r.rejoined_after, r.spread_after
    );
    ensure!(
        r.survivors_broken.is_empty(),
        "flows through surviving instances broke:\n{}",
        r.survivors_broken.join("\n")
    );
    ensure!(
        r.failover <= Duration::from_secs(3),
        "failover took {:?}",
        r.failover
    );
    step("removing the failover lab");
    drop(lab);
    println!("  done");
    Ok(())
}

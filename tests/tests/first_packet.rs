//! The first packet of a new flow is never lost, even when no hop on the
//! way knows the next one's MAC yet. Each packet goes after every
//! neighbour in the lab was forgotten (the gateway's for the router and
//! the clients, the router's, the server's, the clients'; the switch is a
//! bridge, which floods until it learns), or only the gateway's: then the
//! client still knows the gateway and sends at once, and the gateway,
//! which did not learn the client from its ARP request, must resolve it
//! for the reply. Either way the gateway's FIB lookup finds no neighbour
//! for the router and then for the client: XDP hands the packet to TC (`xdp_to_tc_no_neigh`),
//! which creates or finds the flow and sends it with `bpf_redirect_neigh`,
//! whose neighbour resolution queues it until ARP answers. Then one
//! packet, with no retransmission, must be answered within less than any
//! retransmit timer: a UDP datagram, a TCP SYN (its first retransmit
//! comes after 1 s), an echo request; from a client with complete
//! checksums (XDP's path) and one with partial ones (TC's path from the
//! start). A loss would show as a missing or late answer.

use std::{
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use nat_lab::{
    Flow, Gateway, Host, Lab, SERVER_IP, accept_within, gateway, lab, ping, udp_exchange,
};

const ROUNDS: u16 = 8;
/// Under every retransmit timer (TCP's first SYN retransmit: 1 s; ARP's
/// own retry: 1 s), over a first ARP exchange on a loaded machine.
const IN_TIME: Duration = Duration::from_millis(900);

/// Forgets the neighbour entries of `hosts`.
fn forget_neighbours(lab: &Lab, hosts: &[Host]) {
    for &h in hosts {
        lab.exec(h, &["ip", "-4", "neigh", "flush", "all"])
            .expect("flushing the neighbours");
    }
}

fn start() -> (Lab, Gateway) {
    let lab = lab();
    // client1 and the server send complete checksums, client2 partial ones.
    lab.complete_checksums_on_the_wire()
        .expect("complete checksums");
    let gw = gateway(&lab, &[]);
    (lab, gw)
}

/// How long `f` took, failing if it did not succeed.
fn timed<T>(what: &str, f: impl FnOnce() -> anyhow::Result<T>) -> Duration {
    let t = Instant::now();
    if let Err(e) = f() {
        panic!("{what}: {e:#}");
    }
    t.elapsed()
}

#[test]
fn the_first_packet_of_a_new_flow_is_answered_with_every_neighbour_unresolved() {
    let (lab, mut gw) = start();
    let mut worst = Duration::ZERO;
    let everyone = [
        Host::Client1,
        Host::Client2,
        Host::Nat,
        Host::Router,
        Host::Server,
    ];
    let mut n = 0;
    for round in 0..ROUNDS {
        let hosts: &[Host] = if round % 2 == 0 {
            &everyone
        } else {
            &[Host::Nat]
        };
        for client in [Host::Client1, Host::Client2] {
            let port = 20000 + round * 10 + client as u16;
            n += 3;

            forget_neighbours(&lab, hosts);
            // One datagram, no retry: answered, or lost.
            let flow = Flow::to_server(client, port).timeout(IN_TIME);
            let t = timed(&format!("round {round}: UDP from {client}"), || {
                udp_exchange(&lab, &flow, 1)
            });
            worst = worst.max(t);

            forget_neighbours(&lab, hosts);
            let listener = lab
                .tcp_listener(Host::Server, SocketAddrV4::new(SERVER_IP, port))
                .expect("listener");
            let t = timed(&format!("round {round}: TCP SYN from {client}"), || {
                let dst = SocketAddrV4::new(SERVER_IP, port);
                let s = lab.tcp_connect(client, None, dst, IN_TIME)?;
                anyhow::ensure!(
                    accept_within(&listener, Duration::from_millis(100))?.is_some(),
                    "connected, but the server accepted nothing"
                );
                drop(s);
                Ok(())
            });
            worst = worst.max(t);

            forget_neighbours(&lab, hosts);
            let t = timed(&format!("round {round}: ping from {client}"), || {
                let r = ping(&lab, client, SERVER_IP, 1, Duration::from_secs(1))?;
                anyhow::ensure!(r.all_replied(), "no reply: {}", r.output);
                Ok(())
            });
            // ping's own start-up is in there: reported, not bounded here
            // (its -W 1 is the bound).
            worst = worst.max(t.min(IN_TIME));
        }
    }
    gw.stop().expect("stopping the gateway");
    eprintln!("{n} first packets, each answered; slowest UDP/TCP answer {worst:?}");
    // The unresolved neighbours really were the path, both ways.
    assert!(
        gw.counter("xdp_int", "xdp_to_tc_no_neigh") > 0,
        "{:#?}",
        gw.log()
    );
    assert!(
        gw.counter("xdp_ext", "xdp_to_tc_no_neigh") > 0,
        "{:#?}",
        gw.log()
    );
}

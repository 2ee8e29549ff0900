//! The six-host lab of the crate's docs, described with [`Namespaces`].

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::netns::{LabChild, Namespaces, PeerNapi};
use crate::*;

/// Veth pairs: (host, interface, peer host, peer interface).
const LINKS: [(Host, &str, Host, &str); 5] = [
    (Host::Client1, HOST_IF, Host::Sw, SW_CLIENT1_PORT),
    (Host::Client2, HOST_IF, Host::Sw, SW_CLIENT2_PORT),
    (Host::Nat, INT_IF, Host::Sw, SW_NAT_PORT),
    (Host::Nat, EXT_IF, Host::Router, ROUTER_NAT_IF),
    (Host::Router, ROUTER_SRV_IF, Host::Server, HOST_IF),
];

/// Interfaces that get an address: (host, interface, address).
const ADDRESSES: [(Host, &str, Ipv4Addr); 7] = [
    (Host::Client1, HOST_IF, CLIENT1_IP),
    (Host::Client2, HOST_IF, CLIENT2_IP),
    (Host::Nat, INT_IF, NAT_INT_IP),
    (Host::Nat, EXT_IF, NAT_EXT_IP),
    (Host::Router, ROUTER_NAT_IF, ROUTER_NAT_IP),
    (Host::Router, ROUTER_SRV_IF, ROUTER_SRV_IP),
    (Host::Server, HOST_IF, SERVER_IP),
];

/// Devices whose TX checksum offload is off: the last hop before each
/// endpoint, so a partial checksum is completed in software before the
/// packet is delivered and the endpoints really verify every checksum.
const TX_CSUM_OFF: [(Host, &str); 3] = [
    (Host::Sw, SW_CLIENT1_PORT),
    (Host::Sw, SW_CLIENT2_PORT),
    (Host::Router, ROUTER_SRV_IF),
];

/// How a [`Lab`] is built. `LabOptions::default()` is the standard lab.
#[derive(Clone, Debug)]
pub struct LabOptions {
    /// `net.ipv4.ip_forward` in `nat`. On by default, so the kernel could
    /// forward and only the missing translation makes traffic fail.
    pub nat_ip_forward: bool,
    /// How the far ends of the gateway's links (`sw-nat`, `r-nat`) get
    /// NAPI: whether `int` and `ext` can take redirected XDP frames.
    pub gateway_peers: PeerNapi,
}

impl LabOptions {
    /// The lab with forwarding off in `nat`: the loader must switch it on,
    /// and its exit must restore it.
    pub fn nat_forwarding_off() -> LabOptions {
        LabOptions {
            nat_ip_forward: false,
            ..LabOptions::default()
        }
    }

    /// The lab with the gateway's NICs unable to take redirected XDP
    /// frames as `peers` makes them ([`PeerNapi::AfterUp`],
    /// [`PeerNapi::Off`]).
    pub fn gateway_peers(peers: PeerNapi) -> LabOptions {
        LabOptions {
            gateway_peers: peers,
            ..LabOptions::default()
        }
    }
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            nat_ip_forward: true,
            gateway_peers: PeerNapi::Before,
        }
    }
}

/// A running lab: six network namespaces, removed again on drop.
pub struct Lab {
    ns: Namespaces,
    names: [String; 6],
}

impl Lab {
    /// Builds the standard lab. Needs root.
    pub fn new() -> Result<Lab> {
        Lab::new_with(LabOptions::default())
    }

    /// Builds a lab with `options`. On failure everything created so far is
    /// removed again.
    pub fn new_with(options: LabOptions) -> Result<Lab> {
        let ns = Namespaces::new("");
        let names = Host::ALL.map(|h| ns.ns(h.role()));
        let mut lab = Lab { ns, names };
        // On error `lab` is dropped here, which tears down the partial lab.
        lab.build(&options)
            .with_context(|| format!("building network lab {}", lab.id()))?;
        Ok(lab)
    }

    fn build(&mut self, options: &LabOptions) -> Result<()> {
        for h in Host::ALL {
            self.ns.add(h.role())?;
        }
        let ns = &self.ns;
        for (a, a_if, b, b_if) in LINKS {
            let napi = if a == Host::Nat {
                options.gateway_peers
            } else {
                PeerNapi::Before
            };
            ns.veth_with(a.role(), a_if, b.role(), b_if, napi)?;
        }
        let ports = [SW_CLIENT1_PORT, SW_CLIENT2_PORT, SW_NAT_PORT];
        ns.bridge(Host::Sw.role(), SW_BRIDGE, &ports)?;
        for (h, dev) in TX_CSUM_OFF {
            ns.ethtool(h.role(), dev, &["tx", "off"])?;
        }
        for (h, dev, ip) in ADDRESSES {
            ns.addr(h.role(), dev, &format!("{ip}/{PREFIX_LEN}"))?;
        }

        let via = |gw: Ipv4Addr| gw.to_string();
        for client in [Host::Client1, Host::Client2] {
            let gw = via(NAT_INT_IP);
            ns.ip(client.role(), &["route", "add", "default", "via", &gw])?;
        }
        let gw = via(ROUTER_NAT_IP);
        let nat_route = ["route", "add", "default", "via", &gw, "dev", EXT_IF];
        ns.ip(Host::Nat.role(), &nat_route)?;
        let gw = via(ROUTER_SRV_IP);
        ns.ip(
            Host::Server.role(),
            &["route", "add", "default", "via", &gw],
        )?;
        // Deliberately no route to PRIVATE_NET in the router: the Internet
        // does not know private addresses.

        let fwd = if options.nat_ip_forward { "1" } else { "0" };
        ns.sysctl(Host::Nat.role(), "net/ipv4/ip_forward", fwd)?;
        ns.sysctl(Host::Router.role(), "net/ipv4/ip_forward", "1")?;
        ns.settle()
    }

    /// `natlab-<pid>-<counter>`: the common prefix of this lab's namespaces.
    pub fn id(&self) -> &str {
        self.ns.prefix()
    }

    /// The namespaces, for what the methods here do not cover (roles are
    /// [`Host::role`]).
    pub fn namespaces(&self) -> &Namespaces {
        &self.ns
    }

    /// The name of `h`'s network namespace.
    pub fn ns(&self, h: Host) -> &str {
        &self.names[h as usize]
    }

    /// The bind mount that keeps `h`'s namespace alive (for `setns`).
    pub fn ns_path(&self, h: Host) -> PathBuf {
        self.ns.ns_path(h.role())
    }

    /// A `Command` that runs `argv` inside `h` (`ip netns exec`), for
    /// callers that want to set up stdio themselves; see [`Lab::spawn_command`].
    pub fn command(&self, h: Host, argv: &[&str]) -> Command {
        self.ns.command(h.role(), argv)
    }

    /// Runs `argv` inside `h` and fails, with its stderr, unless it exits 0.
    pub fn exec(&self, h: Host, argv: &[&str]) -> Result<Output> {
        self.ns.exec(h.role(), argv)
    }

    /// Runs `argv` inside `h` and returns its output whatever the exit
    /// status; fails only if it cannot be started.
    pub fn exec_unchecked(&self, h: Host, argv: &[&str]) -> Result<Output> {
        self.ns.exec_unchecked(h.role(), argv)
    }

    /// Runs `argv` inside `h`, killing it after `timeout`; returns its output
    /// whatever the exit status, or an error if it had to be killed.
    pub fn exec_timeout(&self, h: Host, argv: &[&str], timeout: Duration) -> Result<Output> {
        self.ns.exec_timeout(h.role(), argv, timeout)
    }

    /// `ethtool -K <dev> <features>` in `h` (e.g. `["tx", "off"]`).
    pub fn ethtool(&self, h: Host, dev: &str, features: &[&str]) -> Result<()> {
        self.ns.ethtool(h.role(), dev, features)
    }

    /// Makes client1's and the server's traffic reach the gateway as from
    /// a real NIC: complete checksums (their TX offload off) and no GRO
    /// re-merging them into offloaded super-packets on the way (GRO off on
    /// the hops before the gateway). The XDP fast path's case.
    pub fn complete_checksums_on_the_wire(&self) -> Result<()> {
        self.ethtool(Host::Client1, HOST_IF, &["tx", "off"])?;
        self.ethtool(Host::Server, HOST_IF, &["tx", "off"])?;
        self.ethtool(Host::Sw, SW_CLIENT1_PORT, &["gro", "off"])?;
        self.ethtool(Host::Router, ROUTER_SRV_IF, &["gro", "off"])
    }

    /// `/proc/sys/<key>` as `h` sees it (e.g. `net/ipv4/ip_forward`), trimmed.
    pub fn read_sysctl(&self, h: Host, key: &str) -> Result<String> {
        self.ns.read_sysctl(h.role(), key)
    }

    /// A permanent neighbour entry in `h` (see [`Namespaces::pin_neighbour`]).
    pub fn pin_neighbour(&self, h: Host, ip: Ipv4Addr, mac: [u8; 6], dev: &str) -> Result<()> {
        self.ns.pin_neighbour(h.role(), ip, mac, dev)
    }

    /// The MAC address of `ifname` in `h`.
    pub fn mac(&self, h: Host, ifname: &str) -> Result<[u8; 6]> {
        self.ns.mac(h.role(), ifname)
    }

    /// The interface index of `ifname` in `h`.
    pub fn ifindex(&self, h: Host, ifname: &str) -> Result<u32> {
        self.ns.ifindex(h.role(), ifname)
    }

    /// Starts `argv` inside `h` with stdin closed and stdout/stderr
    /// inherited. The process is killed when the returned handle or the lab
    /// is dropped, whichever comes first.
    pub fn spawn(&self, h: Host, argv: &[&str]) -> Result<LabChild> {
        self.ns.spawn(h.role(), argv)
    }

    /// Starts a command made by [`Lab::command`] (e.g. with piped stdout).
    pub fn spawn_command(&self, cmd: &mut Command) -> Result<LabChild> {
        self.ns.spawn_command(cmd)
    }

    /// Runs `f` on a new thread that has joined `h`'s network namespace and
    /// returns its result (a panic in `f` is re-raised here). Sockets created
    /// in `f` stay in that namespace wherever they are used afterwards.
    pub fn in_ns<F, R>(&self, h: Host, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        self.ns.in_ns(h.role(), f)
    }

    /// A UDP socket in `h` bound to `bind` (`0.0.0.0:0` for any).
    pub fn udp_socket(&self, h: Host, bind: SocketAddrV4) -> Result<UdpSocket> {
        self.ns.udp_socket(h.role(), bind)
    }

    /// A TCP listener in `h` bound to `bind`.
    pub fn tcp_listener(&self, h: Host, bind: SocketAddrV4) -> Result<TcpListener> {
        self.ns.tcp_listener(h.role(), bind)
    }

    /// A TCP connection from `h` to `dst`, optionally from source `src`
    /// (port 0 = any), given up after `timeout`.
    pub fn tcp_connect(
        &self,
        h: Host,
        src: Option<SocketAddrV4>,
        dst: SocketAddrV4,
        timeout: Duration,
    ) -> Result<TcpStream> {
        self.ns.tcp_connect(h.role(), src, dst, timeout)
    }
}

/// The standard lab, for a test: panics, at the caller's line, when it
/// cannot be built (e.g. without root).
#[track_caller]
pub fn lab() -> Lab {
    lab_with(LabOptions::default())
}

/// [`lab`] built with `options`.
#[track_caller]
pub fn lab_with(options: LabOptions) -> Lab {
    match Lab::new_with(options) {
        Ok(lab) => lab,
        Err(e) => panic!("building the lab (needs root): {e:#}"),
    }
}

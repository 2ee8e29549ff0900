//! A network-namespace lab for end-to-end tests of the NAT gateway.
//!
//! [`Lab::new`] builds six namespaces wired like this (names are unique per
//! lab, so labs in parallel test threads and processes never collide):
//!
//! ```text
//! client1 (eth0 10.1.0.11/24) --\
//!                                sw (br0) -- nat: int 10.1.0.1/24 | ext 192.0.2.2/24
//! client2 (eth0 10.1.0.12/24) --/               -- router: r-nat 192.0.2.1/24 | r-srv 198.51.100.1/24
//!                                                  -- server (eth0 198.51.100.10/24)
//! ```
//!
//! The router has no route to the private subnet, so traffic from the
//! clients reaches the server only if something in `nat` translates it.
//! Dropping the [`Lab`] (also while unwinding from a panic) kills every
//! process left in its namespaces and deletes them.
//!
//! Every topology is described with one namespace library, [`netns`]:
//! the lab, and for high availability [`probers`] (two namespaces holding
//! Azure's probe address 168.63.129.16, added to a lab) and [`failover`]
//! (several instances behind an emulated internal load balancer with its
//! prober), and the benchmark's topology ([`bench`]). [`flood`] sends a SYN
//! flood of distinct 5-tuples (table-pressure tests).
//!
//! Traffic helpers ([`tcp_transfer`], [`udp_exchange`], [`ping`],
//! [`udp_listen_for`], [`tcp_accepts_within`], ...) are bounded by timeouts
//! and return an error instead of hanging.
//!
//! ```no_run
//! use nat_lab::{Flow, Host, Lab, SERVER_IP, tcp_transfer};
//! use std::net::SocketAddrV4;
//!
//! let lab = Lab::new().expect("build lab (needs root)");
//! let mut loader = lab
//!     .spawn(Host::Nat, &["nat-loader", "--int", "int", "--ext", "ext"])
//!     .expect("start loader");
//! let flow = Flow::new(Host::Client1, Host::Server, SocketAddrV4::new(SERVER_IP, 8080));
//! let report = tcp_transfer(&lab, &flow, 1 << 20).expect("transfer through the gateway");
//! assert_eq!(report.server_saw.ip(), nat_lab::NAT_EXT_IP);
//! loader.kill().expect("stop loader");
//! ```

pub mod bench;
mod bpffs;
pub mod failover;
pub mod flood;
mod gateway;
mod lab;
pub mod netns;
pub mod packet;
pub mod probers;
pub mod prometheus;
pub mod soak;
mod streams;
pub mod sweep_scale;
pub mod tables;
pub mod test_run;
mod traffic;

pub use bpffs::Bpffs;
pub use streams::{EchoStreams, StreamReport};

pub use gateway::{Gateway, READY, flags, gateway, loader_path, run_loader};

pub use lab::{Lab, LabOptions, lab, lab_with};
pub use netns::{LabChild, PeerNapi};
pub use traffic::{
    Flow, PingReport, TcpReport, UdpReport, accept_within, ping, recv_all_within,
    tcp_accepts_within, tcp_transfer, udp_exchange, udp_listen_for, udp_send,
};

use std::net::Ipv4Addr;

/// Prefix of every namespace a lab creates: `natlab-<pid>-<counter>-<role>`.
pub const NS_PREFIX: &str = "natlab-";

/// The private subnet behind the gateway (prefix length [`PREFIX_LEN`]).
pub const PRIVATE_NET: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 0);
/// The transit subnet between the gateway and the router.
pub const TRANSIT_NET: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 0);
/// The server's subnet behind the router.
pub const SERVER_NET: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 0);
/// Prefix length of every subnet in the lab.
pub const PREFIX_LEN: u8 = 24;

pub const CLIENT1_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 11);
pub const CLIENT2_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 12);
/// The gateway's address on the private side; the clients' default gateway.
pub const NAT_INT_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
/// The gateway's public address: what the server should see as source.
pub const NAT_EXT_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// The router's address toward the gateway; the gateway's default gateway.
pub const ROUTER_NAT_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// The router's address toward the server; the server's default gateway.
pub const ROUTER_SRV_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);

/// Interface of client1, client2 and server.
pub const HOST_IF: &str = "eth0";
/// The gateway's private-side interface (loader: `--int int`).
pub const INT_IF: &str = "int";
/// The gateway's public-side interface (loader: `--ext ext`).
pub const EXT_IF: &str = "ext";
pub const ROUTER_NAT_IF: &str = "r-nat";
pub const ROUTER_SRV_IF: &str = "r-srv";
/// The bridge in `sw` and its ports toward client1, client2 and nat.
pub const SW_BRIDGE: &str = "br0";
pub const SW_CLIENT1_PORT: &str = "sw-c1";
pub const SW_CLIENT2_PORT: &str = "sw-c2";
pub const SW_NAT_PORT: &str = "sw-nat";

/// A machine in the lab; each has its own network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    Client1,
    Client2,
    /// The switch: a bridge joining the clients and the gateway's `int`.
    Sw,
    /// The gateway under test; has interfaces [`INT_IF`] and [`EXT_IF`].
    Nat,
    /// The "Internet": forwards between the gateway and the server.
    Router,
    Server,
}

impl Host {
    pub const ALL: [Host; 6] = [
        Host::Client1,
        Host::Client2,
        Host::Sw,
        Host::Nat,
        Host::Router,
        Host::Server,
    ];

    /// The last component of the namespace name.
    pub fn role(self) -> &'static str {
        match self {
            Host::Client1 => "client1",
            Host::Client2 => "client2",
            Host::Sw => "sw",
            Host::Nat => "nat",
            Host::Router => "router",
            Host::Server => "server",
        }
    }
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.role())
    }
}

//! Azure-style health probers for the standard [`Lab`]: two namespaces that
//! hold the platform's probe address 168.63.129.16, one reached through the
//! gateway's internal NIC, one through its external NIC.
//!
//! ```text
//! probe-int (pi0 10.1.0.254/24, lo 168.63.129.16) -- sw br0 -- nat int 10.1.0.1
//! probe-ext (pe0 203.0.113.2/24, lo 168.63.129.16) -- router r-pe 203.0.113.1 -- nat ext 192.0.2.2
//! ```
//!
//! probe-int also plays the internal subnet's gateway (as the Azure fabric
//! does): the loader's `--int-gateway` in tests. The router routes
//! 168.63.129.16 to probe-ext, so a reply to an internal probe that leaves
//! by the gateway's default route (out of ext) reaches the wrong prober and
//! the internal probe fails, as on a two-NIC Azure VM without policy routing.

use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::time::Duration;

use anyhow::Result;

use crate::netns::Namespaces;
use crate::{Host, Lab, SW_BRIDGE};

/// The address Azure's load balancer probes come from.
pub const AZURE_PROBE_IP: Ipv4Addr = Ipv4Addr::new(168, 63, 129, 16);
/// probe-int's address on the private subnet; the internal NIC's gateway.
pub const PROBE_INT_GW: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 254);
pub const PROBE_EXT_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
pub const ROUTER_PROBE_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);

/// The two prober namespaces; removed on drop.
pub struct Probers {
    ns: Namespaces,
}

impl Probers {
    /// Adds probe-int and probe-ext to `lab`.
    pub fn attach(lab: &Lab) -> Result<Probers> {
        let mut ns = Namespaces::with_prefix(lab.id().to_string());
        ns.add("probe-int")?;
        ns.add("probe-ext")?;
        let (sw, router) = (lab.ns(Host::Sw), lab.ns(Host::Router));
        let probe_ip = format!("{AZURE_PROBE_IP}/32");
        ns.veth("probe-int", "pi0", sw, "sw-pi")?;
        ns.ip(sw, &["link", "set", "sw-pi", "master", SW_BRIDGE])?;
        ns.addr("probe-int", "pi0", &format!("{PROBE_INT_GW}/24"))?;
        ns.addr("probe-int", "lo", &probe_ip)?;

        ns.veth("probe-ext", "pe0", router, "r-pe")?;
        ns.addr(router, "r-pe", &format!("{ROUTER_PROBE_IP}/24"))?;
        let probe_ext = PROBE_EXT_IP.to_string();
        ns.ip(router, &["route", "add", &probe_ip, "via", &probe_ext])?;
        ns.addr("probe-ext", "pe0", &format!("{PROBE_EXT_IP}/24"))?;
        ns.addr("probe-ext", "lo", &probe_ip)?;
        let router_ip = ROUTER_PROBE_IP.to_string();
        ns.ip("probe-ext", &["route", "add", "default", "via", &router_ip])?;
        ns.settle()?;
        Ok(Probers { ns })
    }

    /// A probe from 168.63.129.16 on the internal side to `dst`.
    pub fn probe_int(&self, dst: SocketAddrV4, timeout: Duration) -> Result<TcpStream> {
        self.probe("probe-int", dst, timeout)
    }

    /// A probe from 168.63.129.16 on the external side to `dst`.
    pub fn probe_ext(&self, dst: SocketAddrV4, timeout: Duration) -> Result<TcpStream> {
        self.probe("probe-ext", dst, timeout)
    }

    fn probe(&self, prober: &str, dst: SocketAddrV4, timeout: Duration) -> Result<TcpStream> {
        let src = SocketAddrV4::new(AZURE_PROBE_IP, 0);
        self.ns.tcp_connect(prober, Some(src), dst, timeout)
    }

    pub fn namespaces(&self) -> &Namespaces {
        &self.ns
    }
}

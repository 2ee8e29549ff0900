//! Source-based policy routing over rtnetlink: what arrives on a NIC (load
//! balancer health probes from 168.63.129.16, SSH to the NIC's address) is
//! answered out of that same NIC. Without it the replies of the internal
//! NIC follow the main table's default route out of `--ext`, and the cloud
//! drops the asymmetric traffic: the probe fails although the gateway works.
//!
//! Per NIC one routing table (the NIC's subnet and a default route via its
//! gateway) and one rule per address of the NIC (`from ADDR lookup TABLE`);
//! in the main table, routes for `--internal-cidr` prefixes via the
//! internal NIC's gateway (so the replies of translated flows find the way
//! back to inside networks beyond the internal subnet). Every rule and route
//! carries [`ROUTE_PROTOCOL`], so they can be told from anybody else's and
//! purged after a crash ([`purge_ours`]). [`PolicyRoutes`] records what it
//! added and removes it when dropped, also after a failure half-way.

use std::net::Ipv4Addr;

use anyhow::{Context, Result, bail};
use futures::TryStreamExt;
use netlink_packet_route::{
    AddressFamily,
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope},
    rule::{RuleAttribute, RuleMessage},
};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};
use tracing::{info, warn};

/// The route protocol (`ip route ... proto 190`, `ip rule ... protocol 190`)
/// of every rule and route the loader adds.
pub const ROUTE_PROTOCOL: u8 = 0xbe;
/// Default routing table of the `--int` NIC.
pub const DEFAULT_INT_TABLE: u32 = 190;
/// Default routing table of the `--ext` NIC.
pub const DEFAULT_EXT_TABLE: u32 = 191;
/// Priority of the rules: before the main table (32766), after the local one.
pub const RULE_PRIORITY: u32 = 1000;

const EEXIST: i32 = 17;
const ENOENT: i32 = 2;
const ESRCH: i32 = 3;

fn ours() -> RouteProtocol {
    RouteProtocol::from(ROUTE_PROTOCOL)
}

/// An IPv4 prefix, e.g. `10.2.0.0/16` (host bits must be zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        let (a, l) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not ADDRESS/LENGTH (e.g. 10.2.0.0/16)"))?;
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("{a:?} is not an IPv4 address"))?;
        let len: u8 = l
            .parse()
            .ok()
            .filter(|&l| l <= 32)
            .ok_or_else(|| format!("{l:?} is not a prefix length (0-32)"))?;
        if network(addr, len) != addr {
            return Err(format!(
                "{s}: host bits set (did you mean {}/{len}?)",
                network(addr, len)
            ));
        }
        Ok(Cidr { addr, len })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// `addr` with the host bits of a `/len` cleared.
pub fn network(addr: Ipv4Addr, len: u8) -> Ipv4Addr {
    let mask = if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    };
    Ipv4Addr::from(u32::from(addr) & mask)
}

/// One NIC's share of the policy.
#[derive(Clone, Debug)]
pub struct NicPolicy {
    pub name: String,
    pub index: u32,
    pub table: u32,
    /// `None`: no gateway known; the NIC gets no table or rules (warned).
    pub gateway: Option<Ipv4Addr>,
}

/// What to install.
#[derive(Clone, Debug)]
pub struct Plan {
    pub int: NicPolicy,
    pub ext: NicPolicy,
    pub internal_cidrs: Vec<Cidr>,
}

pub use crate::netif::addresses;

fn route_table(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

fn rule_table(r: &RuleMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

async fn all_routes(handle: &Handle) -> Result<Vec<RouteMessage>> {
    let query = RouteMessageBuilder::<Ipv4Addr>::new().build();
    handle
        .route()
        .get(query)
        .execute()
        .try_collect()
        .await
        .context("listing IPv4 routes")
}

/// The gateway of the default route through interface `index`, searched in
/// the main table first, then in any other table (a netplan or cloud-init
/// per-NIC table), never in our own routes.
pub async fn discover_gateway(handle: &Handle, index: u32) -> Result<Option<Ipv4Addr>> {
    let routes = all_routes(handle).await?;
    let via_nic = |r: &RouteMessage| -> Option<Ipv4Addr> {
        if r.header.destination_prefix_length != 0 || r.header.protocol == ours() {
            return None;
        }
        let oif = r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        });
        let gw = r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => Some(*g),
            _ => None,
        });
        if oif == Some(index) && gw.is_some() {
            return gw;
        }
        // A multipath default route: the hop through this NIC.
        r.attributes.iter().find_map(|a| match a {
            RouteAttribute::MultiPath(hops) => hops
                .iter()
                .filter(|h| h.interface_index == index)
                .find_map(|h| {
                    h.attributes.iter().find_map(|a| match a {
                        RouteAttribute::Gateway(RouteAddress::Inet(g)) => Some(*g),
                        _ => None,
                    })
                }),
            _ => None,
        })
    };
    const MAIN: u32 = 254;
    let main = routes
        .iter()
        .filter(|r| route_table(r) == MAIN)
        .find_map(via_nic);
    Ok(main.or_else(|| routes.iter().find_map(via_nic)))
}

/// One thing we added, with the message that deletes it again.
enum Added {
    Rule(RuleMessage),
    Route(RouteMessage),
}

/// The rules and routes installed; removed again on drop.
#[derive(Default)]
pub struct PolicyRoutes {
    added: Vec<Added>,
}

fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.code.map(|c| c.get()) == Some(-errno))
}

impl PolicyRoutes {
    /// Installs `plan`. On error everything added so far is removed (the
    /// returned-to-nobody guard drops).
    pub async fn install(handle: &Handle, plan: &Plan) -> Result<PolicyRoutes> {
        let mut pr = PolicyRoutes::default();
        if !plan.internal_cidrs.is_empty() && plan.int.gateway.is_none() {
            bail!(
                "--internal-cidr needs the gateway of --int {}, and none was found: give --int-gateway",
                plan.int.name
            );
        }
        for (nic, prio) in [(&plan.int, RULE_PRIORITY), (&plan.ext, RULE_PRIORITY + 1)] {
            let Some(gw) = nic.gateway else {
                warn!(
                    interface = %nic.name,
                    "no gateway known for this NIC (no default route through it; --int-gateway/--ext-gateway \
                     give one): replies from its addresses follow the main table"
                );
                continue;
            };
            let addrs = addresses(handle, nic.index)
                .await
                .with_context(|| format!("addresses of {}", nic.name))?;
            if addrs.is_empty() {
                warn!(interface = %nic.name, "no IPv4 address: no policy routing for it");
                continue;
            }
            for &(addr, len) in &addrs {
                // On-link neighbours stay on-link: without this route the
                // table would send even them to the gateway.
                let subnet = RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(network(addr, len), len)
                    .output_interface(nic.index)
                    .pref_source(addr)
                    .scope(RouteScope::Link)
                    .table_id(nic.table)
                    .protocol(ours())
                    .build();
                pr.add_route(handle, subnet).await.with_context(|| {
                    format!("subnet route of {} in table {}", nic.name, nic.table)
                })?;
            }
            let default = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
                .gateway(gw)
                .output_interface(nic.index)
                .table_id(nic.table)
                .protocol(ours())
                .build();
            pr.add_route(handle, default).await.with_context(|| {
                format!(
                    "default route via {gw} dev {} in table {}",
                    nic.name, nic.table
                )
            })?;
            for &(addr, _) in &addrs {
                pr.add_rule(handle, addr, nic.table, prio)
                    .await
                    .with_context(|| format!("rule from {addr} lookup {}", nic.table))?;
            }
            info!(interface = %nic.name, gateway = %gw, table = nic.table, addresses = ?addrs.iter().map(|a| a.0).collect::<Vec<_>>(), "policy routing: replies leave through the NIC they came in on");
        }
        if let Some(gw) = plan.int.gateway {
            for cidr in &plan.internal_cidrs {
                let route = RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(cidr.addr, cidr.len)
                    .gateway(gw)
                    .output_interface(plan.int.index)
                    .protocol(ours())
                    .build();
                pr.add_route(handle, route)
                    .await
                    .with_context(|| format!("route {cidr} via {gw} dev {}", plan.int.name))?;
                info!(prefix = %cidr, gateway = %gw, interface = %plan.int.name, "internal prefix routed through --int");
            }
        }
        Ok(pr)
    }

    async fn add_route(&mut self, handle: &Handle, msg: RouteMessage) -> Result<()> {
        match handle.route().add(msg.clone()).execute().await {
            Ok(()) => {}
            // Ours from a run that did not clean up, or identical anyway:
            // the state wanted is there. Deleting it on exit removes only
            // a route with our protocol, never somebody else's.
            Err(e) if is_errno(&e, EEXIST) => {}
            Err(e) => return Err(e.into()),
        }
        self.added.push(Added::Route(msg));
        Ok(())
    }

    async fn add_rule(
        &mut self,
        handle: &Handle,
        from: Ipv4Addr,
        table: u32,
        priority: u32,
    ) -> Result<()> {
        let mut req = handle
            .rule()
            .add()
            .v4()
            .source_prefix(from, 32)
            .table_id(table)
            .priority(priority);
        req.message_mut()
            .attributes
            .push(RuleAttribute::Protocol(ours()));
        req.message_mut().header.action = netlink_packet_route::rule::RuleAction::ToTable;
        let msg = req.message_mut().clone();
        match req.execute().await {
            Ok(()) => {}
            Err(e) if is_errno(&e, EEXIST) => {}
            Err(e) => return Err(e.into()),
        }
        self.added.push(Added::Rule(msg));
        Ok(())
    }

    /// Adds the recorded routes again where they are missing: the kernel
    /// deletes a device's routes when the device goes administratively
    /// down, and nothing else would put ours back.
    pub async fn restore(&self, handle: &Handle) -> Result<usize> {
        let mut restored = 0;
        for a in &self.added {
            let r = match a {
                Added::Route(m) => handle.route().add(m.clone()).execute().await,
                Added::Rule(_) => continue,
            };
            match r {
                Ok(()) => restored += 1,
                Err(e) if is_errno(&e, EEXIST) => {}
                Err(e) => return Err(e).context("re-adding a policy route"),
            }
        }
        Ok(restored)
    }

    /// Removes everything recorded, newest first. Missing is fine.
    pub async fn remove(&mut self, handle: &Handle) -> Result<()> {
        let mut first_err = None;
        let n = self.added.len();
        while let Some(a) = self.added.pop() {
            let r = match a {
                Added::Route(m) => handle.route().del(m).execute().await,
                Added::Rule(m) => handle.rule().del(m).execute().await,
            };
            match r {
                Ok(()) => {}
                Err(e) if is_errno(&e, ENOENT) || is_errno(&e, ESRCH) => {}
                Err(e) => {
                    warn!(error = %e, "removing a policy rule or route");
                    first_err.get_or_insert(e);
                }
            }
        }
        if n > 0 {
            info!(count = n, "removed policy rules and routes");
        }
        match first_err {
            Some(e) => Err(e).context("removing policy routing"),
            None => Ok(()),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
    }

    /// Forgets what was added without removing it: a handover leaves the
    /// rules and routes to the next loader.
    pub fn keep(&mut self) {
        self.added.clear();
    }
}

impl Drop for PolicyRoutes {
    fn drop(&mut self) {
        if self.added.is_empty() {
            return;
        }
        // Drop cannot await, and may run inside the loader's runtime: a
        // short-lived thread with its own runtime and netlink socket does
        // the removal (the thread inherits this one's network namespace).
        let mut me = PolicyRoutes {
            added: std::mem::take(&mut self.added),
        };
        let done = std::thread::spawn(move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting a runtime for the cleanup")?;
            rt.block_on(async move {
                let handle = crate::netif::connect()?;
                me.remove(&handle).await
            })
        })
        .join();
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %format!("{e:#}"), "policy routing cleanup incomplete"),
            Err(_) => warn!("policy routing cleanup panicked"),
        }
    }
}

/// Deletes every rule and route that carries [`ROUTE_PROTOCOL`], whoever
/// left it (a loader that was SIGKILLed). Returns (rules, routes) deleted.
pub async fn purge_ours(handle: &Handle) -> Result<(usize, usize)> {
    let rules: Vec<RuleMessage> = handle
        .rule()
        .get(IpVersion::V4)
        .execute()
        .try_collect()
        .await
        .context("listing IPv4 rules")?;
    let mut n_rules = 0;
    for r in rules {
        let mine = r
            .attributes
            .iter()
            .any(|a| matches!(a, RuleAttribute::Protocol(p) if *p == ours()));
        if !mine {
            continue;
        }
        let table = rule_table(&r);
        match handle.rule().del(r).execute().await {
            Ok(()) => n_rules += 1,
            Err(e) if is_errno(&e, ENOENT) => {}
            Err(e) => return Err(e).with_context(|| format!("deleting a rule to table {table}")),
        }
    }
    let mut n_routes = 0;
    for r in all_routes(handle).await? {
        if r.header.protocol != ours() || r.header.address_family != AddressFamily::Inet {
            continue;
        }
        let table = route_table(&r);
        match handle.route().del(r).execute().await {
            Ok(()) => n_routes += 1,
            Err(e) if is_errno(&e, ESRCH) || is_errno(&e, ENOENT) => {}
            Err(e) => {
                return Err(e).with_context(|| format!("deleting a route in table {table}"));
            }
        }
    }
    Ok((n_rules, n_routes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parses_prefixes_and_rejects_host_bits_and_garbage() {
        assert_eq!(
            "10.2.0.0/16".parse::<Cidr>(),
            Ok(Cidr {
                addr: Ipv4Addr::new(10, 2, 0, 0),
                len: 16
            })
        );
        assert!("0.0.0.0/0".parse::<Cidr>().is_ok());
        assert!("10.2.0.1/16".parse::<Cidr>().is_err());
        assert!("10.2.0.0".parse::<Cidr>().is_err());
        assert!("10.2.0.0/33".parse::<Cidr>().is_err());
        assert!("x/8".parse::<Cidr>().is_err());
    }

    #[test]
    fn network_clears_host_bits() {
        assert_eq!(
            network(Ipv4Addr::new(10, 1, 0, 77), 24),
            Ipv4Addr::new(10, 1, 0, 0)
        );
        assert_eq!(
            network(Ipv4Addr::new(10, 1, 0, 77), 0),
            Ipv4Addr::UNSPECIFIED
        );
        assert_eq!(
            network(Ipv4Addr::new(10, 1, 0, 77), 32),
            Ipv4Addr::new(10, 1, 0, 77)
        );
    }
}

//! Interface facts from rtnetlink: index, state and IPv4 addresses.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context, Result, bail};
use futures::TryStreamExt;
use netlink_packet_route::{
    address::AddressAttribute,
    link::{LinkAttribute, LinkFlags},
};
use rtnetlink::Handle;

/// What the loader needs to know about a NIC.
#[derive(Clone, Debug)]
pub struct NetIf {
    pub name: String,
    pub index: u32,
    pub up: bool,
    /// The IPv4 addresses, primary first.
    pub ipv4: Vec<Ipv4Addr>,
    /// Index of the device this one is enslaved to (a bond, a bridge, or on
    /// Azure the synthetic NIC a VF hangs under).
    pub controller: Option<u32>,
    /// The Ethernet address, if it has one.
    pub mac: Option<[u8; 6]>,
}

const ENODEV: i32 = 19;

/// Looks `name` up. A missing interface is an error that says so.
pub async fn lookup(handle: &Handle, name: &str) -> Result<NetIf> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    let link = match links.try_next().await {
        Ok(Some(link)) => link,
        Ok(None) => bail!("interface {name} not found"),
        Err(rtnetlink::Error::NetlinkError(e)) if e.code.map(|c| c.get()) == Some(-ENODEV) => {
            bail!("interface {name} not found")
        }
        Err(e) => return Err(e).with_context(|| format!("looking up interface {name}")),
    };
    let index = link.header.index;
    let up = link.header.flags.contains(LinkFlags::Up);
    let controller = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Controller(c) => Some(*c),
        _ => None,
    });
    let mac = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(m) => <[u8; 6]>::try_from(m.as_slice()).ok(),
        _ => None,
    });
    let ipv4 = addresses(handle, index)
        .await
        .with_context(|| format!("listing addresses of {name}"))?
        .into_iter()
        .map(|(a, _)| a)
        .collect();
    Ok(NetIf {
        name: name.to_string(),
        index,
        up,
        ipv4,
        controller,
        mac,
    })
}

/// The IPv4 addresses of interface `index` with their prefix lengths,
/// primary first.
pub async fn addresses(handle: &Handle, index: u32) -> Result<Vec<(Ipv4Addr, u8)>> {
    let mut out = Vec::new();
    let mut addrs = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute();
    while let Some(msg) = addrs
        .try_next()
        .await
        .context("listing interface addresses")?
    {
        // IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer
        // on point-to-point links); prefer it when present.
        let local = msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(IpAddr::V4(v4)) => Some(*v4),
            _ => None,
        });
        let addr = local.or_else(|| {
            msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(IpAddr::V4(v4)) => Some(*v4),
                _ => None,
            })
        });
        if let Some(a) = addr {
            out.push((a, msg.header.prefix_len));
        }
    }
    Ok(out)
}

/// A fresh rtnetlink connection driven on the current tokio runtime.
pub fn connect() -> Result<Handle> {
    let (conn, handle, _) = rtnetlink::new_connection().context("opening an rtnetlink socket")?;
    tokio::spawn(conn);
    Ok(handle)
}

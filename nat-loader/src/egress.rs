//! Whether each XDP program may redirect what it translated into the NIC
//! it forwards to, or must hand it to TC: decided from how the program is
//! attached and what the egress NIC can take ([`crate::xdp_features`]), and
//! told to the dataplane through its `XDP_EGRESS` map, at start and
//! whenever a NIC changes (the health check re-reads both every tick).
//!
//! Native XDP hands a redirected frame to the egress device's
//! `ndo_xdp_xmit`, which the kernel refuses (the frame is dropped) unless
//! the device's `xdp-features` have `ndo-xmit`. A veth, for one, has it
//! only while its peer runs NAPI, and kernels up to at least 6.18 leave it
//! unset when the peer got NAPI while it was down. Generic (skb) mode sends
//! the packet as an skb, which every device takes.

use std::sync::atomic::{AtomicU32, Ordering};

use nat_common::{
    XDP_EGRESS_REDIRECT, XDP_EGRESS_REDIRECT_SKB, XDP_EGRESS_TO_TC,
    stats::{HOOK_XDP_EXT, HOOK_XDP_INT, hook_label},
    xdp_egress_label,
};
use tracing::{info, warn};

use crate::xdp_features::{self, NDO_XMIT};

/// How an XDP program runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpRun {
    /// In the driver: redirected frames go through the egress device's
    /// `ndo_xdp_xmit`.
    Native,
    /// Generic (skb) mode.
    Generic,
}

/// How an XDP program running `run` forwards into a NIC with `features`.
pub fn decide(run: XdpRun, features: u64) -> u32 {
    match run {
        XdpRun::Generic => XDP_EGRESS_REDIRECT_SKB,
        XdpRun::Native if features & NDO_XMIT != 0 => XDP_EGRESS_REDIRECT,
        XdpRun::Native => XDP_EGRESS_TO_TC,
    }
}

/// The modes in force, per XDP hook, for whoever reports them (the stats
/// log runs on a thread of its own).
#[derive(Debug, Default)]
pub struct Modes([AtomicU32; 2]);

impl Modes {
    pub fn new(modes: [u32; 2]) -> Modes {
        Modes(modes.map(AtomicU32::new))
    }

    pub fn get(&self, hook: u32) -> u32 {
        self.0
            .get(hook as usize)
            .map_or(XDP_EGRESS_REDIRECT, |m| m.load(Ordering::Relaxed))
    }

    fn set(&self, hook: u32, mode: u32) {
        if let Some(m) = self.0.get(hook as usize) {
            m.store(mode, Ordering::Relaxed);
        }
    }

    /// `xdp_int=redirect xdp_ext=to_tc`: the stats log's `xdp_egress` line.
    pub fn line(&self) -> String {
        [HOOK_XDP_INT, HOOK_XDP_EXT]
            .iter()
            .map(|&h| format!("{}={}", hook_label(h), xdp_egress_label(self.get(h))))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// The XDP program at one hook: where it runs and where it forwards to.
pub struct Path<'a> {
    pub hook: u32,
    /// The NIC it runs on and how.
    pub ingress: &'a str,
    pub run: XdpRun,
    /// The NIC it forwards to, and that NIC's `xdp-features`.
    pub egress: &'a str,
    pub features: u64,
}

/// Follows the decision for each hook and logs each change once.
#[derive(Debug, Default)]
pub struct Control {
    /// The last decision per hook (`None`: none yet, so the first is
    /// logged when it is not the plain redirect).
    last: [Option<u32>; 2],
}

impl Control {
    /// The mode for `path`, logged if it changed; `Some(mode)` when the
    /// dataplane must be told.
    pub fn update(&mut self, path: &Path, modes: &Modes) -> Option<u32> {
        let mode = decide(path.run, path.features);
        let slot = self.last.get_mut(path.hook as usize)?;
        let before = slot.replace(mode);
        if before == Some(mode) {
            return None;
        }
        let features = xdp_features::names(path.features);
        match (mode, before) {
            (XDP_EGRESS_TO_TC, _) => warn!(
                interface = path.egress, xdp_features = %features,
                "{} cannot take redirected XDP frames (its xdp-features lack ndo-xmit): XDP on {} \
                 hands the packets for it to TC, which forwards them (slower, nothing lost)",
                path.egress, path.ingress
            ),
            (_, Some(XDP_EGRESS_TO_TC)) => info!(
                interface = path.egress, xdp_features = %features,
                "{} takes redirected XDP frames again: XDP on {} redirects to it",
                path.egress, path.ingress
            ),
            (_, Some(_)) => info!(
                interface = path.egress,
                mode = xdp_egress_label(mode),
                "XDP on {} now forwards to {} as {}",
                path.ingress,
                path.egress,
                xdp_egress_label(mode)
            ),
            (_, None) => {}
        }
        modes.set(path.hook, mode);
        Some(mode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xdp_features::{BASIC, REDIRECT, RX_SG};

    #[test]
    fn native_xdp_redirects_only_into_a_nic_with_ndo_xmit() {
        assert_eq!(decide(XdpRun::Native, 0x67), XDP_EGRESS_REDIRECT);
        assert_eq!(
            decide(XdpRun::Native, BASIC | REDIRECT | RX_SG),
            XDP_EGRESS_TO_TC
        );
        assert_eq!(decide(XdpRun::Native, 0), XDP_EGRESS_TO_TC);
    }

    #[test]
    fn generic_xdp_redirects_into_any_nic() {
        assert_eq!(decide(XdpRun::Generic, 0), XDP_EGRESS_REDIRECT_SKB);
        assert_eq!(decide(XdpRun::Generic, 0x67), XDP_EGRESS_REDIRECT_SKB);
    }

    fn path(hook: u32, features: u64) -> Path<'static> {
        Path {
            hook,
            ingress: "int",
            run: XdpRun::Native,
            egress: "ext",
            features,
        }
    }

    #[test]
    fn the_dataplane_is_told_of_the_first_decision_and_of_changes_only() {
        let modes = Modes::default();
        let mut c = Control::default();
        assert_eq!(
            c.update(&path(HOOK_XDP_INT, 0x67), &modes),
            Some(XDP_EGRESS_REDIRECT)
        );
        assert_eq!(c.update(&path(HOOK_XDP_INT, 0x67), &modes), None);
        assert_eq!(
            c.update(&path(HOOK_XDP_INT, 0x23), &modes),
            Some(XDP_EGRESS_TO_TC)
        );
        assert_eq!(modes.get(HOOK_XDP_INT), XDP_EGRESS_TO_TC);
        assert_eq!(modes.get(HOOK_XDP_EXT), XDP_EGRESS_REDIRECT);
        assert_eq!(modes.line(), "xdp_int=to_tc xdp_ext=redirect");
        assert_eq!(
            c.update(&path(HOOK_XDP_INT, 0x67), &modes),
            Some(XDP_EGRESS_REDIRECT)
        );
        assert_eq!(modes.line(), "xdp_int=redirect xdp_ext=redirect");
    }
}

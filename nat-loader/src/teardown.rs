//! `nat-loader teardown`: removes a pinned dataplane whose loader is gone.

use std::path::Path;

use anyhow::Result;
use nat_loader::{caps, netif, pins::PinDir, routing, sysctl};
use tracing::info;

pub async fn teardown(ext: &str, int: &str, dir: &Path) -> Result<()> {
    caps::require()?;
    let pins = PinDir::new(dir);
    if !pins.exists() {
        info!(pins = %dir.display(), "no pinned dataplane: nothing to remove");
    } else {
        let _lock = pins.lock()?;
        let record = pins.sysctl_record()?;
        let removed = pins.remove_all()?;
        info!(pins = %dir.display(), removed = ?removed, "detached the pinned programs and removed the pins");
        sysctl::restore_record(&record);
    }
    purge_policy_routing().await?;
    info!(
        ext,
        int, "teardown complete: nothing of the gateway is left"
    );
    Ok(())
}

/// Removes the policy rules and routes a loader that is gone left (every
/// one carries our route protocol number).
async fn purge_policy_routing() -> Result<()> {
    let handle = netif::connect()?;
    let (rules, routes) = routing::purge_ours(&handle).await?;
    if rules + routes > 0 {
        info!(
            rules,
            routes, "removed the policy rules and routes left behind"
        );
    }
    Ok(())
}

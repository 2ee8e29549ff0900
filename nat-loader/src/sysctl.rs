//! IPv4 forwarding: `bpf_fib_lookup` only answers for interfaces that
//! forward, and the kernel must forward what the programs hand to it (TTL
//! expiry, fragmentation-needed). Enabled if needed and restored on exit.

use std::{fs, path::PathBuf};

use anyhow::{Context, Result};
use tracing::{info, warn};

/// Restores the sysctls it changed when dropped.
#[derive(Default)]
pub struct SysctlGuard {
    restore: Vec<(PathBuf, String)>,
}

impl SysctlGuard {
    /// Sets `path` (below /proc/sys) to `value`, remembering the old value
    /// if it differed.
    pub fn set(&mut self, path: &str, value: &str) -> Result<()> {
        let p = PathBuf::from("/proc/sys").join(path);
        let old = fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        let old = old.trim().to_string();
        if old == value {
            return Ok(());
        }
        fs::write(&p, value).with_context(|| format!("writing {value} to {}", p.display()))?;
        info!(sysctl = path, from = %old, to = value, "changed sysctl");
        self.restore.push((p, old));
        Ok(())
    }
}

impl Drop for SysctlGuard {
    fn drop(&mut self) {
        for (p, old) in self.restore.drain(..).rev() {
            match fs::write(&p, &old) {
                Ok(()) => info!(sysctl = %p.display(), to = %old, "restored sysctl"),
                Err(e) => warn!(sysctl = %p.display(), error = %e, "could not restore sysctl"),
            }
        }
    }
}

/// Enables IPv4 forwarding globally and on the two NICs.
pub fn enable_forwarding(guard: &mut SysctlGuard, ext: &str, int: &str) -> Result<()> {
    guard.set("net/ipv4/ip_forward", "1")?;
    for ifname in [ext, int] {
        guard.set(&format!("net/ipv4/conf/{ifname}/forwarding"), "1")?;
    }
    Ok(())
}

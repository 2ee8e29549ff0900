//! IPv4 forwarding: `bpf_fib_lookup` only answers for interfaces that
//! forward, and the kernel must forward what the programs hand to it (TTL
//! expiry, fragmentation-needed). Enabled if needed and restored on exit.
//!
//! The values to restore are the ones from before the *first* loader of a
//! pinned dataplane changed them: they are recorded in the pin directory
//! ([`crate::pins::PinDir::sysctl_record`]) and a loader that adopts the
//! dataplane restores those, not the "1" its predecessor left. A loader
//! that hands the dataplane over (or crashes) restores nothing.

use std::{fs, path::PathBuf};

use anyhow::{Context, Result};
use tracing::{info, warn};

/// Restores the sysctls it changed when dropped.
#[derive(Default)]
pub struct SysctlGuard {
    restore: Vec<(PathBuf, String)>,
}

/// The sysctls (below /proc/sys) that [`enable_forwarding`] sets.
pub fn forwarding_keys(ext: &str, int: &str) -> Vec<String> {
    let mut keys = vec!["net/ipv4/ip_forward".to_string()];
    for ifname in [ext, int] {
        keys.push(format!("net/ipv4/conf/{ifname}/forwarding"));
    }
    // An outbound packet too big for --ext without DF is translated by TC
    // and then fragmented by the kernel (RFC 4787 REQ-13a); it arrives on
    // --int with the SNAT address as its source, which the kernel drops as
    // a martian unless the interface accepts local source addresses.
    keys.push(format!("net/ipv4/conf/{int}/accept_local"));
    keys
}

/// The current value of `key` (below /proc/sys).
pub fn read(key: &str) -> Result<String> {
    let p = PathBuf::from("/proc/sys").join(key);
    let v = fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    Ok(v.trim().to_string())
}

/// `record` plus the current value of every key in `keys` it lacks: the
/// originals to restore at the final teardown.
pub fn complete_record(
    mut record: Vec<(String, String)>,
    keys: &[String],
) -> Result<Vec<(String, String)>> {
    for k in keys {
        if !record.iter().any(|(r, _)| r == k) {
            record.push((k.clone(), read(k)?));
        }
    }
    Ok(record)
}

/// Writes each recorded original value back (those that differ).
pub fn restore_record(record: &[(String, String)]) {
    let mut guard = SysctlGuard::default();
    guard.restore_to(record);
}

impl SysctlGuard {
    /// On drop, restore `originals` (below /proc/sys) instead of the
    /// values this process found.
    pub fn restore_to(&mut self, originals: &[(String, String)]) {
        self.restore = originals
            .iter()
            .map(|(k, v)| (PathBuf::from("/proc/sys").join(k), v.clone()))
            .collect();
    }

    /// Keeps every change on drop: the dataplane is handed over.
    pub fn keep(mut self) {
        self.restore.clear();
    }

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
            if fs::read_to_string(&p).is_ok_and(|now| now.trim() == old) {
                continue;
            }
            match fs::write(&p, &old) {
                Ok(()) => info!(sysctl = %p.display(), to = %old, "restored sysctl"),
                Err(e) => warn!(sysctl = %p.display(), error = %e, "could not restore sysctl"),
            }
        }
    }
}

/// Enables IPv4 forwarding globally and on the two NICs (and
/// `accept_local` on --int, see [`forwarding_keys`]).
pub fn enable_forwarding(guard: &mut SysctlGuard, ext: &str, int: &str) -> Result<()> {
    for key in forwarding_keys(ext, int) {
        guard.set(&key, "1")?;
    }
    Ok(())
}

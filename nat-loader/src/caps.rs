//! Privilege check before touching anything, so a non-root run fails with
//! one clear line instead of an EPERM from deep inside aya.

use anyhow::{Context, Result, bail};

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// Effective capability bits of this process.
fn effective() -> Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .context("no CapEff line in /proc/self/status")?
        .trim();
    u64::from_str_radix(hex, 16).with_context(|| format!("parsing CapEff {hex:?}"))
}

/// Fails unless the process may load eBPF programs and configure networking.
pub fn require() -> Result<()> {
    let eff = effective()?;
    let has = |cap: u32| eff & (1 << cap) != 0;
    if !has(CAP_NET_ADMIN) || !(has(CAP_BPF) || has(CAP_SYS_ADMIN)) {
        bail!("nat-loader needs root (CAP_NET_ADMIN and CAP_BPF): run it with sudo");
    }
    Ok(())
}

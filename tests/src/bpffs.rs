//! A private BPF file system for one test's pins.
//!
//! `ip netns exec` gives the loader a fresh /sys, so /sys/fs/bpf inside the
//! lab is not the host's bpffs, and a bpffs the loader mounted there itself
//! would vanish with its process. A test that needs pins to outlive the
//! loader mounts its own bpffs on the host (visible inside the lab, whose
//! mount namespaces are copies of the host's) and unmounts it at the end,
//! which also drops whatever a failed test left pinned.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
};

use anyhow::{Context, Result, bail};

/// A bpffs mounted at `/tmp/natlab-<pid>-bpffs-<n>`; unmounted and removed
/// on drop (also while unwinding).
pub struct Bpffs {
    mount: PathBuf,
}

impl Bpffs {
    pub fn new() -> Result<Bpffs> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let mount = std::env::temp_dir().join(format!(
            "{}{}-bpffs-{n}",
            crate::NS_PREFIX,
            std::process::id()
        ));
        std::fs::create_dir_all(&mount).with_context(|| format!("creating {}", mount.display()))?;
        let out = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&mount)
            .output()
            .context("running mount")?;
        if !out.status.success() {
            let _ = std::fs::remove_dir(&mount);
            bail!(
                "mount -t bpf bpf {}: {}",
                mount.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(Bpffs { mount })
    }

    /// Where the file system is mounted.
    pub fn path(&self) -> &Path {
        &self.mount
    }

    /// A pin directory for one gateway (not created: the loader does that).
    pub fn pin_dir(&self) -> PathBuf {
        self.mount.join("nat-gateway")
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.mount)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        }
        let _ = std::fs::remove_dir(&self.mount);
    }
}

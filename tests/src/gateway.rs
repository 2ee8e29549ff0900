//! Running the real `nat-loader` in the lab's `nat` namespace.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex, mpsc},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use nat_common::stats;

use crate::netns::{LabChild, Namespaces};
use crate::{EXT_IF, Host, INT_IF, Lab};

/// The loader binary: `NAT_LOADER` if set, else the workspace's release
/// build (`cargo xtask build` makes it).
pub fn loader_path() -> Result<PathBuf> {
    let p = std::env::var_os("NAT_LOADER")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/nat-loader")
        });
    if !p.exists() {
        bail!(
            "{} does not exist: run `cargo xtask build` first",
            p.display()
        );
    }
    Ok(p)
}

/// The words of `line`: flags written as on a command line, e.g.
/// `gateway(&lab, &flags("--udp-timeout 1 --sweep-interval 1"))`.
pub fn flags(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

/// Runs the loader in `lab`'s `nat` to its end (killed after 20 s), after
/// `prefix` (a wrapper such as `setpriv …`, or nothing): whether it
/// exited 0, and what it wrote to stderr. For invocations that are meant
/// to end by themselves (bad flags, `teardown`, a refused second loader).
pub fn run_loader(lab: &Lab, prefix: &[&str], args: &[&str]) -> Result<(bool, String)> {
    let bin = loader_path()?;
    let bin = bin.to_string_lossy();
    let argv = [prefix, &[&*bin], args].concat();
    let out = lab.exec_timeout(Host::Nat, &argv, Duration::from_secs(20))?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    Ok((out.status.success(), stderr))
}

/// The real loader in `lab`'s `nat`, for a test: `extra` flags, and no
/// periodic stats log unless `extra` sets `--stats-interval`. Panics, at the
/// caller's line, when it does not become ready.
#[track_caller]
pub fn gateway(lab: &Lab, extra: &[&str]) -> Gateway {
    let mut args = Vec::from(extra);
    if !extra.contains(&"--stats-interval") {
        args.extend(["--stats-interval", "0"]);
    }
    match Gateway::start(lab, &args) {
        Ok(gw) => gw,
        Err(e) => panic!("starting nat-loader: {e:#}"),
    }
}

/// A running loader; stopped (SIGTERM, then SIGKILL after a grace period)
/// on drop.
pub struct Gateway {
    child: Option<LabChild>,
    log: Arc<Mutex<Vec<String>>>,
    /// Reads the loader's stderr until it closes (the loader exited).
    reader: Option<std::thread::JoinHandle<()>>,
    /// How [`Gateway::stop`] found the loader ending, for failure messages.
    stopped: Option<std::process::ExitStatus>,
    /// The loader binary and its pin directory, for `nat-loader stats`.
    bin: PathBuf,
    bpffs_dir: PathBuf,
    /// The counters as `nat-loader stats -o json` last gave them before
    /// the loader was signalled to stop: what [`Gateway::counter`] reads
    /// once it is gone.
    last_stats: Mutex<Option<serde_json::Value>>,
}

/// The log line the loader prints once everything is attached.
pub const READY: &str = "nat-loader ready";

impl Gateway {
    /// Starts `nat-loader --int int --ext ext <extra>` in `nat` and waits
    /// until it reports ready (or fails, or 30 s pass).
    ///
    /// Unless `extra` says otherwise, `--drain-seconds 0`: `stop()` (SIGTERM)
    /// then detaches at once instead of draining for 30 s.
    pub fn start(lab: &Lab, extra: &[&str]) -> Result<Gateway> {
        Gateway::start_bin(lab, &loader_path()?, extra)
    }

    /// [`Gateway::start`] with another loader binary (an upgrade).
    pub fn start_bin(lab: &Lab, bin: &Path, extra: &[&str]) -> Result<Gateway> {
        let nics = (INT_IF, EXT_IF);
        Gateway::start_in(lab.namespaces(), Host::Nat.role(), bin, nics, extra)
    }

    /// Starts `<bin> --int <int> --ext <ext> <extra>` in namespace `role`
    /// of `ns` (which kills it at the latest when dropped) and waits until
    /// it is ready.
    pub fn start_in(
        ns: &Namespaces,
        role: &str,
        bin: &Path,
        (int, ext): (&str, &str),
        extra: &[&str],
    ) -> Result<Gateway> {
        let mut cmd = ns.command(role, &[]);
        cmd.arg(bin).args(["--int", int, "--ext", ext]);
        if !extra.contains(&"--drain-seconds") {
            cmd.args(["--drain-seconds", "0"]);
        }
        cmd.args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = ns.spawn_command(&mut cmd).context("starting nat-loader")?;
        let stderr = child
            .stderr
            .take()
            .context("nat-loader's stderr was not captured")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let sink = Arc::clone(&log);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains(READY) {
                    let _ = ready_tx.send(());
                }
                if let Ok(mut l) = sink.lock() {
                    l.push(line);
                }
            }
        });
        let bpffs_dir = extra
            .iter()
            .position(|a| *a == "--bpffs-dir")
            .and_then(|i| extra.get(i + 1))
            .map_or_else(
                || PathBuf::from(nat_loader::pins::DEFAULT_DIR),
                PathBuf::from,
            );
        let mut gw = Gateway {
            child: Some(child),
            log,
            reader: Some(reader),
            stopped: None,
            bin: bin.to_path_buf(),
            bpffs_dir,
            last_stats: Mutex::new(None),
        };
        match ready_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(()) => Ok(gw),
            Err(_) => {
                let status = gw.stop().ok();
                bail!(
                    "nat-loader did not become ready (exit: {status:?}); its log:\n{}",
                    gw.log().join("\n")
                )
            }
        }
    }

    /// Waits up to `timeout` for a log line containing every one of
    /// `needles`; returns it.
    pub fn wait_for_log(&self, needles: &[&str], timeout: Duration) -> Option<String> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(l) = self
                .log()
                .into_iter()
                .find(|l| needles.iter().all(|n| l.contains(n)))
            {
                return Some(l);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The loader's process id (`ip netns exec` execs it), while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Sends SIGTERM without waiting: with `--drain-seconds` the loader
    /// drains first. [`Gateway::wait`] or [`Gateway::stop`] finish it.
    pub fn signal_term(&self) -> Result<()> {
        let pid = self.pid().context("the loader was already stopped")?;
        self.snapshot_stats();
        // SAFETY: kill(2); the child is unreaped, so the pid is still ours.
        if unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) } != 0 {
            return Err(std::io::Error::last_os_error()).context("SIGTERM to the loader");
        }
        Ok(())
    }

    /// Waits up to `timeout` for the loader to exit by itself.
    pub fn wait(&mut self, timeout: Duration) -> Result<Option<std::process::ExitStatus>> {
        let child = self
            .child
            .as_mut()
            .context("the loader was already stopped")?;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                std::thread::sleep(Duration::from_millis(50));
                return Ok(Some(status));
            }
            if std::time::Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the loader logged so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Stops the loader with SIGTERM and waits for it to clean up.
    pub fn stop(&mut self) -> Result<std::process::ExitStatus> {
        self.snapshot_stats();
        let mut child = self
            .child
            .take()
            .context("the loader was already stopped")?;
        let status = child.terminate(Duration::from_secs(10))?;
        self.stopped = Some(status);
        self.drain_log();
        Ok(status)
    }

    /// Waits until every line the exited loader wrote is in the log (its
    /// stderr is closed; bounded in case something else holds it open).
    fn drain_log(&mut self) {
        let Some(reader) = self.reader.take() else {
            return;
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !reader.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if reader.is_finished() {
            let _ = reader.join();
        }
    }

    /// Sends `signal` (e.g. `libc::SIGKILL`, `libc::SIGUSR2`) and waits up
    /// to 10 s for the loader to exit; SIGKILLs it if it does not.
    pub fn signal_and_wait(&mut self, signal: i32) -> Result<std::process::ExitStatus> {
        let mut child = self
            .child
            .take()
            .context("the loader was already stopped")?;
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        self.child = Some(child);
        self.snapshot_stats();
        let mut child = self
            .child
            .take()
            .context("the loader was already stopped")?;
        // The child is ours and not yet reaped, so its pid is not reused.
        unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                self.drain_log();
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.kill()?;
        bail!("the loader did not exit within 10 s of signal {signal}")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
    }
}

impl Gateway {
    /// A counter of the running loader's dataplane, from `nat-loader stats
    /// -o json` run in the loader's mount namespace (where its pins are):
    /// e.g. `counter("xdp_int", "xdp_out_forwarded")`. Once the loader is
    /// stopped, the counters as they were just before it was signalled.
    ///
    /// Panics when the counters cannot be read (rather than reading as
    /// zeros), and for a hook or label no counter has (a typo would
    /// otherwise read as 0 and pass every `== 0`).
    #[track_caller]
    pub fn counter(&self, hook: &str, label: &str) -> u64 {
        known_counter(hook, label);
        let stats = if self.child.is_some() {
            self.read_stats().map_err(|e| format!("{e:#}"))
        } else {
            self.last_stats
                .lock()
                .ok()
                .and_then(|s| s.clone())
                .ok_or_else(|| "the loader stopped before its counters were read".to_string())
        };
        let stats = stats.unwrap_or_else(|e| {
            panic!(
                "asked for counter {hook}/{label}, but: {e} (stopped: {:?}); the loader's log:\n{}",
                self.stopped,
                self.log().join("\n")
            )
        });
        stats["counters"][hook][label]
            .as_u64()
            .unwrap_or_else(|| panic!("nat-loader stats has no {hook}/{label}: {stats}"))
    }

    /// `nat-loader stats -o json` of this loader's pins.
    pub fn read_stats(&self) -> Result<serde_json::Value> {
        let out = self.inspect(&["stats", "-o", "json"])?;
        serde_json::from_str(&out).context("parsing nat-loader stats -o json")
    }

    /// Runs `nat-loader <args> --bpffs-dir <its pins>` (a read-only
    /// subcommand: `stats`, `conntrack list`, ...) in the running loader's
    /// mount namespace, where its pins are; its stdout.
    pub fn inspect(&self, args: &[&str]) -> Result<String> {
        let pid = self.pid().context("the loader is not running")?;
        let out = std::process::Command::new("nsenter")
            .args(["--target", &pid.to_string(), "--mount", "--"])
            .arg(&self.bin)
            .args(args)
            .arg("--bpffs-dir")
            .arg(&self.bpffs_dir)
            .output()
            .context("running nsenter")?;
        if !out.status.success() {
            bail!(
                "nat-loader {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Keeps the counters for [`Gateway::counter`] once the loader is gone.
    fn snapshot_stats(&self) {
        if let Ok(s) = self.read_stats()
            && let Ok(mut last) = self.last_stats.lock()
        {
            *last = Some(s);
        }
    }
}

/// Panics, naming the known ones, unless `hook` and `label` name a counter
/// (`nat_common::stats`, the labels the loader logs).
#[track_caller]
fn known_counter(hook: &str, label: &str) {
    if stats::hook(hook).is_none() {
        let hooks: Vec<&str> = stats::HOOKS.iter().map(|(_, l)| *l).collect();
        panic!("no hook {hook:?}: the hooks are {hooks:?}");
    }
    if stats::reason(label).is_none() {
        let labels: Vec<&str> = stats::LABELS.iter().map(|(_, l)| *l).collect();
        panic!("no counter {label:?}: the counters are {labels:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::known_counter;

    #[test]
    fn every_hook_and_counter_label_is_known() {
        for (_, hook) in nat_common::stats::HOOKS {
            for (_, label) in nat_common::stats::LABELS {
                known_counter(hook, label);
            }
        }
    }

    #[test]
    #[should_panic(expected = "no counter \"xdp_out_forwarderd\": the counters are [")]
    fn a_misspelled_counter_label_panics_naming_the_known_ones() {
        known_counter("xdp_int", "xdp_out_forwarderd");
    }

    #[test]
    #[should_panic(expected = "no hook \"xdp_inf\": the hooks are [\"xdp_int\"")]
    fn a_misspelled_hook_panics_naming_the_known_ones() {
        known_counter("xdp_inf", "xdp_out_forwarded");
    }
}

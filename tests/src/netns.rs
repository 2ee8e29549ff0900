//! A set of named network namespaces for labs other than [`crate::Lab`]'s
//! fixed six (the failover lab, the Azure-style probers). Names must start
//! with `natlab-<pid>-` so a crashed run's leftovers are found and removed
//! by the next lab. Dropping the set kills every process left in its
//! namespaces and deletes them, also while unwinding from a panic.

use std::net::{SocketAddrV4, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::LabChild;
use crate::lab::{
    NETNS_ADD, NETNS_DIR, enter_netns, in_netns, kill_if_running_child, kill_processes_in,
    output_with_timeout, remove_stale_namespaces, run,
};

static NEXT_SET: AtomicU32 = AtomicU32::new(0);

/// Namespaces created by one test; removed on drop.
pub struct Namespaces {
    prefix: String,
    created: Vec<String>,
    spawned: Mutex<Vec<u32>>,
}

impl Namespaces {
    /// An empty set whose namespaces are named `natlab-<pid>-<tag><n>-<role>`.
    pub fn new(tag: &str) -> Namespaces {
        remove_stale_namespaces();
        Namespaces::with_prefix(format!(
            "{}{}-{tag}{}",
            crate::NS_PREFIX,
            std::process::id(),
            NEXT_SET.fetch_add(1, Ordering::Relaxed)
        ))
    }

    /// An empty set whose namespaces are named `<prefix>-<role>` (e.g. a
    /// [`crate::Lab::id`], to add namespaces to a lab).
    pub fn with_prefix(prefix: String) -> Namespaces {
        Namespaces {
            prefix,
            created: Vec::new(),
            spawned: Mutex::new(Vec::new()),
        }
    }

    /// The full name of namespace `role`.
    pub fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.prefix)
    }

    pub fn ns_path(&self, role: &str) -> PathBuf {
        Path::new(NETNS_DIR).join(self.ns(role))
    }

    /// Creates namespace `role`: IPv6 off, loopback up.
    pub fn add(&mut self, role: &str) -> Result<()> {
        let name = self.ns(role);
        {
            let _turn = NETNS_ADD.lock().unwrap_or_else(|e| e.into_inner());
            run(Command::new("ip").args(["netns", "add", &name]))?;
        }
        self.created.push(name);
        self.sysctl(role, "net/ipv6/conf/all/disable_ipv6", "1")?;
        self.sysctl(role, "net/ipv6/conf/default/disable_ipv6", "1")?;
        self.ip(role, &["link", "set", "lo", "up"])?;
        Ok(())
    }

    /// `ip -n <ns> <args>` (`role` may also be a full namespace name).
    pub fn ip(&self, role: &str, args: &[&str]) -> Result<Output> {
        run(Command::new("ip").arg("-n").arg(self.name(role)).args(args))
    }

    fn name(&self, role: &str) -> String {
        if role.starts_with(crate::NS_PREFIX) {
            role.to_string()
        } else {
            self.ns(role)
        }
    }

    /// A veth pair `a_if` in `a` and `b_if` in `b` (roles or full names),
    /// GRO on at both ends (an XDP redirect into a veth needs it), both up.
    pub fn veth(&self, a: &str, a_if: &str, b: &str, b_if: &str) -> Result<()> {
        let (an, bn) = (self.name(a), self.name(b));
        run(Command::new("ip").args([
            "link", "add", a_if, "netns", &an, "type", "veth", "peer", "name", b_if, "netns", &bn,
        ]))?;
        for (ns, dev) in [(&an, a_if), (&bn, b_if)] {
            run(Command::new("ip")
                .args(["netns", "exec", ns])
                .args(["ethtool", "-K", dev, "gro", "on"]))?;
            self.ip(ns, &["link", "set", dev, "up"])?;
        }
        Ok(())
    }

    /// A `Command` running `argv` in `role` (`ip netns exec`).
    pub fn command(&self, role: &str, argv: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name(role)]).args(argv);
        cmd
    }

    /// Runs `argv` in `role`; fails with its stderr unless it exits 0.
    pub fn exec(&self, role: &str, argv: &[&str]) -> Result<Output> {
        run(&mut self.command(role, argv))
    }

    /// Runs `argv` in `role`, killed after `timeout`; any exit status.
    pub fn exec_timeout(&self, role: &str, argv: &[&str], timeout: Duration) -> Result<Output> {
        output_with_timeout(&mut self.command(role, argv), timeout)
    }

    /// Starts a command made by [`Namespaces::command`]; killed on drop.
    pub fn spawn_command(&self, cmd: &mut Command) -> Result<LabChild> {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {cmd:?}"))?;
        self.spawned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child.id());
        Ok(LabChild::new(child))
    }

    /// Writes `/proc/sys/<key>` inside `role`.
    pub fn sysctl(&self, role: &str, key: &str, value: &str) -> Result<()> {
        let path = Path::new("/proc/sys").join(key);
        let value = value.to_string();
        self.in_ns(role, move || std::fs::write(&path, &value))?
            .with_context(|| format!("setting {key} in {}", self.name(role)))
    }

    /// Runs `f` on a thread inside `role` and returns its result.
    pub fn in_ns<F, R>(&self, role: &str, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        in_netns(&Path::new(NETNS_DIR).join(self.name(role)), f)
    }

    /// Spawns a long-running thread inside `role`.
    pub fn spawn_thread<F, R>(&self, role: &str, f: F) -> std::thread::JoinHandle<Result<R>>
    where
        F: FnOnce() -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let path = Path::new(NETNS_DIR).join(self.name(role));
        std::thread::spawn(move || {
            enter_netns(&path)?;
            f()
        })
    }

    /// A TCP connection from `role` (optionally from `src`) to `dst`.
    pub fn tcp_connect(
        &self,
        role: &str,
        src: Option<SocketAddrV4>,
        dst: SocketAddrV4,
        timeout: Duration,
    ) -> Result<TcpStream> {
        self.in_ns(role, || connect(src, dst, timeout))?
    }
}

/// A TCP connection (in the calling thread's namespace).
pub fn connect(
    src: Option<SocketAddrV4>,
    dst: SocketAddrV4,
    timeout: Duration,
) -> Result<TcpStream> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    if let Some(src) = src {
        s.set_reuse_address(true)?;
        s.bind(&SockAddr::from(src))
            .with_context(|| format!("binding {src}"))?;
    }
    s.connect_timeout(&SockAddr::from(dst), timeout)
        .with_context(|| format!("connecting to {dst}"))?;
    Ok(s.into())
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        let namespaces: Vec<(u64, u64)> = self
            .created
            .iter()
            .filter_map(|n| std::fs::metadata(Path::new(NETNS_DIR).join(n)).ok())
            .map(|m| (m.dev(), m.ino()))
            .collect();
        let spawned = self.spawned.get_mut().unwrap_or_else(|e| e.into_inner());
        for &pid in spawned.iter() {
            kill_if_running_child(pid);
        }
        kill_processes_in(&namespaces);
        for n in self.created.drain(..).rev() {
            if let Err(e) = run(Command::new("ip").args(["netns", "del", &n])) {
                eprintln!("nat_lab: could not remove namespace: {e:#}");
            }
        }
    }
}

/// Waits until, in each of `namespaces`, every link that is set up is
/// operationally up and every bridge port forwards.
///
/// A link's carrier reaches its operational state (and a bridge port its
/// forwarding state) through the kernel's link watch, which batches
/// events for up to a second when many links change at once (parallel
/// labs). Until then a bridge drops what a client sends, and a test's
/// first packet waits out an ARP retransmit: a second lost at random.
pub fn wait_links_settled(namespaces: &[&str]) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut pending = Vec::new();
        for ns in namespaces {
            pending.extend(unsettled_links(ns)?);
        }
        if pending.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            anyhow::bail!("links still not up after 10 s: {}", pending.join(", "));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `ns/link` for each link of `ns` that is set up but not yet operationally
/// up, and each bridge port not yet forwarding.
fn unsettled_links(ns: &str) -> Result<Vec<String>> {
    let mut pending = Vec::new();
    let links = run(Command::new("ip").args(["-n", ns, "-o", "link", "show"]))?;
    for line in String::from_utf8_lossy(&links.stdout).lines() {
        // "7: int@if8: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu … state UP …"
        let name = line.split(": ").nth(1).unwrap_or("").split('@').next();
        let flags = line.split('<').nth(1).and_then(|r| r.split('>').next());
        let (Some(name), Some(flags)) = (name, flags) else {
            continue;
        };
        let set_up = flags.split(',').any(|f| f == "UP");
        if name != "lo" && set_up && !line.contains(" state UP ") {
            pending.push(format!("{ns}/{name}"));
        }
    }
    let ports = run(Command::new("bridge").args(["-n", ns, "-o", "link", "show"]))?;
    for line in String::from_utf8_lossy(&ports.stdout).lines() {
        if !line.contains("state forwarding") {
            pending.push(format!("{ns} bridge port {line}"));
        }
    }
    Ok(pending)
}

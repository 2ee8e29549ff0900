//! The namespace library every lab is built on: [`Namespaces`], a set of
//! uniquely named network namespaces, the veth pairs and bridges that wire
//! them, and the commands, threads, sockets and processes that run inside.
//! [`crate::Lab`] (the six hosts), [`crate::failover::FailoverLab`],
//! [`crate::probers::Probers`] and the benchmark's topology each describe a
//! topology with it.
//!
//! Names are `natlab-<pid>-<tag><n>-<role>`: labs in parallel test threads
//! and processes never collide, and a crashed run's leftovers are found
//! (their pid is dead) and removed when the next set is made. Dropping the
//! set, also while unwinding from a panic, kills every process left in its
//! namespaces and deletes them.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::ops::{Deref, DerefMut};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::NS_PREFIX;

const NETNS_DIR: &str = "/run/netns";

static NEXT_SET: AtomicU32 = AtomicU32::new(0);

/// `ip netns add` makes /run/netns a shared mount the first time it runs;
/// two threads doing that at once can stack bind mounts, so creations in
/// this process take turns.
static NETNS_ADD: Mutex<()> = Mutex::new(());

/// How the far end of a veth pair gets NAPI, which decides whether the
/// near end can take frames XDP redirects to it (`xdp-features`
/// `ndo-xmit`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerNapi {
    /// GRO on before either end is up: the near end takes redirected
    /// frames, and says so.
    Before,
    /// GRO on while the far end is down, after the near end came up: the
    /// far end runs NAPI, but the near end's features never learn it
    /// (Linux up to at least 6.18), so the kernel refuses every redirect
    /// into it.
    AfterUp,
    /// GRO off: no NAPI, so no redirect into the near end works.
    Off,
}

/// Namespaces created by one lab; removed on drop.
pub struct Namespaces {
    prefix: String,
    /// Namespaces that exist, so a half-built set removes only those.
    created: Vec<String>,
    /// Every namespace a link of this set was made in (its own and those
    /// of another set it joins): the ones [`Namespaces::settle`] watches.
    linked: Mutex<Vec<String>>,
    /// Processes from `spawn`: one that has not yet switched namespace
    /// (still `ip netns exec` starting up) is invisible to the namespace
    /// scan on drop.
    spawned: Mutex<Vec<u32>>,
}

impl Namespaces {
    /// An empty set whose namespaces are named `natlab-<pid>-<tag><n>-<role>`.
    /// Removes namespaces that runs which no longer exist left behind.
    pub fn new(tag: &str) -> Namespaces {
        remove_stale_namespaces();
        Namespaces::with_prefix(format!(
            "{NS_PREFIX}{}-{tag}{}",
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
            linked: Mutex::new(Vec::new()),
            spawned: Mutex::new(Vec::new()),
        }
    }

    /// `natlab-<pid>-<tag><n>`: the common prefix of the set's namespaces.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The full name of namespace `role`. Every method taking a role also
    /// takes a full name (`natlab-…`), which is how a set reaches into
    /// another one's namespaces.
    pub fn ns(&self, role: &str) -> String {
        if role.starts_with(NS_PREFIX) {
            role.to_string()
        } else {
            format!("{}-{role}", self.prefix)
        }
    }

    /// The bind mount that keeps namespace `role` alive (for `setns`).
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
        // Before any interface exists, so `default` covers all of them:
        // no router solicitations or DAD traffic on the links.
        self.sysctl(role, "net/ipv6/conf/all/disable_ipv6", "1")?;
        self.sysctl(role, "net/ipv6/conf/default/disable_ipv6", "1")?;
        self.ip(role, &["link", "set", "lo", "up"])?;
        Ok(())
    }

    /// A veth pair, `a_if` in `a` and `b_if` in `b`, both ends up.
    ///
    /// Created directly inside the namespaces: nothing ever appears in the
    /// root namespace, where parallel labs would clash on names. A frame
    /// that XDP redirects into a veth is dropped unless the receiving end
    /// runs NAPI; GRO on gives every end NAPI, as a physical NIC has, and
    /// it is switched on before the link goes up.
    pub fn veth(&self, a: &str, a_if: &str, b: &str, b_if: &str) -> Result<()> {
        self.veth_with(a, a_if, b, b_if, PeerNapi::Before)
    }

    /// [`Namespaces::veth`], with `b_if`'s NAPI as `napi` says: whether
    /// `a_if` can take redirected XDP frames, and says so in its
    /// `xdp-features` (`ndo-xmit`).
    pub fn veth_with(
        &self,
        a: &str,
        a_if: &str,
        b: &str,
        b_if: &str,
        napi: PeerNapi,
    ) -> Result<()> {
        let (an, bn) = (self.ns(a), self.ns(b));
        run(Command::new("ip").args([
            "link", "add", a_if, "netns", &an, "type", "veth", "peer", "name", b_if, "netns", &bn,
        ]))?;
        self.ethtool(&an, a_if, &["gro", "on"])?;
        match napi {
            PeerNapi::Before => {
                self.ethtool(&bn, b_if, &["gro", "on"])?;
                self.ip(&an, &["link", "set", a_if, "up"])?;
                self.ip(&bn, &["link", "set", b_if, "up"])?;
            }
            // The kernel updates a veth's features when its peer's GRO
            // changes while the peer is up, not when the peer comes up
            // with GRO already on.
            PeerNapi::AfterUp => {
                self.ip(&an, &["link", "set", a_if, "up"])?;
                self.ethtool(&bn, b_if, &["gro", "on"])?;
                self.ip(&bn, &["link", "set", b_if, "up"])?;
            }
            PeerNapi::Off => {
                self.ip(&an, &["link", "set", a_if, "up"])?;
                self.ip(&bn, &["link", "set", b_if, "up"])?;
            }
        }
        self.linked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend([an, bn]);
        Ok(())
    }

    /// A bridge `name` in `role` with `ports` (existing links there), up.
    pub fn bridge(&self, role: &str, name: &str, ports: &[&str]) -> Result<()> {
        self.ip(role, &["link", "add", name, "type", "bridge"])?;
        for port in ports {
            self.ip(role, &["link", "set", port, "master", name])?;
        }
        self.ip(role, &["link", "set", name, "up"])?;
        Ok(())
    }

    /// Adds address `cidr` (`a.b.c.d/len`) to `dev` in `role`.
    pub fn addr(&self, role: &str, dev: &str, cidr: &str) -> Result<()> {
        self.ip(role, &["addr", "add", cidr, "dev", dev]).map(drop)
    }

    /// `ethtool -K <dev> <features>` in `role` (e.g. `["tx", "off"]`).
    pub fn ethtool(&self, role: &str, dev: &str, features: &[&str]) -> Result<()> {
        let mut argv = vec!["ethtool", "-K", dev];
        argv.extend_from_slice(features);
        self.exec(role, &argv).map(drop)
    }

    /// A permanent neighbour entry (`ip neigh replace … nud permanent`):
    /// makes `bpf_fib_lookup` answer with `mac` without any ARP.
    pub fn pin_neighbour(&self, role: &str, ip: Ipv4Addr, mac: [u8; 6], dev: &str) -> Result<()> {
        let mac = mac.map(|b| format!("{b:02x}")).join(":");
        let ip = ip.to_string();
        let argv = [
            "neigh",
            "replace",
            &ip,
            "lladdr",
            &mac,
            "dev",
            dev,
            "nud",
            "permanent",
        ];
        self.ip(role, &argv).map(drop)
    }

    /// Waits until, in every namespace this set made links in, every link
    /// that is set up is operationally up and every bridge port forwards.
    ///
    /// A link's carrier reaches its operational state (and a bridge port
    /// its forwarding state) through the kernel's link watch, which
    /// batches events for up to a second when many links change at once
    /// (parallel labs). Until then a bridge drops what a client sends, and
    /// a test's first packet waits out an ARP retransmit: a second lost at
    /// random.
    pub fn settle(&self) -> Result<()> {
        let mut names = self
            .linked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        names.sort();
        names.dedup();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut pending = Vec::new();
            for ns in &names {
                pending.extend(unsettled_links(ns)?);
            }
            if pending.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("links still not up after 10 s: {}", pending.join(", "));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, role: &str, args: &[&str]) -> Result<Output> {
        run(Command::new("ip").arg("-n").arg(self.ns(role)).args(args))
    }

    /// A `Command` that runs `argv` in `role` (`ip netns exec`, which also
    /// gives it that namespace's /sys), for callers that set up stdio
    /// themselves; see [`Namespaces::spawn_command`].
    pub fn command(&self, role: &str, argv: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(role)]).args(argv);
        cmd
    }

    /// Runs `argv` in `role`; fails, with its stderr, unless it exits 0.
    pub fn exec(&self, role: &str, argv: &[&str]) -> Result<Output> {
        run(&mut self.command(role, argv))
    }

    /// Runs `argv` in `role` and returns its output whatever the exit
    /// status; fails only if it cannot be started.
    pub fn exec_unchecked(&self, role: &str, argv: &[&str]) -> Result<Output> {
        self.command(role, argv)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {argv:?} in {}", self.ns(role)))
    }

    /// Runs `argv` in `role`, killing it after `timeout`; returns its
    /// output whatever the exit status, or an error if it had to be killed.
    pub fn exec_timeout(&self, role: &str, argv: &[&str], timeout: Duration) -> Result<Output> {
        output_with_timeout(&mut self.command(role, argv), timeout)
            .with_context(|| format!("running {argv:?} in {}", self.ns(role)))
    }

    /// `/sys/class/net/<ifname>/<attr>` as `role` sees it, trimmed.
    pub fn read_sys(&self, role: &str, ifname: &str, attr: &str) -> Result<String> {
        let out = self.exec(role, &["cat", &format!("/sys/class/net/{ifname}/{attr}")])?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// The MAC address of `ifname` in `role`.
    pub fn mac(&self, role: &str, ifname: &str) -> Result<[u8; 6]> {
        crate::packet::parse_mac(&self.read_sys(role, ifname, "address")?)
    }

    /// The interface index of `ifname` in `role`.
    pub fn ifindex(&self, role: &str, ifname: &str) -> Result<u32> {
        let index = self.read_sys(role, ifname, "ifindex")?;
        index
            .parse()
            .with_context(|| format!("ifindex of {ifname} in {}: {index:?}", self.ns(role)))
    }

    /// Starts `argv` in `role` with stdin closed and stdout/stderr
    /// inherited. The process is killed when the returned handle or the
    /// set is dropped, whichever comes first.
    pub fn spawn(&self, role: &str, argv: &[&str]) -> Result<LabChild> {
        self.spawn_command(&mut self.command(role, argv))
    }

    /// Starts a command made by [`Namespaces::command`] (e.g. with piped
    /// stdout), stdin closed; killed like [`Namespaces::spawn`]'s.
    pub fn spawn_command(&self, cmd: &mut Command) -> Result<LabChild> {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {cmd:?}"))?;
        self.spawned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child.id());
        Ok(LabChild { child })
    }

    /// Writes `/proc/sys/<key>` from a thread inside `role`: /proc/sys/net
    /// shows the namespace of the thread that opens it.
    pub fn sysctl(&self, role: &str, key: &str, value: &str) -> Result<()> {
        let path = Path::new("/proc/sys").join(key);
        self.in_ns(role, || std::fs::write(&path, value))?
            .with_context(|| format!("setting {key}={value} in {}", self.ns(role)))
    }

    /// `/proc/sys/<key>` as `role` sees it, trimmed.
    pub fn read_sysctl(&self, role: &str, key: &str) -> Result<String> {
        let path = Path::new("/proc/sys").join(key);
        let value = self.in_ns(role, || std::fs::read_to_string(&path))?;
        let value = value.with_context(|| format!("reading {key} in {}", self.ns(role)))?;
        Ok(value.trim().to_string())
    }

    /// Runs `f` on a new thread that has joined `role`'s network namespace
    /// and returns its result (a panic in `f` is re-raised here). Sockets
    /// created in `f` stay in that namespace wherever they are used
    /// afterwards.
    pub fn in_ns<F, R>(&self, role: &str, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        in_netns(&self.ns_path(role), f)
    }

    /// Spawns a long-running thread inside `role`.
    pub fn spawn_thread<F, R>(&self, role: &str, f: F) -> std::thread::JoinHandle<Result<R>>
    where
        F: FnOnce() -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let path = self.ns_path(role);
        std::thread::spawn(move || {
            enter_netns(&path)?;
            f()
        })
    }

    /// A UDP socket in `role` bound to `bind` (`0.0.0.0:0` for any).
    pub fn udp_socket(&self, role: &str, bind: SocketAddrV4) -> Result<UdpSocket> {
        let socket = self.socket(role, Type::DGRAM, Protocol::UDP)?;
        socket
            .bind(&SockAddr::from(bind))
            .with_context(|| format!("binding UDP {bind} in {}", self.ns(role)))?;
        Ok(socket.into())
    }

    /// A TCP listener in `role` bound to `bind`.
    pub fn tcp_listener(&self, role: &str, bind: SocketAddrV4) -> Result<TcpListener> {
        let socket = self.socket(role, Type::STREAM, Protocol::TCP)?;
        // Lets a test reuse a port whose earlier connection is in TIME_WAIT.
        socket.set_reuse_address(true)?;
        socket
            .bind(&SockAddr::from(bind))
            .with_context(|| format!("binding TCP {bind} in {}", self.ns(role)))?;
        socket.listen(128)?;
        Ok(socket.into())
    }

    /// A TCP connection from `role` to `dst`, optionally from source `src`
    /// (port 0 = any), given up after `timeout`.
    pub fn tcp_connect(
        &self,
        role: &str,
        src: Option<SocketAddrV4>,
        dst: SocketAddrV4,
        timeout: Duration,
    ) -> Result<TcpStream> {
        self.in_ns(role, || connect(src, dst, timeout))?
    }

    fn socket(&self, role: &str, ty: Type, proto: Protocol) -> Result<Socket> {
        self.in_ns(role, || Socket::new(Domain::IPV4, ty, Some(proto)))?
            .with_context(|| format!("creating a socket in {}", self.ns(role)))
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        let namespaces: Vec<(u64, u64)> = self
            .created
            .iter()
            .filter_map(|n| std::fs::metadata(Path::new(NETNS_DIR).join(n)).ok())
            .map(|m| (m.dev(), m.ino()))
            .collect();
        // A namespace outlives `ip netns del` while a process is inside it,
        // so everything still running in ours goes first.
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

/// A TCP connection (in the calling thread's namespace), optionally from
/// `src`, given up after `timeout`.
pub fn connect(
    src: Option<SocketAddrV4>,
    dst: SocketAddrV4,
    timeout: Duration,
) -> Result<TcpStream> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    if let Some(src) = src {
        s.set_reuse_address(true)?;
        s.bind(&SockAddr::from(src))
            .with_context(|| format!("binding TCP {src}"))?;
    }
    s.connect_timeout(&SockAddr::from(dst), timeout)
        .with_context(|| format!("connecting to {dst}"))?;
    Ok(s.into())
}

/// A process started in a namespace ([`Namespaces::spawn`]); dereferences
/// to [`Child`]. Dropping it kills and reaps the process.
pub struct LabChild {
    child: Child,
}

impl LabChild {
    /// Sends SIGTERM, waits up to `grace` for the process to exit, then
    /// SIGKILLs it. Returns how it exited.
    pub fn terminate(&mut self, grace: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        // The pid is ours and not yet reaped, so it cannot have been reused.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child.kill()?;
        Ok(self.child.wait()?)
    }
}

impl Deref for LabChild {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.child
    }
}

impl DerefMut for LabChild {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for LabChild {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `f` on a new thread that joined the namespace at `path` and
/// returns its result (a panic in `f` is re-raised here).
fn in_netns<F, R>(path: &Path, f: F) -> Result<R>
where
    F: FnOnce() -> R + Send,
    R: Send,
{
    std::thread::scope(|s| {
        let thread = s.spawn(move || -> Result<R> {
            enter_netns(path)?;
            Ok(f())
        });
        match thread.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter_netns(path: &Path) -> Result<()> {
    let ns = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: plain syscall on a valid fd; affects only the calling thread.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("setns into {}", path.display()));
    }
    Ok(())
}

/// Runs `cmd` to completion; fails with its stderr unless it exits 0.
pub(crate) fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Like `Command::output`, but kills the process after `timeout`.
pub(crate) fn output_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    use std::io::Read;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    // Drained on threads so a chatty process cannot block on a full pipe.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} still running after {timeout:?}; killed");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// SIGKILLs `pid` if it is a running child of ours. A child that has been
/// reaped (its `LabChild` waited for it) may have had its pid reused, so it is
/// left alone; an unreaped one cannot have.
fn kill_if_running_child(pid: u32) {
    // SAFETY: zeroed siginfo_t is valid; waitid only writes into it.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
        let running = libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, flags) == 0
            && info.si_pid() == 0;
        if running {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
        }
    }
}

/// SIGKILLs every process (other than this one) whose network namespace is
/// one of `namespaces` (device, inode), like `ip netns pids`.
fn kill_processes_in(namespaces: &[(u64, u64)]) {
    if namespaces.is_empty() {
        return;
    }
    let Ok(proc) = std::fs::read_dir("/proc") else {
        return;
    };
    let me = std::process::id();
    for entry in proc.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(ns) = std::fs::metadata(format!("/proc/{pid}/ns/net")) else {
            continue;
        };
        if namespaces.contains(&(ns.dev(), ns.ino())) {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}

/// Deletes namespaces left by sets of processes that no longer exist
/// (a crashed or killed test run never reached `Drop`). Best effort.
fn remove_stale_namespaces() {
    let Ok(dir) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    let me = std::process::id();
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(pid) = name
            .strip_prefix(NS_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        // Another run may be cleaning up the same leftovers; losing that
        // race is harmless.
        let _ = run(Command::new("ip").args(["netns", "del", name]));
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

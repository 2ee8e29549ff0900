use crate::*;
use anyhow::{Context, Result, bail};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::fs::File;
use std::net::{SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::ops::{Deref, DerefMut};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub(crate) const NETNS_DIR: &str = "/run/netns";

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// `ip netns add` makes /run/netns a shared mount the first time it runs;
/// two threads doing that at once can stack bind mounts, so creations in
/// this process take turns.
pub(crate) static NETNS_ADD: Mutex<()> = Mutex::new(());

/// Veth pairs: (host, interface, peer host, peer interface).
const LINKS: [(Host, &str, Host, &str); 5] = [
    (Host::Client1, HOST_IF, Host::Sw, SW_CLIENT1_PORT),
    (Host::Client2, HOST_IF, Host::Sw, SW_CLIENT2_PORT),
    (Host::Nat, INT_IF, Host::Sw, SW_NAT_PORT),
    (Host::Nat, EXT_IF, Host::Router, ROUTER_NAT_IF),
    (Host::Router, ROUTER_SRV_IF, Host::Server, HOST_IF),
];

/// Interfaces that get an address: (host, interface, address).
const ADDRESSES: [(Host, &str, Ipv4Addr); 7] = [
    (Host::Client1, HOST_IF, CLIENT1_IP),
    (Host::Client2, HOST_IF, CLIENT2_IP),
    (Host::Nat, INT_IF, NAT_INT_IP),
    (Host::Nat, EXT_IF, NAT_EXT_IP),
    (Host::Router, ROUTER_NAT_IF, ROUTER_NAT_IP),
    (Host::Router, ROUTER_SRV_IF, ROUTER_SRV_IP),
    (Host::Server, HOST_IF, SERVER_IP),
];

/// Devices whose TX checksum offload is off: the last hop before each
/// endpoint, so a partial checksum is completed in software before the
/// packet is delivered and the endpoints really verify every checksum.
const TX_CSUM_OFF: [(Host, &str); 3] = [
    (Host::Sw, SW_CLIENT1_PORT),
    (Host::Sw, SW_CLIENT2_PORT),
    (Host::Router, ROUTER_SRV_IF),
];

/// How a [`Lab`] is built. `LabOptions::default()` is the standard lab.
#[derive(Clone, Debug)]
pub struct LabOptions {
    /// `net.ipv4.ip_forward` in `nat`. On by default, so the kernel could
    /// forward and only the missing translation makes traffic fail.
    pub nat_ip_forward: bool,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            nat_ip_forward: true,
        }
    }
}

/// A running lab: six network namespaces, removed again on drop.
pub struct Lab {
    id: String,
    names: [String; 6],
    /// Namespaces that exist, so a half-built lab removes only those.
    created: Vec<Host>,
    /// Processes from `spawn`: one that has not yet switched namespace (still
    /// `ip netns exec` starting up) is invisible to the namespace scan.
    spawned: Mutex<Vec<u32>>,
}

impl Lab {
    /// Builds the standard lab. Needs root.
    pub fn new() -> Result<Lab> {
        Lab::new_with(LabOptions::default())
    }

    /// Builds a lab with `options`. On failure everything created so far is
    /// removed again.
    pub fn new_with(options: LabOptions) -> Result<Lab> {
        remove_stale_namespaces();
        let id = format!(
            "{NS_PREFIX}{}-{}",
            std::process::id(),
            NEXT_LAB.fetch_add(1, Ordering::Relaxed)
        );
        let names = Host::ALL.map(|h| format!("{id}-{}", h.role()));
        let mut lab = Lab {
            id,
            names,
            created: Vec::new(),
            spawned: Mutex::new(Vec::new()),
        };
        // On error `lab` is dropped here, which tears down the partial lab.
        lab.build(&options)
            .with_context(|| format!("building network lab {}", lab.id))?;
        Ok(lab)
    }

    fn build(&mut self, options: &LabOptions) -> Result<()> {
        for h in Host::ALL {
            {
                let _turn = NETNS_ADD.lock().unwrap_or_else(|e| e.into_inner());
                run(Command::new("ip").args(["netns", "add", self.ns(h)]))?;
            }
            self.created.push(h);
            // Before any interface exists, so `default` covers all of them:
            // no router solicitations or DAD traffic on the links.
            self.sysctl(h, "net/ipv6/conf/all/disable_ipv6", "1")?;
            self.sysctl(h, "net/ipv6/conf/default/disable_ipv6", "1")?;
            self.ip(h, &["link", "set", "lo", "up"])?;
        }

        // Created directly inside their namespaces: nothing ever appears in
        // the root namespace, where parallel labs would clash on names.
        for (a, a_if, b, b_if) in LINKS {
            run(Command::new("ip").args([
                "link",
                "add",
                a_if,
                "netns",
                self.ns(a),
                "type",
                "veth",
                "peer",
                "name",
                b_if,
                "netns",
                self.ns(b),
            ]))?;
        }

        self.ip(Host::Sw, &["link", "add", SW_BRIDGE, "type", "bridge"])?;
        for port in [SW_CLIENT1_PORT, SW_CLIENT2_PORT, SW_NAT_PORT] {
            self.ip(Host::Sw, &["link", "set", port, "master", SW_BRIDGE])?;
        }

        // A frame that XDP redirects into a veth is dropped unless the
        // receiving end runs NAPI; GRO on gives every end NAPI, as a
        // physical NIC would have.
        for (a, a_if, b, b_if) in LINKS {
            self.exec(a, &["ethtool", "-K", a_if, "gro", "on"])?;
            self.exec(b, &["ethtool", "-K", b_if, "gro", "on"])?;
        }
        for (h, dev) in TX_CSUM_OFF {
            self.exec(h, &["ethtool", "-K", dev, "tx", "off"])?;
        }

        for (h, dev, ip) in ADDRESSES {
            let cidr = format!("{ip}/{PREFIX_LEN}");
            self.ip(h, &["addr", "add", &cidr, "dev", dev])?;
        }
        for (a, a_if, b, b_if) in LINKS {
            self.ip(a, &["link", "set", a_if, "up"])?;
            self.ip(b, &["link", "set", b_if, "up"])?;
        }
        self.ip(Host::Sw, &["link", "set", SW_BRIDGE, "up"])?;

        let nat_gw = ROUTER_NAT_IP.to_string();
        let client_gw = NAT_INT_IP.to_string();
        let server_gw = ROUTER_SRV_IP.to_string();
        for client in [Host::Client1, Host::Client2] {
            self.ip(client, &["route", "add", "default", "via", &client_gw])?;
        }
        self.ip(
            Host::Nat,
            &["route", "add", "default", "via", &nat_gw, "dev", EXT_IF],
        )?;
        self.ip(
            Host::Server,
            &["route", "add", "default", "via", &server_gw],
        )?;
        // Deliberately no route to PRIVATE_NET in the router: the Internet
        // does not know private addresses.

        let fwd = if options.nat_ip_forward { "1" } else { "0" };
        self.sysctl(Host::Nat, "net/ipv4/ip_forward", fwd)?;
        self.sysctl(Host::Router, "net/ipv4/ip_forward", "1")?;
        crate::netns::wait_links_settled(&self.names.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// `natlab-<pid>-<counter>`: the common prefix of this lab's namespaces.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The name of `h`'s network namespace.
    pub fn ns(&self, h: Host) -> &str {
        &self.names[h as usize]
    }

    /// The bind mount that keeps `h`'s namespace alive (for `setns`).
    pub fn ns_path(&self, h: Host) -> PathBuf {
        Path::new(NETNS_DIR).join(self.ns(h))
    }

    /// A `Command` that runs `argv` inside `h` (`ip netns exec`), for
    /// callers that want to set up stdio themselves; see [`Lab::spawn_command`].
    pub fn command(&self, h: Host, argv: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.ns(h)]).args(argv);
        cmd
    }

    /// Runs `argv` inside `h` and fails, with its stderr, unless it exits 0.
    pub fn exec(&self, h: Host, argv: &[&str]) -> Result<Output> {
        run(&mut self.command(h, argv))
    }

    /// Runs `argv` inside `h` and returns its output whatever the exit
    /// status; fails only if it cannot be started.
    pub fn exec_unchecked(&self, h: Host, argv: &[&str]) -> Result<Output> {
        self.command(h, argv)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {argv:?} in {}", self.ns(h)))
    }

    /// Runs `argv` inside `h`, killing it after `timeout`; returns its output
    /// whatever the exit status, or an error if it had to be killed.
    pub fn exec_timeout(&self, h: Host, argv: &[&str], timeout: Duration) -> Result<Output> {
        output_with_timeout(&mut self.command(h, argv), timeout)
            .with_context(|| format!("running {argv:?} in {}", self.ns(h)))
    }

    /// Starts `argv` inside `h` with stdin closed and stdout/stderr
    /// inherited. The process is killed when the returned handle or the lab
    /// is dropped, whichever comes first.
    pub fn spawn(&self, h: Host, argv: &[&str]) -> Result<LabChild> {
        let mut cmd = self.command(h, argv);
        cmd.stdin(Stdio::null());
        self.spawn_command(&mut cmd)
    }

    /// Starts a command made by [`Lab::command`] (e.g. with piped stdout).
    pub fn spawn_command(&self, cmd: &mut Command) -> Result<LabChild> {
        let child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
        self.spawned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child.id());
        Ok(LabChild { child })
    }

    /// Runs `f` on a new thread that has joined `h`'s network namespace and
    /// returns its result (a panic in `f` is re-raised here). Sockets created
    /// in `f` stay in that namespace wherever they are used afterwards.
    pub fn in_ns<F, R>(&self, h: Host, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        in_netns(&self.ns_path(h), f)
    }

    /// A UDP socket in `h` bound to `bind` (`0.0.0.0:0` for any).
    pub fn udp_socket(&self, h: Host, bind: SocketAddrV4) -> Result<UdpSocket> {
        let socket = self.socket(h, Type::DGRAM, Protocol::UDP)?;
        socket
            .bind(&SockAddr::from(bind))
            .with_context(|| format!("binding UDP {bind} in {}", self.ns(h)))?;
        Ok(socket.into())
    }

    /// A TCP listener in `h` bound to `bind`.
    pub fn tcp_listener(&self, h: Host, bind: SocketAddrV4) -> Result<TcpListener> {
        let socket = self.socket(h, Type::STREAM, Protocol::TCP)?;
        // Lets a test reuse a port whose earlier connection is in TIME_WAIT.
        socket.set_reuse_address(true)?;
        socket
            .bind(&SockAddr::from(bind))
            .with_context(|| format!("binding TCP {bind} in {}", self.ns(h)))?;
        socket.listen(128)?;
        Ok(socket.into())
    }

    /// A TCP connection from `h` to `dst`, optionally from source `src`
    /// (port 0 = any), given up after `timeout`.
    pub fn tcp_connect(
        &self,
        h: Host,
        src: Option<SocketAddrV4>,
        dst: SocketAddrV4,
        timeout: Duration,
    ) -> Result<TcpStream> {
        let socket = self.socket(h, Type::STREAM, Protocol::TCP)?;
        if let Some(src) = src {
            socket.set_reuse_address(true)?;
            socket
                .bind(&SockAddr::from(src))
                .with_context(|| format!("binding TCP {src} in {}", self.ns(h)))?;
        }
        socket
            .connect_timeout(&SockAddr::from(dst), timeout)
            .with_context(|| format!("connecting from {} to {dst}", self.ns(h)))?;
        Ok(socket.into())
    }

    fn socket(&self, h: Host, ty: Type, proto: Protocol) -> Result<Socket> {
        self.in_ns(h, || Socket::new(Domain::IPV4, ty, Some(proto)))?
            .with_context(|| format!("creating a socket in {}", self.ns(h)))
    }

    fn ip(&self, h: Host, args: &[&str]) -> Result<Output> {
        run(Command::new("ip").arg("-n").arg(self.ns(h)).args(args))
    }

    /// Writes `/proc/sys/<key>` from a thread inside `h`: /proc/sys/net
    /// shows the namespace of the thread that opens it.
    fn sysctl(&self, h: Host, key: &str, value: &str) -> Result<()> {
        let path = Path::new("/proc/sys").join(key);
        self.in_ns(h, || std::fs::write(&path, value))?
            .with_context(|| format!("setting {key}={value} in {}", self.ns(h)))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let namespaces: Vec<(u64, u64)> = self
            .created
            .iter()
            .filter_map(|&h| std::fs::metadata(self.ns_path(h)).ok())
            .map(|m| (m.dev(), m.ino()))
            .collect();
        // A namespace outlives `ip netns del` while a process is inside it,
        // so everything still running in ours goes first.
        let spawned = self.spawned.get_mut().unwrap_or_else(|e| e.into_inner());
        for &pid in spawned.iter() {
            kill_if_running_child(pid);
        }
        kill_processes_in(&namespaces);
        for &h in &self.created {
            if let Err(e) = run(Command::new("ip").args(["netns", "del", self.ns(h)])) {
                eprintln!("nat_lab: could not remove namespace: {e:#}");
            }
        }
    }
}

/// A process started with [`Lab::spawn`]; dereferences to [`Child`].
/// Dropping it kills and reaps the process.
pub struct LabChild {
    child: Child,
}

impl LabChild {
    pub(crate) fn new(child: Child) -> LabChild {
        LabChild { child }
    }

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
pub(crate) fn in_netns<F, R>(path: &Path, f: F) -> Result<R>
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

pub(crate) fn enter_netns(path: &Path) -> Result<()> {
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
pub(crate) fn kill_if_running_child(pid: u32) {
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
pub(crate) fn kill_processes_in(namespaces: &[(u64, u64)]) {
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

/// Deletes namespaces left by labs of processes that no longer exist
/// (a crashed or killed test run never reached `Drop`). Best effort.
pub(crate) fn remove_stale_namespaces() {
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
        if pid == me || process_alive(pid) {
            continue;
        }
        // Another run may be cleaning up the same leftovers; losing that
        // race is harmless.
        let _ = run(Command::new("ip").args(["netns", "del", name]));
    }
}

fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

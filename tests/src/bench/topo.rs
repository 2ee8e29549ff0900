//! One benchmark topology: generator → gateway → sink, three namespaces and
//! two veth pairs, with one variant of the gateway configured in the middle.
//! Dropping it stops everything it started and deletes its namespaces.

use std::{net::Ipv4Addr, path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, PerCpuArray},
    programs::{Xdp, XdpMode},
};
use nat_common::{
    MAP_BENCH_GEN, MAP_BENCH_SINK, PROG_BENCH_GEN, PROG_BENCH_PASS, PROG_BENCH_SINK,
    PROG_XDP_FWD_ONLY,
    bench::{GEN_SRC_COUNT, GEN_SRC_FIRST, GenConfig},
};

use crate::{Gateway, loader_path, netns::Namespaces};

use super::Variant;

pub const GEN_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 11);
pub const GW_INT_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
pub const GW_EXT_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
pub const SINK_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

/// The three namespaces of a topology.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Gen = 0,
    Gw = 1,
    Sink = 2,
}

const ROLES: [Role; 3] = [Role::Gen, Role::Gw, Role::Sink];

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Gen => "gen",
            Role::Gw => "gw",
            Role::Sink => "sink",
        }
    }
}

/// A NIC of the topology: a veth end whose name is unique on the host
/// (the NAPI kthreads are named after it, `napi/<ifname>-<id>`, which is
/// how they are found), with its MAC address and index once built.
pub struct Nic {
    pub name: String,
    pub mac: [u8; 6],
    pub index: u32,
}

impl Nic {
    fn named(name: String) -> Nic {
        Nic {
            name,
            mac: [0; 6],
            index: 0,
        }
    }
}

pub struct Topo {
    pub variant: Variant,
    /// The generator's link to the gateway, the gateway's two NICs, the
    /// sink's link.
    pub gen_if: Nic,
    pub gw_int: Nic,
    pub gw_ext: Nic,
    pub sink_if: Nic,
    // Fields drop in order: the programs (their links die with their
    // fds), the loader (which detaches its own on SIGTERM), then the
    // namespaces.
    /// `bench_sink` on the sink, `bench_pass` on the generator's NIC, and the
    /// generator `bench_gen`, loaded (run through BPF_PROG_RUN, see
    /// `generator.rs`).
    endpoints: Option<Ebpf>,
    /// `bench_gen`'s state, taken out of `endpoints` so a shared topology
    /// can set it.
    gen_cfg: Option<std::sync::Mutex<Array<MapData, GenConfig>>>,
    /// The forward-only program on both gateway interfaces (variant
    /// `XdpFwd`).
    fwd: Option<Ebpf>,
    /// The real loader (variant `Gateway`).
    gateway: Option<Gateway>,
    /// The connection-tracking table's size, when not the default: the
    /// loader's `--max-flows`; for the kernel variants, the caller raises
    /// `nf_conntrack_max` (a host-wide setting, see stateful.rs).
    table: Option<u32>,
    ns: Namespaces,
}

impl Topo {
    /// Builds the topology for `variant`. On error everything created so
    /// far is removed again.
    pub fn new(variant: Variant, work: &std::path::Path) -> Result<Topo> {
        Topo::build_with(variant, work, None)
    }

    /// [`Topo::new`] with a connection-tracking table of `table` sessions,
    /// and the kernel's unreplied-UDP timeout raised to the gateway's UDP
    /// timeout (300 s), so both keep what they track equally long.
    pub fn with_table(variant: Variant, work: &std::path::Path, table: u32) -> Result<Topo> {
        Topo::build_with(variant, work, Some(table))
    }

    fn build_with(variant: Variant, work: &std::path::Path, table: Option<u32>) -> Result<Topo> {
        let pid = std::process::id();
        let c = variant.letter();
        let ifname = |r: char| format!("{c}{pid}{r}");
        let mut t = Topo {
            variant,
            gen_if: Nic::named(ifname('c')),
            gw_int: Nic::named(ifname('i')),
            gw_ext: Nic::named(ifname('e')),
            sink_if: Nic::named(ifname('s')),
            endpoints: None,
            gen_cfg: None,
            fwd: None,
            gateway: None,
            table,
            ns: Namespaces::new("bench"),
        };
        t.build(work)
            .with_context(|| format!("building the {} topology", variant.key()))?;
        Ok(t)
    }

    pub fn ns(&self, r: Role) -> String {
        self.ns.ns(r.name())
    }

    pub fn ns_path(&self, r: Role) -> PathBuf {
        self.ns.ns_path(r.name())
    }

    /// `argv` inside `r`'s namespace (`ip netns exec`, which also gives it
    /// that namespace's /sys).
    pub fn command(&self, r: Role, argv: &[&str]) -> Command {
        self.ns.command(r.name(), argv)
    }

    pub fn exec(&self, r: Role, argv: &[&str]) -> Result<String> {
        let out = self.ns.exec(r.name(), argv)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A permanent neighbour entry in `r` (see [`Namespaces::pin_neighbour`]).
    pub fn pin_neighbour(&self, r: Role, ip: Ipv4Addr, mac: [u8; 6], dev: &str) -> Result<()> {
        self.ns.pin_neighbour(r.name(), ip, mac, dev)
    }

    /// Runs `f` on a thread inside `r`'s namespace.
    pub fn in_ns<F, R>(&self, r: Role, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        self.ns.in_ns(r.name(), f)
    }

    fn build(&mut self, work: &std::path::Path) -> Result<()> {
        let (generator, gw, sink) = (Role::Gen.name(), Role::Gw.name(), Role::Sink.name());
        for r in ROLES {
            self.ns.add(r.name())?;
        }
        let ns = &self.ns;
        // Every end gets NAPI (GRO): needed to receive XDP redirects, and
        // what threaded NAPI (the gateway's pinned CPU) runs.
        ns.veth(generator, &self.gen_if.name, gw, &self.gw_int.name)?;
        ns.veth(gw, &self.gw_ext.name, sink, &self.sink_if.name)?;
        // Endpoints send complete checksums (no TX offload, hence no TSO):
        // so every variant forwards the same MTU-sized, fully checksummed
        // packets, and the XDP variants take their fast path for TCP too.
        ns.ethtool(generator, &self.gen_if.name, &["tx", "off"])?;
        ns.ethtool(sink, &self.sink_if.name, &["tx", "off"])?;
        ns.addr(generator, &self.gen_if.name, &format!("{GEN_IP}/24"))?;
        for i in 0..GEN_SRC_COUNT {
            let ip = Ipv4Addr::new(10, 1, 0, GEN_SRC_FIRST + i);
            ns.addr(generator, &self.gen_if.name, &format!("{ip}/24"))?;
        }
        ns.addr(gw, &self.gw_int.name, &format!("{GW_INT_IP}/24"))?;
        ns.addr(gw, &self.gw_ext.name, &format!("{GW_EXT_IP}/24"))?;
        ns.addr(sink, &self.sink_if.name, &format!("{SINK_IP}/24"))?;
        let gw_int_ip = GW_INT_IP.to_string();
        ns.ip(generator, &["route", "add", "default", "via", &gw_int_ip])?;
        // Replies of the no-NAT variants: the sink routes the inside subnet
        // back through the gateway (the NAT variants never use this route).
        let gw_ext_ip = GW_EXT_IP.to_string();
        ns.ip(sink, &["route", "add", "10.1.0.0/24", "via", &gw_ext_ip])?;
        ns.sysctl(gw, "net/ipv4/ip_forward", "1")?;
        for (r, dev) in self.all_ifs() {
            let threaded = format!("echo 1 > /sys/class/net/{dev}/threaded");
            ns.exec(r.name(), &["sh", "-c", &threaded])
                .with_context(|| format!("enabling threaded NAPI on {dev}"))?;
        }
        ns.settle()?;
        for (r, nic) in [
            (Role::Gen, &mut self.gen_if),
            (Role::Gw, &mut self.gw_int),
            (Role::Gw, &mut self.gw_ext),
            (Role::Sink, &mut self.sink_if),
        ] {
            nic.mac = ns.mac(r.name(), &nic.name)?;
            nic.index = ns.ifindex(r.name(), &nic.name)?;
        }

        self.attach_endpoints()?;
        self.configure_variant(work)?;
        self.check_path()
    }

    /// Interfaces with a NAPI thread.
    fn all_ifs(&self) -> [(Role, String); 4] {
        [
            (Role::Gen, self.gen_if.name.clone()),
            (Role::Gw, self.gw_int.name.clone()),
            (Role::Gw, self.gw_ext.name.clone()),
            (Role::Sink, self.sink_if.name.clone()),
        ]
    }

    /// `bench_sink` (XDP) on the sink, `bench_pass` (XDP) on the
    /// generator's interface, `bench_gen` loaded; the same in every
    /// variant.
    fn attach_endpoints(&mut self) -> Result<()> {
        let mut ebpf = load_object()?;
        for (r, dev, name) in [
            (Role::Gen, &self.gen_if.name, PROG_BENCH_PASS),
            (Role::Sink, &self.sink_if.name, PROG_BENCH_SINK),
        ] {
            let prog: &mut Xdp = program(&mut ebpf, name)?;
            prog.load().with_context(|| format!("verifying {name}"))?;
            self.in_ns(r, || prog.attach(dev, XdpMode::Driver).map(|_| ()))?
                .with_context(|| format!("attaching {name} to {dev}"))?;
        }
        let mut cfg = Array::<MapData, GenConfig>::try_from(
            ebpf.take_map(MAP_BENCH_GEN)
                .context("BENCH_GEN missing from the object")?,
        )?;
        let gen_cfg = GenConfig {
            ifindex: self.gen_if.index,
            ..GenConfig::default()
        };
        cfg.set(0, gen_cfg, 0)?;
        let prog: &mut Xdp = program(&mut ebpf, PROG_BENCH_GEN)?;
        prog.load()
            .with_context(|| format!("verifying {PROG_BENCH_GEN}"))?;
        self.gen_cfg = Some(std::sync::Mutex::new(cfg));
        self.endpoints = Some(ebpf);
        Ok(())
    }

    fn configure_variant(&mut self, work: &std::path::Path) -> Result<()> {
        let ext = self.gw_ext.name.clone();
        if self.table.is_some() && matches!(self.variant, Variant::Iptables | Variant::Nftables) {
            // The sink never answers: every entry stays unreplied, whose
            // timeout (30 s by default) would expire flows the gateway's
            // UDP timeout keeps. Per namespace.
            for key in [
                "nf_conntrack_udp_timeout",
                "nf_conntrack_udp_timeout_stream",
            ] {
                self.ns
                    .sysctl(Role::Gw.name(), &format!("net/netfilter/{key}"), "300")?;
            }
        }
        match self.variant {
            Variant::Kernel => {}
            Variant::Iptables => {
                self.exec(
                    Role::Gw,
                    &[
                        "iptables",
                        "-t",
                        "nat",
                        "-A",
                        "POSTROUTING",
                        "-o",
                        &ext,
                        "-j",
                        "MASQUERADE",
                    ],
                )?;
            }
            Variant::Nftables => {
                let rules = format!(
                    "table ip bench_nat {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    oifname \"{ext}\" masquerade\n  }}\n}}\n"
                );
                let file = work.join(format!("nft-{}.conf", self.gw_ext.name));
                std::fs::write(&file, rules)?;
                let r = self.exec(Role::Gw, &["nft", "-f", &file.to_string_lossy()]);
                let _ = std::fs::remove_file(&file);
                r?;
            }
            Variant::Gateway => self.start_loader()?,
            Variant::XdpFwd => {
                let mut ebpf = load_object()?;
                let prog: &mut Xdp = program(&mut ebpf, PROG_XDP_FWD_ONLY)?;
                prog.load()
                    .with_context(|| format!("verifying {PROG_XDP_FWD_ONLY}"))?;
                for dev in [&self.gw_int.name, &self.gw_ext.name] {
                    let prog: &mut Xdp = program(&mut ebpf, PROG_XDP_FWD_ONLY)?;
                    self.in_ns(Role::Gw, || prog.attach(dev, XdpMode::Driver).map(|_| ()))?
                        .with_context(|| format!("attaching {PROG_XDP_FWD_ONLY} to {dev}"))?;
                }
                self.fwd = Some(ebpf);
            }
        }
        Ok(())
    }

    fn start_loader(&mut self) -> Result<()> {
        let nics = (self.gw_int.name.as_str(), self.gw_ext.name.as_str());
        let table = self.table.map(|t| t.to_string());
        let mut extra = vec!["--probe-port", "0", "--xdp-mode", "native"];
        if let Some(t) = &table {
            extra.extend(["--max-flows", t]);
        }
        let gw = Gateway::start_in(&self.ns, Role::Gw.name(), &loader_path()?, nics, &extra)?;
        self.gateway = Some(gw);
        Ok(())
    }

    /// A few pings end to end: resolves the neighbours and proves the
    /// variant forwards at all before anything is measured.
    fn check_path(&self) -> Result<()> {
        let sink = SINK_IP.to_string();
        self.exec(
            Role::Gen,
            &["ping", "-c", "3", "-i", "0.2", "-W", "2", "-q", &sink],
        )
        .with_context(|| {
            format!(
                "{} does not forward gen → sink (ping failed){}",
                self.variant.key(),
                self.gateway
                    .as_ref()
                    .map(|gw| format!("; loader log:\n{}", gw.log().join("\n")))
                    .unwrap_or_default()
            )
        })?;
        Ok(())
    }

    /// The generator program (loaded, not attached).
    pub fn gen_prog(&self) -> Result<&Xdp> {
        let ebpf = self.endpoints.as_ref().context("endpoints not attached")?;
        ebpf.program(PROG_BENCH_GEN)
            .with_context(|| format!("{PROG_BENCH_GEN} missing from the object"))?
            .try_into()
            .with_context(|| format!("{PROG_BENCH_GEN} is not an XDP program"))
    }

    /// Sets the generator up for run `b`: its flows, pace and limit, its
    /// count at zero; the flow index starts at `b.first` or goes on.
    pub fn gen_start(&self, b: &super::generator::Blast, frame: &[u8]) -> Result<()> {
        self.gen_update(|c| {
            c.frame[..frame.len()].copy_from_slice(frame);
            c.flows = b.flows;
            if let Some(first) = b.first {
                c.next = first;
            }
            c.sent = 0;
            c.limit = b.packets.unwrap_or(0);
            c.rate = b.rate.map_or(0, |r| r.max(1.0) as u64);
            c.start_ns = 0;
        })
    }

    /// Packets the generator sent in its current (or last) run.
    pub fn gen_sent(&self) -> Result<u64> {
        let mut sent = 0;
        self.gen_update(|c| sent = c.sent)?;
        Ok(sent)
    }

    fn gen_update(&self, f: impl FnOnce(&mut GenConfig)) -> Result<()> {
        let cfg = self.gen_cfg.as_ref().context("generator not loaded")?;
        let mut cfg = cfg
            .lock()
            .map_err(|_| anyhow::anyhow!("generator state poisoned"))?;
        let before = cfg.get(&0, 0)?;
        let mut c = before;
        f(&mut c);
        if c != before {
            cfg.set(0, c, 0)?;
        }
        Ok(())
    }

    /// Packets `bench_sink` counted on the sink so far.
    pub fn sink_count(&self) -> Result<u64> {
        self.counter(0)
    }

    /// Packets `bench_gen` handed to the gateway so far.
    pub fn offered_count(&self) -> Result<u64> {
        self.counter(1)
    }

    fn counter(&self, index: u32) -> Result<u64> {
        let ebpf = self.endpoints.as_ref().context("endpoints not attached")?;
        let map = PerCpuArray::<&MapData, u64>::try_from(
            ebpf.map(MAP_BENCH_SINK)
                .context("BENCH_SINK missing from the object")?,
        )?;
        Ok(map.get(&index, 0)?.iter().sum())
    }

    /// Pins the NAPI kthreads: the gateway's two interfaces on `gw_cpu`,
    /// the endpoints' on `other_cpu`. NAPI in softirq context preempts
    /// every process; as threads at normal priority the gateway's would
    /// share its CPU with whatever else runs on the machine, and the sink's
    /// with the generator, which never sleeps: both SCHED_FIFO, so the
    /// sink takes what the gateway forwards however hard the generator
    /// (or a build elsewhere on the machine) pushes. Returns the gateway's
    /// kthreads.
    pub fn pin_napi(&self, gw_cpu: usize, other_cpu: usize) -> Result<Vec<i32>> {
        let mut gw = Vec::new();
        for (r, dev) in self.all_ifs() {
            let pids = napi_threads(&dev);
            if pids.is_empty() {
                bail!("no NAPI kthread for {dev}: threaded NAPI did not take effect");
            }
            let cpu = if r == Role::Gw { gw_cpu } else { other_cpu };
            for &pid in &pids {
                pin(pid, cpu).with_context(|| format!("pinning napi kthread {pid} of {dev}"))?;
                if r != Role::Gen {
                    realtime(pid)
                        .with_context(|| format!("making napi kthread {pid} SCHED_FIFO"))?;
                }
            }
            if r == Role::Gw {
                gw.extend(pids);
            }
        }
        // The loader's own threads (the sweeper walks millions of sessions
        // at a time) belong to the gateway too: on the other CPU they would
        // take the sink's time and make it drop what was forwarded.
        if let Some(pid) = self.gateway.as_ref().and_then(|g| g.pid()) {
            for task in std::fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
                if let Some(tid) = task.file_name().to_str().and_then(|s| s.parse().ok()) {
                    pin(tid, gw_cpu).with_context(|| format!("pinning loader thread {tid}"))?;
                }
            }
        }
        Ok(gw)
    }
}

/// The benchmark's own eBPF object (`nat-bench-ebpf`, built beside the
/// gateway's by `cargo xtask build-ebpf`); `NAT_BENCH_EBPF_OBJECT` overrides
/// the path.
pub fn bench_object_path() -> std::path::PathBuf {
    std::env::var_os("NAT_BENCH_EBPF_OBJECT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target/bpfel-unknown-none/release/nat-bench-ebpf")
        })
}

fn load_object() -> Result<Ebpf> {
    let path = bench_object_path();
    EbpfLoader::new().load_file(&path).with_context(|| {
        format!(
            "loading the benchmark's eBPF object {} (built by `cargo xtask build`)",
            path.display()
        )
    })
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    ebpf.program_mut(name)
        .with_context(|| {
            format!(
                "program {name} missing from the eBPF object (rebuild with `cargo xtask build`)"
            )
        })?
        .try_into()
        .with_context(|| format!("program {name} is not XDP"))
}

/// Pids of the NAPI kthreads of interface `dev` (`napi/<dev>-<id>`, the
/// name cut to 15 characters like every task name).
pub fn napi_threads(dev: &str) -> Vec<i32> {
    let prefix: String = format!("napi/{dev}-").chars().take(15).collect();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|c| c.trim_end().starts_with(&prefix))
                .unwrap_or(false)
        })
        .collect()
}

/// Restricts task `pid` (0: the calling thread) to `cpu`.
pub fn pin(pid: i32, cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET stays within it for
    // cpu < CPU_SETSIZE; sched_setaffinity only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error()).context("sched_setaffinity");
        }
    }
    Ok(())
}

/// SCHED_FIFO, priority 50 (what `chrt -f -p 50` sets): the default
/// priority of threaded interrupt handlers.
pub fn realtime(pid: i32) -> Result<()> {
    let param = libc::sched_param { sched_priority: 50 };
    // SAFETY: plain syscall with a valid sched_param.
    if unsafe { libc::sched_setscheduler(pid, libc::SCHED_FIFO, &param) } != 0 {
        return Err(std::io::Error::last_os_error()).context("sched_setscheduler");
    }
    Ok(())
}

/// CPU time task `pid` has run, in ns (/proc/<pid>/schedstat).
pub fn task_cpu_ns(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// System + irq + softirq time of `cpu` from /proc/stat, in ns.
pub fn cpu_kernel_ns(cpu: usize) -> u64 {
    let tick_ns = 1_000_000_000 / clock_ticks();
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(&format!("cpu{cpu} ")))
                .map(|l| {
                    let f: Vec<u64> = l
                        .split_whitespace()
                        .skip(1)
                        .filter_map(|v| v.parse().ok())
                        .collect();
                    // user nice system idle iowait irq softirq
                    (f.get(2).unwrap_or(&0) + f.get(5).unwrap_or(&0) + f.get(6).unwrap_or(&0))
                        * tick_ns
                })
        })
        .unwrap_or(0)
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

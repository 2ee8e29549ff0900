//! Loading the eBPF object and attaching its programs. Everything attached is
//! owned by [`Dataplane`]: dropping it detaches every program (XDP and TCX
//! links), also when attaching fails half-way.

use std::net::Ipv4Addr;

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray},
    programs::{LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode, tc::TcAttachOptions},
};
use nat_common::{
    CtKey, CtValue, GLOBAL_CONFIG, MAP_CT_FWD, MAP_CT_REV, MAP_STATS, NatConfig, PROG_TC_EXT,
    PROG_TC_INT, PROG_XDP_EXT, PROG_XDP_INT,
};
use tracing::{info, warn};

use crate::EBPF_OBJECT;

/// How XDP is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpAttach {
    /// Native (driver) mode, falling back to generic mode where the driver
    /// has no XDP support.
    Auto,
    /// Native mode only.
    Native,
    /// Generic (skb) mode: works everywhere, slower.
    Generic,
}

pub struct Settings {
    pub ext: String,
    pub ext_index: u32,
    pub int: String,
    pub int_index: u32,
    pub snat_addr: Ipv4Addr,
    pub port_min: u16,
    pub port_max: u16,
    pub max_flows: u32,
    pub xdp: XdpAttach,
}

impl Settings {
    pub fn config(&self) -> NatConfig {
        NatConfig {
            int_ifindex: self.int_index,
            ext_ifindex: self.ext_index,
            snat_addr: u32::from_ne_bytes(self.snat_addr.octets()),
            port_min: self.port_min,
            port_max: self.port_max,
        }
    }
}

/// Loads the object with `cfg` patched into its config global and the
/// conntrack maps sized for `max_flows`, and runs every program through
/// the verifier. Attaches nothing.
pub fn load(cfg: &NatConfig, max_flows: u32) -> Result<Ebpf> {
    if max_flows == 0 {
        bail!("the conntrack table needs room for at least one flow");
    }
    let mut ebpf = EbpfLoader::new()
        .override_global(GLOBAL_CONFIG, cfg, true)
        .map_max_entries(MAP_CT_FWD, max_flows)
        .map_max_entries(MAP_CT_REV, max_flows)
        .load(EBPF_OBJECT)
        .context("loading the eBPF object (maps and BTF)")?;
    for name in [PROG_XDP_INT, PROG_XDP_EXT] {
        let prog: &mut Xdp = program(&mut ebpf, name)?;
        prog.load()
            .with_context(|| format!("verifying program {name}"))?;
    }
    for name in [PROG_TC_INT, PROG_TC_EXT] {
        let prog: &mut SchedClassifier = program(&mut ebpf, name)?;
        prog.load()
            .with_context(|| format!("verifying program {name}"))?;
    }
    Ok(ebpf)
}

/// A program of the object by name and type.
pub fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .with_context(|| format!("program {name} missing from the eBPF object"))?
        .try_into()
        .with_context(|| format!("program {name} has an unexpected type"))
}

/// The attached dataplane and its maps.
pub struct Dataplane {
    // Dropping `ebpf` detaches every program attached through it.
    ebpf: Ebpf,
    pub ct_fwd: HashMap<MapData, CtKey, CtValue>,
    pub ct_rev: HashMap<MapData, CtKey, CtValue>,
    pub stats: PerCpuArray<MapData, u64>,
}

impl Dataplane {
    /// Loads and attaches: XDP and TCX ingress on both NICs. On any error
    /// everything attached so far is detached before it returns.
    pub fn start(s: &Settings) -> Result<Dataplane> {
        let mut ebpf = load(&s.config(), s.max_flows)?;
        // Outbound first: until the ext side is attached, translated flows'
        // replies would be dropped anyway, so order only matters for errors.
        attach_xdp(&mut ebpf, PROG_XDP_INT, &s.int, s.xdp)?;
        attach_tc(&mut ebpf, PROG_TC_INT, &s.int)?;
        attach_xdp(&mut ebpf, PROG_XDP_EXT, &s.ext, s.xdp)?;
        attach_tc(&mut ebpf, PROG_TC_EXT, &s.ext)?;
        let ct_fwd = take_map(&mut ebpf, MAP_CT_FWD)?;
        let ct_rev = take_map(&mut ebpf, MAP_CT_REV)?;
        let stats = take_map(&mut ebpf, MAP_STATS)?;
        Ok(Dataplane {
            ebpf,
            ct_fwd,
            ct_rev,
            stats,
        })
    }

    /// The kernel's id of program `name`: the health check looks for it
    /// among the programs the NICs report attached.
    pub fn program_id(&self, name: &str) -> Result<u32> {
        let prog = self
            .ebpf
            .program(name)
            .with_context(|| format!("program {name} missing from the eBPF object"))?;
        Ok(prog
            .info()
            .with_context(|| format!("program info of {name}"))?
            .id())
    }

    /// Detaches every program (also done on drop; this logs it).
    pub fn stop(self) {
        let names: Vec<String> = self.ebpf.programs().map(|(n, _)| n.to_string()).collect();
        drop(self);
        info!(programs = ?names, "detached all programs");
    }
}

/// Takes a map out of the object so the control plane can own it.
pub fn take_map<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("map {name} missing from the eBPF object"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

fn attach_xdp(ebpf: &mut Ebpf, name: &str, ifname: &str, mode: XdpAttach) -> Result<()> {
    let prog: &mut Xdp = program(ebpf, name)?;
    let hint = || {
        format!(
            "attaching XDP program {name} to {ifname} (is another XDP program attached? \
             `ip link show {ifname}` shows it)"
        )
    };
    let used = match mode {
        XdpAttach::Native => {
            prog.attach(ifname, XdpMode::Driver).with_context(hint)?;
            "native"
        }
        XdpAttach::Generic => {
            prog.attach(ifname, XdpMode::Skb).with_context(hint)?;
            "generic"
        }
        XdpAttach::Auto => match prog.attach(ifname, XdpMode::Driver) {
            Ok(_) => "native",
            Err(e) => {
                warn!(interface = ifname, error = %e, "native XDP unavailable, using generic mode");
                prog.attach(ifname, XdpMode::Skb).with_context(hint)?;
                "generic"
            }
        },
    };
    info!(
        program = name,
        interface = ifname,
        mode = used,
        "attached XDP"
    );
    Ok(())
}

fn attach_tc(ebpf: &mut Ebpf, name: &str, ifname: &str) -> Result<()> {
    let prog: &mut SchedClassifier = program(ebpf, name)?;
    // TCX links (kernel >= 6.6) need no qdisc, so there is nothing to
    // create or remove besides the link itself.
    prog.attach_with_options(
        ifname,
        TcAttachType::Ingress,
        TcAttachOptions::TcxOrder(LinkOrder::default()),
    )
    .with_context(|| {
        format!("attaching TC program {name} to {ifname} ingress (TCX needs kernel >= 6.6)")
    })?;
    info!(program = name, interface = ifname, "attached TCX ingress");
    Ok(())
}

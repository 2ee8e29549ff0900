//! Loading the eBPF object and attaching its programs. Everything attached is
//! owned by [`Dataplane`]: dropping it detaches every program (XDP and TCX
//! links), also when attaching fails half-way.

use std::net::Ipv4Addr;

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, ProgramArray},
    programs::{LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode, tc::TcAttachOptions},
};
use nat_common::{
    BindKey, BindValue, CtKey, CtValue, FILTER_ADDRESS, GLOBAL_CONFIG, MAP_ADF, MAP_BIND,
    MAP_BIND_REV, MAP_CT_FWD, MAP_STATS, MAP_TAILS, MAX_BINDINGS, NatConfig, PROG_TC_EXT,
    PROG_TC_HAIRPIN, PROG_TC_INT, PROG_XDP_EXT, PROG_XDP_INT, TAIL_HAIRPIN,
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
    pub low_port_min: u16,
    pub low_port_max: u16,
    /// One of nat_common's `FILTER_*`.
    pub filtering: u8,
    /// nat_common's `CFG_F_*` bits.
    pub flags: u8,
    pub probe_port: u16,
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
            low_port_min: self.low_port_min,
            low_port_max: self.low_port_max,
            filtering: self.filtering,
            flags: self.flags,
            probe_port: self.probe_port.to_be(),
        }
    }
}

/// Loads the object with `cfg` patched into its config global and the
/// conntrack maps sized for `max_flows` sessions, and runs every program
/// through the verifier. Attaches nothing.
pub fn load(cfg: &NatConfig, max_flows: u32) -> Result<Ebpf> {
    if max_flows == 0 {
        bail!("the conntrack table needs room for at least one flow");
    }
    // A binding needs at least one session, and there are at most as many
    // as there are external ports per protocol.
    let bindings = max_flows.min(MAX_BINDINGS);
    // Address-dependent filtering remembers one remote per session; the
    // other modes never touch the map.
    let adf = if cfg.filtering == FILTER_ADDRESS {
        max_flows
    } else {
        1
    };
    let mut ebpf = EbpfLoader::new()
        .override_global(GLOBAL_CONFIG, cfg, true)
        .map_max_entries(MAP_CT_FWD, max_flows)
        .map_max_entries(MAP_BIND, bindings)
        .map_max_entries(MAP_BIND_REV, bindings)
        .map_max_entries(MAP_ADF, adf)
        .load(EBPF_OBJECT)
        .context("loading the eBPF object (maps and BTF)")?;
    for name in [PROG_XDP_INT, PROG_XDP_EXT] {
        let prog: &mut Xdp = program(&mut ebpf, name)?;
        prog.load()
            .with_context(|| format!("verifying program {name}"))?;
    }
    for name in [PROG_TC_INT, PROG_TC_EXT, PROG_TC_HAIRPIN] {
        let prog: &mut SchedClassifier = program(&mut ebpf, name)?;
        prog.load()
            .with_context(|| format!("verifying program {name}"))?;
    }
    let hairpin = program::<SchedClassifier>(&mut ebpf, PROG_TC_HAIRPIN)?
        .fd()
        .context("hairpin program fd")?
        .try_clone()
        .context("duplicating the hairpin program fd")?;
    let mut tails: ProgramArray<_> = ProgramArray::try_from(
        ebpf.map_mut(MAP_TAILS)
            .with_context(|| format!("map {MAP_TAILS} missing from the eBPF object"))?,
    )
    .with_context(|| format!("map {MAP_TAILS} has an unexpected type"))?;
    tails
        .set(TAIL_HAIRPIN, &hairpin, 0)
        .context("filling the tail-call table")?;
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
    pub maps: CtMaps,
    pub stats: PerCpuArray<MapData, u64>,
}

/// The conntrack maps, as the control plane owns them.
pub struct CtMaps {
    pub sessions: HashMap<MapData, CtKey, CtValue>,
    pub bind: HashMap<MapData, BindKey, BindValue>,
    pub bind_rev: HashMap<MapData, BindKey, BindValue>,
    pub adf: HashMap<MapData, CtKey, u8>,
}

impl CtMaps {
    /// Takes the conntrack maps out of a loaded object.
    pub fn take(ebpf: &mut Ebpf) -> Result<CtMaps> {
        Ok(CtMaps {
            sessions: take_map(ebpf, MAP_CT_FWD)?,
            bind: take_map(ebpf, MAP_BIND)?,
            bind_rev: take_map(ebpf, MAP_BIND_REV)?,
            adf: take_map(ebpf, MAP_ADF)?,
        })
    }
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
        let maps = CtMaps::take(&mut ebpf)?;
        let stats = take_map(&mut ebpf, MAP_STATS)?;
        Ok(Dataplane { ebpf, maps, stats })
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

//! Loading the eBPF object and attaching its programs, through the pin
//! directory ([`crate::pins`]): the maps and the program links are pinned,
//! so the dataplane outlives this process. A start either adopts what is
//! pinned (same maps, this build's programs swapped into the links
//! atomically) or starts fresh. [`Dataplane::stop`] with
//! [`Exit::Teardown`] removes everything; [`Exit::KeepForwarding`] (and a
//! crash) leave the pinned dataplane forwarding for the next loader. A
//! fresh start that fails half-way removes what it created.

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, ProgramArray},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::FdLink,
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
    },
};
use nat_common::{
    BindExt, BindKey, BindValue, CtKey, CtValue, DEFAULT_MAX_FRAGMENTS, GLOBAL_CONFIG, MAP_ADF,
    MAP_BIND, MAP_BIND_REV, MAP_CT_FWD, MAP_FRAG_HELD, MAP_FRAG_TRACK, MAP_STATS, MAP_TAILS,
    MAP_XDP_EGRESS, NatConfig, PINNED_MAPS, PROG_TC_EXT, PROG_TC_INT, PROG_XDP_EXT, PROG_XDP_INT,
    TAIL_PROGRAMS, XdpEgress, frag_held_slots,
    stats::{HOOK_XDP_EXT, HOOK_XDP_INT},
};
use tracing::{info, warn};

use crate::{
    ebpf_object,
    pins::{self, LINK_TCX_EXT, LINK_TCX_INT, LINK_XDP_EXT, LINK_XDP_INT, PinDir},
    policy::PolicyMaps,
    pool::PoolMaps,
    program, refused, take_map,
};

/// How XDP is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpAttach {
    /// Native (driver) mode, falling back to generic mode where the driver
    /// has no XDP support.
    Auto,
    /// Native mode only.
    Native,
    /// Generic (skb) mode: works everywhere, slower.
    Generic,
}

/// What [`Dataplane::start`] attaches, and where.
pub struct Settings {
    pub ext: String,
    pub int: String,
    /// What the programs read: NICs, SNAT address, ports, filtering...
    pub nat: NatConfig,
    /// The SNAT pool's active addresses (those of an adopted pool that
    /// are not among them drain).
    pub pool: Vec<std::net::Ipv4Addr>,
    pub max_flows: u32,
    /// Fragmented datagrams tracked at once (`FRAG_TRACK` size).
    pub max_fragments: u32,
    pub xdp: XdpAttach,
    /// How each XDP program forwards until the health check has looked
    /// (`XDP_EGRESS_*`, index the XDP hook): what the NICs' features say
    /// for the attach mode asked for.
    pub xdp_egress: [u32; 2],
    /// The egress policy new flows are judged by.
    pub policy: nat_common::policy::Policy,
    /// Anti-spoofing: the prefixes new flows' sources must be in (checked
    /// when `nat` has `CFG_F_ANTI_SPOOFING`).
    pub inside_nets: Vec<(std::net::Ipv4Addr, u8)>,
}

/// Loads the object with `cfg` patched into its config global, the
/// conntrack maps sized for `max_flows` sessions and a pool of one
/// address, `cfg`'s SNAT address, and runs every program through the
/// verifier. Attaches nothing.
pub fn load(cfg: &NatConfig, max_flows: u32) -> Result<Ebpf> {
    let mut ebpf = load_with_pins(cfg, max_flows, DEFAULT_MAX_FRAGMENTS, None)?;
    set_pool(&mut ebpf, &[cfg.snat()])?;
    Ok(ebpf)
}

/// Makes `addrs` the active addresses of a loaded object's pool (its maps
/// stay in the object).
pub fn set_pool(ebpf: &mut Ebpf, addrs: &[std::net::Ipv4Addr]) -> Result<()> {
    use nat_common::{MAP_POOL, MAP_POOL_ADDRS, MAP_POOL_PAIR, POOL_MAX, PoolAddr, PoolInfo};
    fn array<'a, V: aya::Pod>(ebpf: &'a mut Ebpf, name: &str) -> Result<Array<&'a mut MapData, V>> {
        let map = ebpf
            .map_mut(name)
            .with_context(|| format!("map {name} missing from the eBPF object"))?;
        Array::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
    }
    let mut slots = array::<PoolAddr>(ebpf, MAP_POOL_ADDRS)?;
    let before: Vec<PoolAddr> = (0..POOL_MAX)
        .map(|i| slots.get(&i, 0))
        .collect::<Result<_, _>>()?;
    let after = crate::pool::plan(&before, addrs)?;
    for (i, v) in after.iter().enumerate() {
        slots.set(i as u32, *v, 0)?;
    }
    let mut pair = array::<u32>(ebpf, MAP_POOL_PAIR)?;
    for (b, slot) in crate::pool::pairing(&after).into_iter().enumerate() {
        pair.set(b as u32, slot, 0)?;
    }
    let mut info = array::<PoolInfo>(ebpf, MAP_POOL)?;
    info.set(0, crate::pool::info(&after, 1), 0)?;
    Ok(())
}

/// [`load`], with the maps taken from (or created and pinned in) `pins`:
/// the new programs are relocated against the pinned maps, so they share
/// the conntrack table with the programs they replace. The fragment
/// tracking table (`max_fragments` datagrams) is not pinned: it holds
/// datagrams in flight, which a restart merely makes the kernel discard.
pub fn load_with_pins(
    cfg: &NatConfig,
    max_flows: u32,
    max_fragments: u32,
    pins: Option<&PinDir>,
) -> Result<Ebpf> {
    if max_flows == 0 {
        bail!("the conntrack table needs room for at least one flow");
    }
    if max_fragments == 0 {
        bail!("the fragment tracking table needs room for at least one datagram");
    }
    let mut loader = EbpfLoader::new();
    loader.override_global(GLOBAL_CONFIG, cfg, true);
    for (name, entries) in pins::map_sizes(max_flows, cfg.filtering) {
        loader.map_max_entries(name, entries);
    }
    loader.map_max_entries(MAP_FRAG_TRACK, max_fragments);
    loader.map_max_entries(MAP_FRAG_HELD, frag_held_slots(max_fragments));
    if let Some(pins) = pins {
        for name in PINNED_MAPS {
            loader.map_pin_path(name, pins.pin(name));
        }
    }
    let mut ebpf = loader
        .load(ebpf_object()?)
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
    fill_tails(&mut ebpf)?;
    refused::load(&mut ebpf)?;
    Ok(ebpf)
}

/// Loads the tail-called programs and puts each in its slot of the
/// tail-call table.
fn fill_tails(ebpf: &mut Ebpf) -> Result<()> {
    for (slot, name) in TAIL_PROGRAMS {
        let prog: &mut SchedClassifier = program(ebpf, name)?;
        prog.load()
            .with_context(|| format!("verifying program {name}"))?;
        let fd = prog
            .fd()
            .with_context(|| format!("fd of program {name}"))?
            .try_clone()
            .with_context(|| format!("duplicating the fd of program {name}"))?;
        let mut tails: ProgramArray<_> = ProgramArray::try_from(
            ebpf.map_mut(MAP_TAILS)
                .with_context(|| format!("map {MAP_TAILS} missing from the eBPF object"))?,
        )
        .with_context(|| format!("map {MAP_TAILS} has an unexpected type"))?;
        tails
            .set(slot, &fd, 0)
            .with_context(|| format!("putting {name} in the tail-call table"))?;
    }
    Ok(())
}

/// How the loader leaves the dataplane when it exits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Detach every program and remove every pin (SIGTERM, SIGINT).
    Teardown,
    /// Leave the pinned programs attached and the maps pinned, for the next
    /// loader to adopt (SIGUSR2 handover, runtime errors).
    KeepForwarding,
}

/// The attached dataplane and its maps.
pub struct Dataplane {
    // Holds the programs; the pinned links keep them attached whether or
    // not this process holds them.
    ebpf: Ebpf,
    // Our own references to the four links: they stay attached while this
    // process runs even if their pins went.
    _links: Vec<FdLink>,
    pins: PinDir,
    /// Whether the maps were pinned by an earlier loader.
    pub adopted: bool,
    pub maps: CtMaps,
    pub pool: PoolMaps,
    pub stats: PerCpuArray<MapData, u64>,
    /// How each XDP program forwards, with its id (`XDP_EGRESS`).
    xdp_egress: Array<MapData, XdpEgress>,
    /// The XDP programs' ids, index the XDP hook.
    xdp_ids: [u32; 2],
    /// The egress policy and anti-spoofing maps (hot reload: `install`).
    pub policy: PolicyMaps,
}

/// The conntrack maps, as the control plane owns them.
pub struct CtMaps {
    pub sessions: HashMap<MapData, CtKey, CtValue>,
    pub bind: HashMap<MapData, BindKey, BindExt>,
    pub bind_rev: HashMap<MapData, BindKey, BindValue>,
    pub adf: HashMap<MapData, CtKey, u8>,
    /// The pool's slots: sessions and bindings name their address by slot.
    pub pool: Array<MapData, nat_common::PoolAddr>,
}

impl CtMaps {
    /// Opens the pinned conntrack maps again (see [`pinned_map`]).
    pub fn from_pins(pins: &PinDir) -> Result<CtMaps> {
        Ok(CtMaps {
            sessions: pinned_map(pins, MAP_CT_FWD)?,
            bind: pinned_map(pins, MAP_BIND)?,
            bind_rev: pinned_map(pins, MAP_BIND_REV)?,
            adf: pinned_map(pins, MAP_ADF)?,
            pool: pinned_map(pins, nat_common::MAP_POOL_ADDRS)?,
        })
    }

    /// Takes the conntrack maps out of a loaded object.
    pub fn take(ebpf: &mut Ebpf) -> Result<CtMaps> {
        Ok(CtMaps {
            sessions: take_map(ebpf, MAP_CT_FWD)?,
            bind: take_map(ebpf, MAP_BIND)?,
            bind_rev: take_map(ebpf, MAP_BIND_REV)?,
            adf: take_map(ebpf, MAP_ADF)?,
            pool: take_map(ebpf, nat_common::MAP_POOL_ADDRS)?,
        })
    }

    /// The pool's slots, as the dataplane sees them now.
    pub fn pool_slots(&self) -> Result<Vec<nat_common::PoolAddr>> {
        (0..nat_common::POOL_MAX)
            .map(|i| {
                self.pool
                    .get(&i, 0)
                    .with_context(|| format!("reading {}[{i}]", nat_common::MAP_POOL_ADDRS))
            })
            .collect()
    }
}

impl Dataplane {
    /// Loads and attaches: XDP and TCX ingress on both NICs, adopting the
    /// dataplane pinned in `pins` if there is one (its maps must fit, see
    /// [`PinDir::check_maps`]). On an error in a fresh start everything
    /// created so far is removed; when adopting, the pinned dataplane is
    /// left forwarding.
    pub fn start(s: &Settings, pins: &PinDir) -> Result<Dataplane> {
        let adopted = pins.check_maps(s.max_flows, s.nat.filtering)?;
        let result = Self::start_inner(s, pins, adopted);
        if result.is_err() && !adopted {
            // Nothing of an earlier dataplane existed: undo it all.
            if let Err(e) = pins.remove_all() {
                warn!(error = %format!("{e:#}"), "removing the half-built pin directory");
            }
        }
        result
    }

    fn start_inner(s: &Settings, pins: &PinDir, adopted: bool) -> Result<Dataplane> {
        let mut ebpf = load_with_pins(&s.nat, s.max_flows, s.max_fragments, Some(pins))?;
        // Before the programs see a packet: how they forward, and the ids
        // by which the tracing programs, attached next, know them.
        let xdp_ids = [
            loaded_id(&ebpf, PROG_XDP_INT)?,
            loaded_id(&ebpf, PROG_XDP_EXT)?,
        ];
        let mut xdp_egress: Array<MapData, XdpEgress> = take_map(&mut ebpf, MAP_XDP_EGRESS)?;
        // The pool before any program runs: a fresh one is empty.
        let mut pool = pool_maps(pins)?;
        let bind: HashMap<MapData, BindKey, BindExt> = pinned_map(pins, MAP_BIND)?;
        let keep = crate::pool::occupied(
            &crate::batch::entries(&bind).context("reading the bindings' inside halves")?,
        );
        pool.apply(&s.pool, &keep)?;
        pins.write_layout_version()?;
        for (hook, mode) in [HOOK_XDP_INT, HOOK_XDP_EXT].into_iter().zip(s.xdp_egress) {
            write_egress(&mut xdp_egress, &xdp_ids, hook, mode)?;
        }
        // And which new flows they may create.
        let mut policy = PolicyMaps::take(&mut ebpf)?;
        policy.set_inside_nets(&s.inside_nets)?;
        policy.install(&s.policy)?;
        refused::attach(&mut ebpf).context("counting refused XDP redirects")?;
        let mut links = Vec::new();
        // Outbound first: until the ext side is attached, translated flows'
        // replies would be dropped anyway, so order only matters for errors.
        for (prog, link, ifname, ifindex, xdp) in [
            (PROG_XDP_INT, LINK_XDP_INT, &s.int, s.nat.int_ifindex, true),
            (PROG_TC_INT, LINK_TCX_INT, &s.int, s.nat.int_ifindex, false),
            (PROG_XDP_EXT, LINK_XDP_EXT, &s.ext, s.nat.ext_ifindex, true),
            (PROG_TC_EXT, LINK_TCX_EXT, &s.ext, s.nat.ext_ifindex, false),
        ] {
            let pinned = pins.adopt_link(link, ifindex)?;
            let fd_link = match (pinned, xdp) {
                (Some(l), true) => replace_xdp(&mut ebpf, prog, ifname, l)?,
                (Some(l), false) => replace_tc(&mut ebpf, prog, ifname, l)?,
                (None, true) => {
                    let l = attach_xdp(&mut ebpf, prog, ifname, s.xdp)?;
                    pin_link(l, pins, link)?
                }
                (None, false) => {
                    let l = attach_tc(&mut ebpf, prog, ifname)?;
                    pin_link(l, pins, link)?
                }
            };
            links.push(fd_link);
        }
        let maps = CtMaps::take(&mut ebpf)?;
        let stats = take_map(&mut ebpf, MAP_STATS)?;
        Ok(Dataplane {
            ebpf,
            _links: links,
            pins: pins.clone(),
            adopted,
            maps,
            pool,
            stats,
            xdp_egress,
            xdp_ids,
            policy,
        })
    }

    /// The loaded object, e.g. to take a map that only this loader uses
    /// (the translation log's ring buffer).
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Tells XDP program `hook` how to forward (`XDP_EGRESS_*`).
    pub fn set_xdp_egress(&mut self, hook: u32, mode: u32) -> Result<()> {
        write_egress(&mut self.xdp_egress, &self.xdp_ids, hook, mode)
    }

    /// The kernel's id of program `name`: the health check looks for it
    /// among the programs the NICs report attached (after an adoption,
    /// this loader's programs are the ones in the links).
    pub fn program_id(&self, name: &str) -> Result<u32> {
        loaded_id(&self.ebpf, name)
    }

    /// Exits as `how` says. With [`Exit::Teardown`] the link pins go first
    /// (closing the last reference detaches each program), then the maps
    /// and the directory.
    pub fn stop(self, how: Exit) -> Result<()> {
        let names: Vec<String> = self.ebpf.programs().map(|(n, _)| n.to_string()).collect();
        let pins = self.pins.clone();
        drop(self);
        match how {
            Exit::KeepForwarding => {
                info!(programs = ?names, pins = %pins.path().display(),
                    "left the pinned dataplane attached and forwarding");
                Ok(())
            }
            Exit::Teardown => {
                pins.remove_all()?;
                info!(programs = ?names, pins = %pins.path().display(),
                    "detached all programs and removed the pins");
                Ok(())
            }
        }
    }
}

/// The kernel's id of the loaded program `name`.
fn loaded_id(ebpf: &Ebpf, name: &str) -> Result<u32> {
    let prog = ebpf
        .program(name)
        .with_context(|| format!("program {name} missing from the eBPF object"))?;
    Ok(prog
        .info()
        .with_context(|| format!("program info of {name}"))?
        .id())
}

fn write_egress(
    map: &mut Array<MapData, XdpEgress>,
    ids: &[u32; 2],
    hook: u32,
    mode: u32,
) -> Result<()> {
    let prog_id = *ids
        .get(hook as usize)
        .with_context(|| format!("no XDP program at hook {hook}"))?;
    map.set(hook, XdpEgress { mode, prog_id }, 0)
        .with_context(|| format!("writing {MAP_XDP_EGRESS}[{hook}]"))
}

fn pin_link(link: FdLink, pins: &PinDir, name: &str) -> Result<FdLink> {
    let path = pins.pin(name);
    let pinned = link
        .pin(&path)
        .with_context(|| format!("pinning the link at {}", path.display()))?;
    Ok(pinned.into())
}

fn replace_xdp(ebpf: &mut Ebpf, name: &str, ifname: &str, link: FdLink) -> Result<FdLink> {
    let prog: &mut Xdp = program(ebpf, name)?;
    let link = XdpLink::try_from(link).context("the pinned XDP link is not an XDP link")?;
    let id = prog
        .attach_to_link(link)
        .with_context(|| format!("replacing the program of the pinned XDP link on {ifname}"))?;
    let link = prog.take_link(id)?;
    info!(
        program = name,
        interface = ifname,
        "replaced the program of the pinned XDP link"
    );
    FdLink::try_from(link).context("the XDP link is not an fd link")
}

fn replace_tc(ebpf: &mut Ebpf, name: &str, ifname: &str, link: FdLink) -> Result<FdLink> {
    let prog: &mut SchedClassifier = program(ebpf, name)?;
    let link =
        SchedClassifierLink::try_from(link).context("the pinned TCX link is not a TCX link")?;
    let id = prog
        .attach_to_link(link)
        .with_context(|| format!("replacing the program of the pinned TCX link on {ifname}"))?;
    let link = prog.take_link(id)?;
    info!(
        program = name,
        interface = ifname,
        "replaced the program of the pinned TCX link"
    );
    FdLink::try_from(link).context("the TCX link is not an fd link")
}

/// Opens the SNAT pool's pinned maps.
pub fn pool_maps(pins: &PinDir) -> Result<PoolMaps> {
    Ok(PoolMaps {
        info: pinned_map(pins, nat_common::MAP_POOL)?,
        addrs: pinned_map(pins, nat_common::MAP_POOL_ADDRS)?,
        pair: pinned_map(pins, nat_common::MAP_POOL_PAIR)?,
    })
}

/// Opens the pinned map `name` in `pins`: a handle of its own, e.g. for a
/// thread that works on the maps beside the one that loaded them.
pub fn pinned_map<T>(pins: &PinDir, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let path = pins.pin(name);
    let data = aya::maps::MapData::from_pin(&path)
        .with_context(|| format!("opening the pinned map {}", path.display()))?;
    let map = aya::maps::Map::from_map_data(data)
        .with_context(|| format!("pinned map {} has an unknown type", path.display()))?;
    T::try_from(map)
        .with_context(|| format!("pinned map {} has an unexpected type", path.display()))
}

fn attach_xdp(ebpf: &mut Ebpf, name: &str, ifname: &str, mode: XdpAttach) -> Result<FdLink> {
    let prog: &mut Xdp = program(ebpf, name)?;
    let hint = || {
        format!(
            "attaching XDP program {name} to {ifname} (is another XDP program attached? \
             `ip link show {ifname}` shows it)"
        )
    };
    let (id, used) = match mode {
        XdpAttach::Native => (
            prog.attach(ifname, XdpMode::Driver).with_context(hint)?,
            "native",
        ),
        XdpAttach::Generic => (
            prog.attach(ifname, XdpMode::Skb).with_context(hint)?,
            "generic",
        ),
        XdpAttach::Auto => match prog.attach(ifname, XdpMode::Driver) {
            Ok(id) => (id, "native"),
            Err(e) => {
                warn!(interface = ifname, error = %e, "native XDP unavailable, using generic mode");
                (
                    prog.attach(ifname, XdpMode::Skb).with_context(hint)?,
                    "generic",
                )
            }
        },
    };
    let link = prog.take_link(id)?;
    info!(
        program = name,
        interface = ifname,
        mode = used,
        "attached XDP"
    );
    // Pinnable only as a bpf_link (kernel >= 5.9), which aya uses there.
    FdLink::try_from(link)
        .context("XDP was attached through netlink, not as a BPF link (kernel >= 5.9 needed)")
}

fn attach_tc(ebpf: &mut Ebpf, name: &str, ifname: &str) -> Result<FdLink> {
    let prog: &mut SchedClassifier = program(ebpf, name)?;
    // TCX links (kernel >= 6.6) need no qdisc, so there is nothing to
    // create or remove besides the link itself.
    let id = prog
        .attach_with_options(
            ifname,
            TcAttachType::Ingress,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .with_context(|| {
            format!("attaching TC program {name} to {ifname} ingress (TCX needs kernel >= 6.6)")
        })?;
    let link = prog.take_link(id)?;
    info!(program = name, interface = ifname, "attached TCX ingress");
    FdLink::try_from(link).context("the TCX link is not an fd link")
}

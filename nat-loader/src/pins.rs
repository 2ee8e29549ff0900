//! The pin directory: what lets the dataplane outlive the loader process.
//!
//! The conntrack and stats maps and the four program links are pinned in
//! one directory of a BPF file system (`--bpffs-dir`, default
//! [`DEFAULT_DIR`]). While the pins exist the kernel keeps the programs
//! attached and the maps alive, whether or not a loader runs: a crash or a
//! SIGKILL of the loader does not stop forwarding, and the next loader
//! adopts the maps and swaps its own programs into the pinned links
//! (`BPF_LINK_UPDATE`, atomic: there is no moment without a program).
//!
//! Besides the pins the directory holds one symlink, [`SYSCTL_RECORD`],
//! whose target text records the sysctl values from before the first
//! loader changed them (bpffs holds no regular files, but it does hold
//! symlinks, and a symlink's target is any text). A later loader keeps that
//! record, so the final teardown restores the true originals rather than
//! the "1" an earlier loader left behind.

use std::{
    fs, io,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use aya::{
    maps::{MapInfo, MapType},
    programs::links::{FdLink, PinnedLink},
};
use nat_common::{
    BindExt, BindKey, BindValue, CtKey, CtValue, FILTER_ADDRESS, LAYOUT_VERSION, MAP_ADF, MAP_BIND,
    MAP_BIND_REV, MAP_CT_FWD, MAP_POOL, MAP_POOL_ADDRS, MAP_POOL_PAIR, MAP_STATS, MAX_BINDINGS,
    PAIR_BUCKETS, POOL_MAX, PoolAddr, PoolInfo,
};
use tracing::{info, warn};

use crate::{mounts, sys};

/// Default `--bpffs-dir`.
pub const DEFAULT_DIR: &str = "/sys/fs/bpf/nat-gateway";
/// Where bpffs is conventionally mounted; the loader mounts it there if
/// nothing is, when the pin directory is below it.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";
/// statfs magic of a BPF file system.
pub const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Name of the symlink holding the original sysctl values (bpffs refuses
/// names with a dot).
pub const SYSCTL_RECORD: &str = "sysctl_originals";
/// Name of the symlink holding the [`LAYOUT_VERSION`] of the pinned maps.
pub const LAYOUT_RECORD: &str = "layout_version";

/// The pinned links, one per program: (pin name, program).
pub const LINK_XDP_INT: &str = "link_xdp_int";
pub const LINK_XDP_EXT: &str = "link_xdp_ext";
pub const LINK_TCX_INT: &str = "link_tcx_int";
pub const LINK_TCX_EXT: &str = "link_tcx_ext";
pub const LINKS: [&str; 4] = [LINK_XDP_INT, LINK_TCX_INT, LINK_XDP_EXT, LINK_TCX_EXT];

/// The size of each conntrack map for a table of `max_flows` sessions
/// with filtering mode `filtering` (`FILTER_*`): what the loader creates
/// them with, and what a pinned map must have to be adopted.
pub fn map_sizes(max_flows: u32, filtering: u8) -> [(&'static str, u32); 4] {
    // A binding needs at least one session, and there are at most as many
    // as there are external ports per protocol.
    let bindings = max_flows.min(MAX_BINDINGS);
    // One remote per session at most, allocated on demand; but its hash
    // buckets (16 bytes per entry of the size) are allocated up front, so
    // it has room only where `--filtering address-dependent` fills it.
    let remotes = if filtering == FILTER_ADDRESS {
        max_flows
    } else {
        1
    };
    [
        (MAP_CT_FWD, max_flows),
        (MAP_BIND, bindings),
        (MAP_BIND_REV, bindings),
        (MAP_ADF, remotes),
    ]
}

/// A pin directory on a BPF file system.
#[derive(Clone, Debug)]
pub struct PinDir {
    path: PathBuf,
}

/// The pin directory's lock; released on drop or exit.
pub struct DirLock {
    _dir: fs::File,
}

/// What a map must look like to be adopted.
struct MapShape {
    name: &'static str,
    map_type: MapType,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

impl PinDir {
    pub fn new(path: impl Into<PathBuf>) -> PinDir {
        PinDir { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pin path of a map or link named `name`.
    pub fn pin(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    pub fn exists(&self) -> bool {
        self.path.is_dir()
    }

    /// Whether a conntrack map is pinned (the sign of a dataplane to
    /// adopt).
    pub fn has_maps(&self) -> bool {
        [MAP_CT_FWD, MAP_BIND, MAP_BIND_REV]
            .iter()
            .any(|m| self.pin(m).exists())
    }

    /// Makes sure the directory exists on a BPF file system: mounts bpffs
    /// at /sys/fs/bpf when the directory is below it and nothing is mounted
    /// there, then creates the directory.
    pub fn prepare(&self) -> Result<()> {
        if !self.path.is_absolute() {
            bail!(
                "--bpffs-dir {} must be an absolute path",
                self.path.display()
            );
        }
        let root = Path::new(BPFFS_ROOT);
        if self.path.starts_with(root) && root.is_dir() && !is_bpffs(root)? {
            mount_bpffs(root)?;
            info!(path = BPFFS_ROOT, "mounted a BPF file system");
            if private_mount_namespace() {
                warn!(
                    path = BPFFS_ROOT,
                    "this process has its own mount namespace (ip netns exec?): the pins vanish \
                     with it, so a crash or handover loses the dataplane; pass a --bpffs-dir on a \
                     BPF file system of the host"
                );
            }
        }
        let parent = self.path.parent().unwrap_or(root);
        let anchor = existing_ancestor(parent);
        if !is_bpffs(&anchor)? {
            bail!(
                "--bpffs-dir {}: {} is not on a BPF file system (mount one: mount -t bpf bpf DIR)",
                self.path.display(),
                anchor.display()
            );
        }
        fs::create_dir_all(&self.path)
            .with_context(|| format!("creating the pin directory {}", self.path.display()))?;
        Ok(())
    }

    /// Takes the directory's lock (`flock`), held until the returned guard
    /// is dropped or the process ends, however it ends. Two loaders must
    /// never drive one dataplane (the second's SIGTERM would remove the
    /// first's), and teardown must not pull pins from under a live loader.
    pub fn lock(&self) -> Result<DirLock> {
        let dir = fs::File::open(&self.path)
            .with_context(|| format!("opening the pin directory {}", self.path.display()))?;
        // SAFETY: flock on an fd we own.
        let rc = unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&dir),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                bail!(
                    "another nat-loader is running with --bpffs-dir {} (stop it with SIGTERM, \
                     or hand over with SIGUSR2, first)",
                    self.path.display()
                );
            }
            return Err(e).with_context(|| format!("locking {}", self.path.display()));
        }
        Ok(DirLock { _dir: dir })
    }

    /// Checks that the pinned conntrack maps, if any, fit this build and
    /// these flags. `Ok(true)`: both are pinned and fit (adopt them);
    /// `Ok(false)`: none is pinned (start fresh). Anything else is an error
    /// that names the difference and the way out, and changes nothing.
    ///
    /// The counters are not worth refusing an upgrade for (a new build may
    /// well count one more reason): a pinned `STATS` of another shape is
    /// unpinned, with a warning, and the new programs get a fresh one.
    pub fn check_maps(&self, max_flows: u32, filtering: u8) -> Result<bool> {
        self.check(max_flows, filtering, true)
    }

    /// [`Self::check_maps`] without changing anything (a pinned `STATS`
    /// of another shape is left where it is): whether a loader with these
    /// flags could adopt what is pinned.
    pub fn can_adopt(&self, max_flows: u32, filtering: u8) -> Result<bool> {
        self.check(max_flows, filtering, false)
    }

    fn check(&self, max_flows: u32, filtering: u8, fix_stats: bool) -> Result<bool> {
        let sizes = map_sizes(max_flows, filtering);
        let entries = |name: &str| {
            sizes
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, e)| *e)
                .unwrap_or(max_flows)
        };
        let shape = |name: &'static str, key_size: usize, value_size: usize| MapShape {
            name,
            map_type: MapType::Hash,
            key_size: key_size as u32,
            value_size: value_size as u32,
            max_entries: entries(name),
        };
        let array = |name: &'static str, value_size: usize, max_entries: u32| MapShape {
            name,
            map_type: MapType::Array,
            key_size: 4,
            value_size: value_size as u32,
            max_entries,
        };
        let shapes = [
            shape(MAP_CT_FWD, size_of::<CtKey>(), size_of::<CtValue>()),
            shape(MAP_BIND, size_of::<BindKey>(), size_of::<BindExt>()),
            shape(MAP_BIND_REV, size_of::<BindKey>(), size_of::<BindValue>()),
            shape(MAP_ADF, size_of::<CtKey>(), size_of::<u8>()),
            array(MAP_POOL, size_of::<PoolInfo>(), 1),
            array(MAP_POOL_ADDRS, size_of::<PoolAddr>(), POOL_MAX),
            array(MAP_POOL_PAIR, size_of::<u32>(), PAIR_BUCKETS),
        ];
        let pinned: Vec<bool> = shapes.iter().map(|s| self.pin(s.name).exists()).collect();
        if !self.has_maps() {
            return Ok(false);
        }
        let fix = format!(
            "run `nat-loader teardown --ext .. --int .. --bpffs-dir {}` to remove the old dataplane \
             (its flows are lost), or start with flags that match it",
            self.path.display()
        );
        let version = self.layout_version()?;
        if version != Some(LAYOUT_VERSION) {
            let found = match version {
                Some(v) => format!("layout version {v}"),
                None => "no layout version (a build from before layout versions)".to_string(),
            };
            bail!(
                "cannot adopt the pinned dataplane in {}: its maps have {found}, this build \
                 uses layout version {LAYOUT_VERSION}; a restart keeping flows is impossible \
                 across a layout change: run `nat-loader teardown --ext .. --int .. \
                 --bpffs-dir {}` (its flows are lost) and start again",
                self.path.display(),
                self.path.display()
            );
        }
        for (shape, pinned) in shapes.iter().zip(pinned) {
            if !pinned {
                bail!(
                    "the pinned dataplane in {} is incomplete: map {} is missing; {fix}",
                    self.path.display(),
                    shape.name
                );
            }
            let diffs = self.shape_differences(shape)?;
            if !diffs.is_empty() {
                bail!(
                    "cannot adopt the pinned map {}: {}; {fix}",
                    self.pin(shape.name).display(),
                    diffs.join(", ")
                );
            }
        }
        let stats = MapShape {
            name: MAP_STATS,
            map_type: MapType::PerCpuArray,
            key_size: 4,
            value_size: 8,
            max_entries: nat_common::stats::SLOTS,
        };
        if fix_stats && self.pin(MAP_STATS).exists() {
            let diffs = self.shape_differences(&stats)?;
            if !diffs.is_empty() {
                warn!(
                    differences = %diffs.join(", "),
                    "the pinned counters have another layout; they start again from zero"
                );
                self.remove_pin(MAP_STATS)?;
            }
        }
        Ok(true)
    }

    /// How the pinned map `shape.name` differs from `shape` (empty: not).
    fn shape_differences(&self, shape: &MapShape) -> Result<Vec<String>> {
        let path = self.pin(shape.name);
        let info = MapInfo::from_pin(&path)
            .with_context(|| format!("opening the pinned map {}", path.display()))?;
        let map_type = info
            .map_type()
            .with_context(|| format!("type of the pinned map {}", path.display()))?;
        let mut diffs = Vec::new();
        if map_type != shape.map_type {
            diffs.push(format!("type {map_type:?}, expected {:?}", shape.map_type));
        }
        if info.key_size() != shape.key_size {
            diffs.push(format!(
                "key size {}, expected {}",
                info.key_size(),
                shape.key_size
            ));
        }
        if info.value_size() != shape.value_size {
            diffs.push(format!(
                "value size {}, expected {}",
                info.value_size(),
                shape.value_size
            ));
        }
        if info.max_entries() != shape.max_entries {
            let hint = if shape.name == MAP_STATS {
                ""
            } else {
                " (--max-flows)"
            };
            let hint = if shape.name == MAP_ADF {
                " (--max-flows, --filtering)"
            } else {
                hint
            };
            diffs.push(format!(
                "{} entries{hint}, expected {}",
                info.max_entries(),
                shape.max_entries
            ));
        }
        Ok(diffs)
    }

    /// Removes the pin `name` if it exists (a link pin detaches its link
    /// once no process holds it).
    pub fn remove_pin(&self, name: &str) -> Result<()> {
        let path = self.pin(name);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }

    /// Opens the pinned link `name` if it is still attached to `ifindex`.
    /// A link that is attached elsewhere, or to nothing (its interface was
    /// deleted), is unpinned, which detaches it: the caller attaches afresh.
    pub fn adopt_link(&self, name: &str, ifindex: u32) -> Result<Option<FdLink>> {
        let path = self.pin(name);
        if !path.exists() {
            return Ok(None);
        }
        let on = link_ifindex(&path)
            .with_context(|| format!("reading the pinned link {}", path.display()))?;
        let link = PinnedLink::from_pin(&path)
            .with_context(|| format!("opening the pinned link {}", path.display()))?;
        if on != ifindex {
            warn!(
                link = name,
                pinned_ifindex = on,
                ifindex,
                "pinned link is not attached to this interface (recreated or renamed?); replacing it"
            );
            drop(
                link.unpin()
                    .with_context(|| format!("unpinning {}", path.display()))?,
            );
            return Ok(None);
        }
        Ok(Some(link.into()))
    }

    /// The layout version recorded with the maps (`None`: no record).
    pub fn layout_version(&self) -> Result<Option<u32>> {
        let path = self.pin(LAYOUT_RECORD);
        match fs::read_link(&path) {
            Ok(t) => {
                let text = String::from_utf8_lossy(t.as_os_str().as_bytes()).into_owned();
                text.trim()
                    .parse()
                    .map(Some)
                    .with_context(|| format!("{}: not a layout version: {text:?}", path.display()))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Records this build's [`LAYOUT_VERSION`] beside the maps.
    pub fn write_layout_version(&self) -> Result<()> {
        if self.layout_version()? == Some(LAYOUT_VERSION) {
            return Ok(());
        }
        let path = self.pin(LAYOUT_RECORD);
        let _ = fs::remove_file(&path);
        std::os::unix::fs::symlink(LAYOUT_VERSION.to_string(), &path)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Reads the recorded original sysctl values (path below /proc/sys,
    /// value); empty if nothing is recorded.
    pub fn sysctl_record(&self) -> Result<Vec<(String, String)>> {
        let path = self.pin(SYSCTL_RECORD);
        let target = match fs::read_link(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let text = String::from_utf8_lossy(target.as_os_str().as_bytes()).into_owned();
        Ok(parse_record(&text))
    }

    /// Replaces the record of original sysctl values.
    pub fn write_sysctl_record(&self, record: &[(String, String)]) -> Result<()> {
        let path = self.pin(SYSCTL_RECORD);
        let tmp = self.pin(&format!("{SYSCTL_RECORD}_new"));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(format_record(record), &tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// Removes every pin and the record, then the directory. Links first,
    /// so the programs are detached before their maps go. Missing entries
    /// are fine (idempotent). Returns what it removed.
    pub fn remove_all(&self) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        if !self.exists() {
            return Ok(removed);
        }
        for name in LINKS {
            let path = self.pin(name);
            if !path.exists() {
                continue;
            }
            // Unpinning drops the last reference unless a running loader
            // still holds the link; closing our fd then detaches it.
            match PinnedLink::from_pin(&path) {
                Ok(link) => drop(
                    link.unpin()
                        .with_context(|| format!("unpinning {}", path.display()))?,
                ),
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "not a link; removing the pin");
                    fs::remove_file(&path)
                        .with_context(|| format!("removing {}", path.display()))?;
                }
            }
            removed.push(name.to_string());
        }
        let entries =
            fs::read_dir(&self.path).with_context(|| format!("listing {}", self.path.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("listing {}", self.path.display()))?;
            let path = entry.path();
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            removed.push(entry.file_name().to_string_lossy().into_owned());
        }
        fs::remove_dir(&self.path)
            .with_context(|| format!("removing the pin directory {}", self.path.display()))?;
        Ok(removed)
    }
}

fn parse_record(text: &str) -> Vec<(String, String)> {
    // One `path=value` per line; interface names cannot hold whitespace,
    // and the value is the part after the last '='.
    text.lines()
        .filter_map(|l| l.rsplit_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn format_record(record: &[(String, String)]) -> String {
    record
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn existing_ancestor(p: &Path) -> PathBuf {
    let mut p = p.to_path_buf();
    while !p.exists() {
        match p.parent() {
            Some(up) => p = up.to_path_buf(),
            None => break,
        }
    }
    p
}

/// Whether `path` is on a BPF file system.
pub fn is_bpffs(path: &Path) -> Result<bool> {
    Ok(mounts::magic(path)? == BPF_FS_MAGIC)
}

fn private_mount_namespace() -> bool {
    match (
        fs::read_link("/proc/self/ns/mnt"),
        fs::read_link("/proc/1/ns/mnt"),
    ) {
        (Ok(a), Ok(b)) => a != b,
        _ => false,
    }
}

fn mount_bpffs(at: &Path) -> Result<()> {
    mounts::mount(c"bpf", at).context("mounting a BPF file system")
}

// The link's interface is in `bpf_link_info`'s union, which aya 0.14 does
// not expose; two plain bpf(2) calls read it.
const BPF_LINK_TYPE_XDP: u32 = 6;
const BPF_LINK_TYPE_TCX: u32 = 11;

#[repr(C)]
#[derive(Default)]
struct InfoByFdAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `bpf_link_info`: type, id, prog_id, then (8-aligned) the per-type
/// union, whose first field is the ifindex for both XDP and TCX links.
#[repr(C, align(8))]
struct LinkInfoRaw {
    link_type: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    union_: [u8; 64],
}

/// The interface a pinned XDP or TCX link is attached to (0: none any
/// more, its interface is gone).
pub fn link_ifindex(pin: &Path) -> Result<u32> {
    Ok(link_info(pin)?.1)
}

/// (program id, ifindex) of a pinned XDP or TCX link.
pub fn link_info(pin: &Path) -> Result<(u32, u32)> {
    let fd = sys::obj_get(pin, 0).with_context(|| format!("BPF_OBJ_GET {}", pin.display()))?;
    let mut info = LinkInfoRaw {
        link_type: 0,
        id: 0,
        prog_id: 0,
        _pad: 0,
        union_: [0; 64],
    };
    let mut attr = InfoByFdAttr {
        bpf_fd: std::os::fd::AsRawFd::as_raw_fd(&fd) as u32,
        info_len: size_of::<LinkInfoRaw>() as u32,
        info: (&mut info as *mut LinkInfoRaw) as u64,
    };
    sys::bpf(sys::BPF_OBJ_GET_INFO_BY_FD, &mut attr)
        .with_context(|| format!("BPF_OBJ_GET_INFO_BY_FD {}", pin.display()))?;
    if info.link_type != BPF_LINK_TYPE_XDP && info.link_type != BPF_LINK_TYPE_TCX {
        bail!(
            "{} is a BPF link of type {}, not XDP or TCX",
            pin.display(),
            info.link_type
        );
    }
    let ifindex = u32::from_ne_bytes([
        info.union_[0],
        info.union_[1],
        info.union_[2],
        info.union_[3],
    ]);
    Ok((info.prog_id, ifindex))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysctl_record_round_trips_and_splits_on_the_last_equals_sign() {
        let rec = vec![
            ("net/ipv4/ip_forward".to_string(), "0".to_string()),
            (
                "net/ipv4/conf/we=ird/forwarding".to_string(),
                "1".to_string(),
            ),
        ];
        assert_eq!(parse_record(&format_record(&rec)), rec);
        assert!(parse_record("").is_empty());
    }
}

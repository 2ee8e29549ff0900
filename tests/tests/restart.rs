//! Restart and upgrade without losing flows: the maps and program links are
//! pinned, so the dataplane forwards while no loader runs, and a new loader
//! (the same binary or another build) adopts it. Each test has its own
//! bpffs ([`Bpffs`]) so tests in parallel never share pins, and a lab
//! whose `nat` starts with forwarding off, so the tests can see that the
//! final exit restores the true original.

use std::{
    net::SocketAddrV4,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::programs::{SchedClassifier, TcAttachType};
use nat_common::{MAP_STATS, PINNED_MAPS};
use nat_lab::{
    Bpffs, EXT_IF, EchoStreams, Flow, Gateway, Host, INT_IF, Lab, LabOptions, SERVER_IP,
    StreamReport, flags, lab_with, loader_path, run_loader, tcp_transfer,
};

const STREAMS: usize = 20;

fn server(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(SERVER_IP, port)
}

fn loader_args(pins: &Path) -> Vec<String> {
    vec![
        "--stats-interval".into(),
        "0".into(),
        "--bpffs-dir".into(),
        pins.display().to_string(),
    ]
}

/// A second loader on the lab's NICs with pin dir `pins`, run to its end
/// (it is refused): whether it exited 0, and its stderr.
fn second_loader(lab: &Lab, pins: &Path, extra: &[&str]) -> (bool, String) {
    let mut args: Vec<String> = ["--int", INT_IF, "--ext", EXT_IF].map(String::from).into();
    args.extend(extra.iter().map(|a| a.to_string()));
    args.extend(loader_args(pins));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_loader(lab, &[], &args).expect("running a second loader")
}

/// What most tests here begin with: a bpffs of their own, the lab, and a
/// loader started with `extra` that pins into the bpffs.
fn pinned(extra: &[&str]) -> (Bpffs, PathBuf, Lab, Gateway) {
    let bpffs = Bpffs::new().expect("mounting a bpffs for the pins");
    let pins = bpffs.pin_dir();
    let lab = lab_with(LabOptions::nat_forwarding_off());
    let gw = start(&lab, &pins, extra);
    (bpffs, pins, lab, gw)
}

fn start(lab: &Lab, pins: &Path, extra: &[&str]) -> Gateway {
    start_with(lab, &loader_path().expect("loader binary"), pins, extra)
}

fn start_with(lab: &Lab, bin: &Path, pins: &Path, extra: &[&str]) -> Gateway {
    let mut a = loader_args(pins);
    a.extend(extra.iter().map(|s| s.to_string()));
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    Gateway::start_bin(lab, bin, &a).expect("starting nat-loader")
}

/// What is attached to `ifname` in `nat`: the XDP program id (if any) and
/// the TCX ingress program ids.
fn attached(lab: &Lab, ifname: &str) -> (Option<u32>, Vec<u32>) {
    let out = lab
        .exec(Host::Nat, &["ip", "-d", "link", "show", ifname])
        .expect("ip link");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    // "prog/xdp id 42" (native) or "prog/xdpgeneric id 42".
    let xdp = text.split("prog/xdp").nth(1).and_then(|rest| {
        rest.split_whitespace()
            .skip_while(|w| *w != "id")
            .nth(1)
            .and_then(|n| n.parse().ok())
    });
    let name = ifname.to_string();
    let tcx = lab
        .in_ns(Host::Nat, move || {
            SchedClassifier::query_tcx(&name, TcAttachType::Ingress)
                .map(|(_, progs)| progs.iter().map(|p| p.id()).collect::<Vec<u32>>())
                .expect("querying TCX")
        })
        .expect("in nat");
    (xdp, tcx)
}

/// Program ids on both NICs: [xdp int, tcx int, xdp ext, tcx ext].
fn program_ids(lab: &Lab) -> Vec<u32> {
    let mut ids = Vec::new();
    for ifname in [INT_IF, EXT_IF] {
        let (xdp, tcx) = attached(lab, ifname);
        ids.push(xdp.unwrap_or_else(|| panic!("no XDP program on {ifname}")));
        assert_eq!(tcx.len(), 1, "TCX programs on {ifname}: {tcx:?}");
        ids.push(tcx[0]);
    }
    ids
}

fn assert_nothing_attached(lab: &Lab) {
    for ifname in [INT_IF, EXT_IF] {
        assert_eq!(
            attached(lab, ifname),
            (None, vec![]),
            "programs left on {ifname}"
        );
    }
}

fn pins_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn assert_pinned_dataplane(dir: &Path) {
    let names = pins_in(dir);
    let links = [
        "link_xdp_int",
        "link_xdp_ext",
        "link_tcx_int",
        "link_tcx_ext",
    ];
    for want in PINNED_MAPS.into_iter().chain(links) {
        assert!(
            names.iter().any(|n| n == want),
            "{want} not pinned in {}: {names:?}",
            dir.display()
        );
    }
}

fn ip_forward(lab: &Lab) -> String {
    lab.read_sysctl(Host::Nat, "net/ipv4/ip_forward")
        .expect("reading ip_forward")
}

/// Asserts every stream ran to the end with intact data; prints and
/// returns the longest pause any stream saw.
fn report(what: &str, reports: &[StreamReport]) -> Duration {
    let broken: Vec<&StreamReport> = reports.iter().filter(|r| r.error.is_some()).collect();
    assert!(broken.is_empty(), "{what}: streams broke: {broken:#?}");
    assert_eq!(reports.len(), STREAMS);
    let worst = reports
        .iter()
        .max_by_key(|r| r.max_gap)
        .expect("some streams");
    let worst_rtt = reports.iter().map(|r| r.max_rtt).max().unwrap_or_default();
    let total: u64 = reports.iter().map(|r| r.round_trips).sum();
    eprintln!(
        "{what}: {} streams, {total} verified round trips, all intact; longest pause between \
         round trips {:?} (stream {}, includes the 10 ms pacing); longest single round trip \
         {worst_rtt:?}; longest pause per stream (ms): {:?}",
        reports.len(),
        worst.max_gap,
        worst.id,
        reports
            .iter()
            .map(|r| r.max_gap.as_millis())
            .collect::<Vec<_>>()
    );
    worst.max_gap
}

/// The build id a loader logged in its ready line.
fn build_of(gw: &Gateway) -> String {
    let ready = gw
        .wait_for_log(&["nat-loader ready"], Duration::from_secs(1))
        .expect("ready line");
    ready
        .split("build=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no build id in {ready:?}"))
        .to_string()
}

/// The part both restart tests share: 20 streams through a gateway whose
/// loader is stopped by `signal` (without cleanup) and replaced by `next`.
fn streams_survive_loader_replacement(
    what: &str,
    signal: i32,
    expect_code: Option<i32>,
    next: &Path,
    next_build: Option<&str>,
) {
    let bpffs = Bpffs::new().expect("mounting a bpffs for the pins");
    let pins = bpffs.pin_dir();
    let lab = lab_with(LabOptions::nat_forwarding_off());
    let mut gw = start(&lab, &pins, &[]);
    let streams = EchoStreams::start(&lab, Host::Client1, Host::Server, server(7000), STREAMS)
        .expect("20 TCP streams through the gateway");
    streams
        .wait_for_round_trips(20, Duration::from_secs(20))
        .expect("streams running");
    let before = program_ids(&lab);

    let status = gw.signal_and_wait(signal).expect("stopping the loader");
    assert_eq!(
        status.code(),
        expect_code,
        "loader exit: {status:?}\n{:#?}",
        gw.log()
    );

    // No loader now: the pinned programs and maps keep forwarding.
    assert_pinned_dataplane(&pins);
    assert_eq!(
        program_ids(&lab),
        before,
        "programs changed without a loader"
    );
    streams
        .wait_for_round_trips(50, Duration::from_secs(20))
        .expect("established streams keep going while no loader runs");
    let report_new = tcp_transfer(&lab, &Flow::to_server(Host::Client2, 8090), 256 * 1024)
        .expect("a new connection is translated while no loader runs");
    assert_eq!(report_new.server_saw.ip(), nat_lab::NAT_EXT_IP);
    assert_eq!(
        ip_forward(&lab),
        "1",
        "forwarding stays on for the dataplane"
    );

    // The next loader adopts the maps and swaps its programs in.
    let mut gw2 = start_with(&lab, next, &pins, &[]);
    let ready = gw2
        .wait_for_log(&["nat-loader ready"], Duration::from_secs(1))
        .expect("ready line");
    assert!(ready.contains("adopted=true"), "{ready}\n{:#?}", gw2.log());
    // The same build again, or the upgrade's own.
    let first_build = build_of(&gw);
    let want = next_build
        .map(str::to_string)
        .unwrap_or(first_build.clone());
    assert_eq!(build_of(&gw2), want, "{ready}");
    if next_build.is_some() {
        assert_ne!(want, first_build, "the upgrade must be another build");
    }
    let after = program_ids(&lab);
    for (b, a) in before.iter().zip(&after) {
        assert_ne!(
            b, a,
            "the new loader's programs are attached: {before:?} -> {after:?}"
        );
    }
    streams
        .wait_for_round_trips(50, Duration::from_secs(20))
        .expect("streams keep going after the adoption");
    let reports = streams.finish();
    let worst = report(what, &reports);
    eprintln!("{what}: longest pause between verified round trips: {worst:?}");

    // The adopter's SIGTERM removes everything, and restores the sysctl
    // the *first* loader found (0), not the 1 it found itself.
    gw2.stop().expect("stopping the second loader");
    assert_nothing_attached(&lab);
    assert!(!pins.exists(), "pins left: {:?}", pins_in(&pins));
    assert_eq!(ip_forward(&lab), "0", "the original ip_forward is restored");
    assert!(
        gw2.counter("tc_int", "tc_out_forwarded") > 0,
        "the adopter reads the pinned stats: {:#?}",
        gw2.log()
    );
}

#[test]
fn restart_after_sigkill_keeps_20_tcp_streams() {
    let bin = loader_path().expect("loader binary");
    streams_survive_loader_replacement("restart after SIGKILL", libc::SIGKILL, None, &bin, None);
}

/// A copy of the loader binary with another build id stamped into its
/// build-id slot: a different executable, as an upgrade installs one.
/// (Rebuilding the whole loader into a second target dir would cost CI
/// minutes; what the kernel sees is the same either way: a new process
/// loads new program instances against the pinned maps and swaps them
/// into the links.)
struct StampedCopy {
    path: PathBuf,
}

impl StampedCopy {
    fn new(id: &str) -> StampedCopy {
        let original = std::fs::read(loader_path().expect("loader binary")).expect("read loader");
        let bytes = nat_loader::build_id::stamp(&original, id).expect("stamping the build id");
        let path =
            std::env::temp_dir().join(format!("natlab-{}-nat-loader-{id}", std::process::id()));
        std::fs::write(&path, &bytes).expect("write the copy");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        StampedCopy { path }
    }
}

impl Drop for StampedCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[test]
fn upgrade_to_rebuilt_binary_keeps_20_tcp_streams() {
    let copy = StampedCopy::new("upgrade-test-build");
    let original = std::fs::read(loader_path().expect("loader binary")).expect("read");
    assert_ne!(
        std::fs::read(&copy.path).expect("read"),
        original,
        "a different binary"
    );
    // The upgrade path: SIGUSR2 hands over (exit 75, dataplane left pinned),
    // then the new binary adopts.
    streams_survive_loader_replacement(
        "upgrade via SIGUSR2 handover",
        libc::SIGUSR2,
        Some(75),
        &copy.path,
        Some("upgrade-test-build"),
    );
}

#[test]
fn sigterm_removes_every_program_and_pin() {
    let (bpffs, pins, lab, mut gw) = pinned(&[]);
    assert_pinned_dataplane(&pins);
    tcp_transfer(&lab, &Flow::to_server(Host::Client1, 8091), 64 * 1024)
        .expect("TCP through the gateway");
    let status = gw.stop().expect("SIGTERM");
    assert!(status.success(), "{status:?}\n{:#?}", gw.log());
    assert_nothing_attached(&lab);
    assert!(!pins.exists(), "pins left: {:?}", pins_in(&pins));
    // A fresh bpffs holds only the kernel's own `*.debug` iterators.
    let left: Vec<String> = pins_in(bpffs.path())
        .into_iter()
        .filter(|n| !n.ends_with(".debug"))
        .collect();
    assert!(left.is_empty(), "left in the bpffs: {left:?}");
    assert_eq!(ip_forward(&lab), "0", "ip_forward restored");
    // No qdisc either: TCX needs none, and none was added.
    for ifname in [INT_IF, EXT_IF] {
        let out = lab
            .exec(Host::Nat, &["tc", "qdisc", "show", "dev", ifname])
            .expect("tc qdisc");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!text.contains("clsact"), "qdisc left on {ifname}: {text}");
    }
}

/// `nat-loader teardown` for the lab's NICs and pin dir `pins`: whether it
/// exited 0, and its log.
fn teardown(lab: &Lab, pins: &Path) -> (bool, String) {
    let args = format!(
        "teardown --ext {EXT_IF} --int {INT_IF} --bpffs-dir {}",
        pins.display()
    );
    run_loader(lab, &[], &flags(&args)).expect("running nat-loader teardown")
}

#[test]
fn teardown_removes_a_crashed_loaders_dataplane() {
    let (_bpffs, pins, lab, mut gw) = pinned(&[]);
    gw.signal_and_wait(libc::SIGKILL).expect("SIGKILL");
    assert_pinned_dataplane(&pins);
    program_ids(&lab);

    let (ok, log) = teardown(&lab, &pins);
    assert!(ok, "teardown failed: {log}");
    assert!(log.contains("detached the pinned programs"), "{log}");
    assert_nothing_attached(&lab);
    assert!(!pins.exists(), "pins left: {:?}", pins_in(&pins));
    assert_eq!(ip_forward(&lab), "0", "the original ip_forward is restored");
    // Nothing is translated any more.
    assert!(
        tcp_transfer(
            &lab,
            &Flow::to_server(Host::Client1, 8092).timeout(Duration::from_secs(3)),
            1024,
        )
        .is_err(),
        "traffic still translated after teardown"
    );

    // Idempotent: a second teardown finds nothing and says so.
    let (ok, log) = teardown(&lab, &pins);
    assert!(ok, "second teardown failed: {log}");
    assert!(log.contains("nothing to remove"), "{log}");
}

#[test]
fn adopting_incompatible_pins_fails_clearly_and_changes_nothing() {
    let (_bpffs, pins, lab, mut gw) = pinned(&["--max-flows", "4096"]);
    let streams =
        EchoStreams::start(&lab, Host::Client1, Host::Server, server(7001), 2).expect("streams");
    gw.signal_and_wait(libc::SIGKILL).expect("SIGKILL");
    let before = program_ids(&lab);

    let (ok, stderr) = second_loader(&lab, &pins, &["--max-flows", "8192"]);
    assert!(!ok, "adopted an incompatible table: {stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("nat-loader: error: cannot adopt the pinned map")
            && last.contains("4096 entries (--max-flows), expected 8192")
            && last.contains("nat-loader teardown"),
        "unclear error: {stderr}"
    );
    assert_eq!(program_ids(&lab), before, "programs changed");
    assert_pinned_dataplane(&pins);
    the_old_dataplane_forwards_until_torn_down(&lab, &pins, streams);
}

/// `nat-loader check-adoption` with the lab's NICs and pin dir `pins`:
/// whether it exited 0, and its stdout.
/// After a refused adoption: the dataplane left pinned in `pins` still
/// carries `streams`, none of which broke, and `nat-loader teardown` then
/// removes every program.
fn the_old_dataplane_forwards_until_torn_down(lab: &Lab, pins: &Path, streams: EchoStreams) {
    streams
        .wait_for_round_trips(20, Duration::from_secs(10))
        .expect("the old dataplane keeps forwarding");
    let reports = streams.finish();
    assert!(reports.iter().all(|r| r.error.is_none()), "{reports:#?}");
    let (ok, log) = teardown(lab, pins);
    assert!(ok, "{log}");
    assert_nothing_attached(lab);
}

fn check_adoption(lab: &Lab, pins: &Path) -> (bool, String) {
    let bin = loader_path().expect("loader binary");
    let dir = pins.display().to_string();
    let argv = [
        &*bin.to_string_lossy(),
        "check-adoption",
        "--int",
        INT_IF,
        "--ext",
        EXT_IF,
        "--bpffs-dir",
        &dir,
    ];
    let out = lab
        .exec_timeout(Host::Nat, &argv, Duration::from_secs(20))
        .expect("running check-adoption");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn pins_of_another_layout_version_are_refused_and_check_adoption_says_so_first() {
    let (_bpffs, pins, lab, mut gw) = pinned(&[]);
    let streams =
        EchoStreams::start(&lab, Host::Client1, Host::Server, server(7002), 2).expect("streams");
    let (ok, out) = check_adoption(&lab, &pins);
    assert!(ok && out.starts_with("adoptable"), "{out}");
    gw.signal_and_wait(libc::SIGKILL).expect("SIGKILL");
    let before = program_ids(&lab);

    // As a build of another layout would have recorded it.
    let record = pins.join("layout_version");
    let theirs = nat_common::LAYOUT_VERSION + 1;
    std::fs::remove_file(&record).expect("the layout record exists");
    std::os::unix::fs::symlink(theirs.to_string(), &record).expect("rewriting the record");

    let (ok, out) = check_adoption(&lab, &pins);
    assert!(!ok, "check-adoption accepted another layout: {out}");
    assert!(
        out.starts_with("not adoptable")
            && out.contains(&format!("layout version {theirs}"))
            && out.contains("nat-loader teardown"),
        "unclear answer: {out}"
    );
    let (ok, stderr) = second_loader(&lab, &pins, &[]);
    assert!(!ok, "adopted pins of another layout: {stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("nat-loader: error: cannot adopt the pinned dataplane")
            && last.contains(&format!("layout version {theirs}")),
        "unclear error: {stderr}"
    );
    assert_eq!(program_ids(&lab), before, "programs changed");
    the_old_dataplane_forwards_until_torn_down(&lab, &pins, streams);
    let (ok, out) = check_adoption(&lab, &pins);
    assert!(ok && out.starts_with("nothing pinned"), "{out}");
}

#[test]
fn a_second_loader_or_teardown_is_refused_while_a_loader_runs() {
    let (_bpffs, pins, lab, mut gw) = pinned(&[]);
    let before = program_ids(&lab);

    let (ok, stderr) = second_loader(&lab, &pins, &["--probe-port", "0"]);
    assert!(!ok, "a second loader started: {stderr}");
    assert!(
        stderr.contains("another nat-loader is running"),
        "unclear error: {stderr}"
    );

    let (ok, log) = teardown(&lab, &pins);
    assert!(!ok, "teardown ran under a live loader: {log}");
    assert!(log.contains("another nat-loader is running"), "{log}");

    assert_eq!(program_ids(&lab), before, "programs changed");
    assert_pinned_dataplane(&pins);
    tcp_transfer(&lab, &Flow::to_server(Host::Client1, 8093), 64 * 1024)
        .expect("the running gateway still translates");
    assert!(gw.stop().expect("SIGTERM").success());
    assert_nothing_attached(&lab);
    assert!(!pins.exists());
}

/// Deletes the gateway's `int` veth and creates it again, wired and
/// addressed as the lab built it: same name, new ifindex.
fn recreate_int(lab: &Lab) {
    lab.exec(Host::Nat, &["ip", "link", "del", INT_IF])
        .expect("deleting int");
    let ns = lab.namespaces();
    let (nat, sw, port) = (Host::Nat.role(), Host::Sw.role(), nat_lab::SW_NAT_PORT);
    ns.veth(nat, INT_IF, sw, port).expect("a new int");
    ns.ip(sw, &["link", "set", port, "master", nat_lab::SW_BRIDGE])
        .expect("int's switch port");
    let addr = format!("{}/{}", nat_lab::NAT_INT_IP, nat_lab::PREFIX_LEN);
    ns.addr(nat, INT_IF, &addr).expect("int's address");
    ns.settle().expect("the new int up");
    // The clients would keep the old int's MAC for a while.
    for h in [Host::Client1, Host::Client2] {
        lab.exec(h, &["ip", "neigh", "flush", "all"])
            .expect("flushing the neighbours");
    }
}

#[test]
fn a_pinned_link_whose_interface_was_recreated_is_replaced_by_a_fresh_one() {
    let (_bpffs, pins, lab, mut gw) = pinned(&[]);
    gw.signal_and_wait(libc::SIGKILL).expect("SIGKILL");
    recreate_int(&lab);
    // The old int's links died with it; ext's are still attached.
    assert_eq!(attached(&lab, INT_IF), (None, vec![]));
    let ext_before = attached(&lab, EXT_IF);

    let gw2 = start(&lab, &pins, &[]);
    for link in ["link_xdp_int", "link_tcx_int"] {
        assert!(
            gw2.wait_for_log(&["replacing it", link], Duration::from_secs(1))
                .is_some(),
            "{link} not replaced: {:#?}",
            gw2.log()
        );
    }
    let ids = program_ids(&lab);
    assert_ne!(
        (Some(ids[2]), vec![ids[3]]),
        ext_before,
        "ext's links took the new programs"
    );
    let report = tcp_transfer(
        &lab,
        &Flow::to_server(Host::Client1, 8094).timeout(Duration::from_secs(15)),
        256 * 1024,
    )
    .expect("TCP through the recreated int");
    assert_eq!(report.server_saw.ip(), nat_lab::NAT_EXT_IP);
    drop(gw2);
    assert_nothing_attached(&lab);
    assert!(!pins.exists(), "pins left: {:?}", pins_in(&pins));
}

/// Pins, at `path`, a new per-CPU array of `entries` u64 counters: what
/// an older or newer build with another number of reasons would have left.
fn pin_percpu_array(path: &Path, entries: u32) {
    use nat_loader::sys;
    use std::os::unix::ffi::OsStrExt;
    #[repr(C)]
    #[derive(Default)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    #[repr(C)]
    #[derive(Default)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
    let mut create = MapCreate {
        map_type: BPF_MAP_TYPE_PERCPU_ARRAY,
        key_size: 4,
        value_size: 8,
        max_entries: entries,
        map_flags: 0,
    };
    let fd = sys::bpf(BPF_MAP_CREATE, &mut create).expect("BPF_MAP_CREATE");
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("path");
    let mut pin = ObjPin {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd as u32,
        file_flags: 0,
    };
    let rc = sys::bpf(BPF_OBJ_PIN, &mut pin);
    // SAFETY: our fd; the pin keeps the map.
    unsafe { libc::close(fd as i32) };
    let rc = rc.unwrap_or_else(|e| panic!("BPF_OBJ_PIN {}: {e}", path.display()));
    assert_eq!(rc, 0, "BPF_OBJ_PIN {}", path.display());
}

#[test]
fn counters_of_another_layout_are_replaced_and_the_flows_still_adopted() {
    let (_bpffs, pins, lab, mut gw) = pinned(&[]);
    let streams =
        EchoStreams::start(&lab, Host::Client1, Host::Server, server(7002), 2).expect("streams");
    gw.signal_and_wait(libc::SIGKILL).expect("SIGKILL");
    std::fs::remove_file(pins.join(MAP_STATS)).expect("unpinning STATS");
    pin_percpu_array(&pins.join(MAP_STATS), 3);

    let mut gw2 = start(&lab, &pins, &[]);
    let ready = gw2
        .wait_for_log(&["nat-loader ready"], Duration::from_secs(1))
        .expect("ready");
    assert!(ready.contains("adopted=true"), "{ready}");
    assert!(
        gw2.wait_for_log(
            &["start again from zero", "3 entries"],
            Duration::from_secs(1)
        )
        .is_some(),
        "{:#?}",
        gw2.log()
    );
    assert_eq!(
        aya::maps::MapInfo::from_pin(pins.join(MAP_STATS))
            .expect("pinned STATS")
            .max_entries(),
        nat_common::stats::SLOTS,
        "STATS re-created with this build's layout (nat_common::stats)"
    );
    streams
        .wait_for_round_trips(20, Duration::from_secs(10))
        .expect("flows go on");
    let reports = streams.finish();
    assert!(reports.iter().all(|r| r.error.is_none()), "{reports:#?}");
    gw2.stop().expect("SIGTERM");
    assert!(
        gw2.counter("tc_int", "tc_out_forwarded") > 0,
        "the new counters count: {:#?}",
        gw2.log()
    );
    assert_nothing_attached(&lab);
}

//! Project tasks: `cargo xtask build-ebpf | build | test | demo | bench | soak`.
//!
//! Every task first runs scripts/bootstrap.sh, which installs (idempotently)
//! the toolchain the eBPF build needs, so each command works on a fresh
//! machine.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, test and demo tasks of the NAT gateway")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the toolchain (Debian's BPF-capable rustc, bpf-linker, lab tools).
    Bootstrap,
    /// Build the eBPF object (target/bpfel-unknown-none/release/nat-ebpf).
    BuildEbpf,
    /// Build the eBPF object and the self-contained release loader.
    Build,
    /// Build everything and run every check: formatting, clippy, the
    /// deployment checks, unit tests, BPF_PROG_TEST_RUN fixtures and the
    /// network-namespace end-to-end tests. Needs root.
    Test,
    /// Build everything and show the gateway translating real traffic in a
    /// network-namespace lab. Needs root.
    Demo,
    /// Build everything and benchmark the gateway against kernel forwarding,
    /// iptables, nftables and a forward-only XDP program; writes
    /// target/bench/{results.md,results.json,chart.png}. Needs root.
    Bench {
        /// A short run (about two minutes) that exercises every measurement.
        #[arg(long)]
        quick: bool,
    },
    /// Build everything and soak the gateway: mixed traffic (TCP streams
    /// with verified data, new UDP flows, fragments, pings) while the
    /// loader is handed over, killed and restarted, links flap and the
    /// table is pressed; then check no stream broke, no map entry leaked
    /// and the loader's memory stayed flat, and print a summary. Needs root.
    Soak {
        /// How long, in minutes.
        #[arg(long, default_value_t = 30)]
        minutes: u64,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.task {
        Task::Bootstrap => bootstrap(&root),
        Task::BuildEbpf => {
            bootstrap(&root)?;
            build_ebpf(&root)
        }
        Task::Build => {
            bootstrap(&root)?;
            build(&root)
        }
        Task::Test => {
            bootstrap(&root)?;
            test(&root)
        }
        Task::Demo => {
            bootstrap(&root)?;
            build(&root)?;
            demo(&root)
        }
        Task::Soak { minutes } => {
            require_root("soak")?;
            bootstrap(&root)?;
            build(&root)?;
            soak(&root, minutes)
        }
        Task::Bench { quick } => {
            require_root("bench")?;
            bootstrap(&root)?;
            build(&root)?;
            bench(&root, quick)
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("failed to start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn bootstrap(root: &Path) -> Result<()> {
    run(Command::new("bash").arg(root.join("scripts/bootstrap.sh")))
}

/// The eBPF crate is built with Debian's rustc 1.96, which ships a prebuilt
/// `core` for bpfel-unknown-none (rustup's toolchains here have no rust-src
/// to build one). The variables the outer cargo set must not leak into the
/// inner build, or it silently picks rustup's compiler.
fn build_ebpf(root: &Path) -> Result<()> {
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?
        .join("bin");
    let path = format!(
        "{}:{}",
        cargo_bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new("/usr/bin/cargo");
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("CARGO_") && k != "CARGO_HOME"
            || k.starts_with("RUSTUP")
            || k == "RUSTC"
            || k == "RUSTC_WRAPPER"
            || k == "RUSTFLAGS"
            || k == "RUSTDOC"
        {
            cmd.env_remove(&k);
        }
    }
    cmd.current_dir(root)
        .env("PATH", path)
        .env("RUSTC", "/usr/bin/rustc")
        .env("RUSTC_BOOTSTRAP", "1")
        .args([
            "build",
            "--package",
            "nat-ebpf",
            "--release",
            "--target",
            "bpfel-unknown-none",
        ]);
    run(&mut cmd)?;
    for name in ["nat-ebpf", "nat-bench-ebpf"] {
        let obj = ebpf_object(root, name);
        if !obj.exists() {
            bail!("the eBPF build finished but {} is missing", obj.display());
        }
        eprintln!("xtask: eBPF object at {}", obj.display());
    }
    Ok(())
}

/// The gateway's object is `nat-ebpf`; the benchmark's own programs are in
/// `nat-bench-ebpf`.
fn ebpf_object(root: &Path, name: &str) -> PathBuf {
    root.join("target/bpfel-unknown-none/release").join(name)
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn build(root: &Path) -> Result<()> {
    build_ebpf(root)?;
    run(cargo()
        .current_dir(root)
        .args(["build", "--release", "--package", "nat-loader"]))
}

fn require_root(task: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        bail!(
            "`cargo xtask {task}` creates network namespaces and loads eBPF programs: run it as root"
        );
    }
    Ok(())
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn test(root: &Path) -> Result<()> {
    require_root("test")?;
    build(root)?;
    run(cargo().current_dir(root).args(["fmt", "--all", "--check"]))?;
    run(cargo().current_dir(root).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // No module of a crate imports one that imports it back (helpers live
    // below their callers).
    for src in [
        "nat-common/src",
        "nat-ebpf/src",
        "nat-loader/src",
        "tests/src",
    ] {
        run(Command::new("python3")
            .arg(root.join("scripts/modgraph.py"))
            .arg(root.join(src)))?;
    }
    // Deployment artefacts: the Azure template's wiring, checkov, shellcheck,
    // the systemd unit and the .deb built from the release loader.
    run(Command::new("bash").arg(root.join("deploy/check.sh")))?;
    // One test binary at a time, two threads each: the namespace tests are
    // light, but the machine has only two cores. --workspace: the tests
    // crate (root-only suites) is not a default member, so a plain
    // `cargo test` leaves it out.
    run(cargo().current_dir(root).args([
        "test",
        "--workspace",
        "--release",
        "--",
        "--test-threads=2",
    ]))?;
    Ok(())
}

fn demo(root: &Path) -> Result<()> {
    require_root("demo")?;
    run_bin(root, "nat-demo", &[])
}

fn bench(root: &Path, quick: bool) -> Result<()> {
    run_bin(root, "nat-bench", if quick { &["--quick"] } else { &[] })
}

fn soak(root: &Path, minutes: u64) -> Result<()> {
    run_bin(root, "nat-soak", &["--minutes", &minutes.to_string()])
}

/// Runs binary `bin` of the tests crate (release) with `args`.
fn run_bin(root: &Path, bin: &str, args: &[&str]) -> Result<()> {
    run(cargo()
        .current_dir(root)
        .args([
            "run",
            "--release",
            "--package",
            "nat-tests",
            "--bin",
            bin,
            "--",
        ])
        .args(args))
}

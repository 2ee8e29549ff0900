//! `nat-bench [--quick] [--out DIR]`: the benchmark of issue 6 (see
//! `nat_lab::bench`). `--policy-cost` measures only the egress policy's
//! cost and prints its table; `--stateful` only RFC 9693's measurements. Run it through `cargo xtask bench`, which installs the
//! tools and builds the loader first. Needs root.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use nat_lab::bench::{self, Plan};

fn main() -> Result<()> {
    let mut quick = false;
    let mut policy_only = false;
    let mut stateful_only = false;
    let mut out = bench::default_out_dir();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--policy-cost" => policy_only = true,
            "--stateful" => stateful_only = true,
            "--out" => out = PathBuf::from(args.next().context("--out needs a directory")?),
            "-h" | "--help" => {
                println!(
                    "usage: nat-bench [--quick] [--out DIR] [--policy-cost | --stateful]   (default DIR: target/bench)"
                );
                return Ok(());
            }
            other => bail!("unknown argument {other:?} (usage: nat-bench [--quick] [--out DIR])"),
        }
    }
    bench::handle_signals()?;
    let plan = if quick { Plan::quick() } else { Plan::full() };
    if policy_only {
        print!("{}", bench::policy_cost_only(&plan)?);
        return Ok(());
    }
    if stateful_only {
        print!("{}", bench::stateful_only(&plan)?);
        return Ok(());
    }
    let report = bench::run(&plan, &out)?;
    println!("{}", report.markdown());
    println!(
        "nat-bench: results.md, results.json and chart.png in {} ({:.0} s)",
        out.display(),
        report.duration_secs
    );
    Ok(())
}

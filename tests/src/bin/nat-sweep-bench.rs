//! CPU time of a sweep of a large conntrack table, the batched sweeper
//! against the entry-by-entry walk it replaced, on the same maps:
//!
//!     sudo target/release/nat-sweep-bench [SESSIONS]   # default 1,000,000
//!
//! Four passes, each on a freshly filled table of the real programs: a
//! sweep with nothing to remove and one that removes everything, for each
//! method, and the batched sweep's CPU time phase by phase. Also prints
//! the maps' memory per flow (kernel memlock).

use std::{process::ExitCode, time::Duration};

use anyhow::{Context, Result};
use nat_lab::{
    bench::scale::{map_data, memlock},
    sweep_scale::{self, fill, load, sweep, walk_entry_by_entry},
};
use nat_loader::dataplane::CtMaps;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nat-sweep-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let sessions: u32 = match std::env::args().nth(1) {
        Some(a) => a.parse().context("SESSIONS: a number")?,
        None => 1_000_000,
    };
    let max_flows = sessions.next_power_of_two();
    let idle = Duration::from_secs(100_000);
    println!("{sessions} sessions in a table of {max_flows} (--max-flows)");
    {
        // Map memory as the kernel charges it (memlock), every map of the
        // object the loader loads with these sizes.
        let ebpf = load(max_flows)?;
        let mut total = 0;
        for (name, map) in ebpf.maps() {
            let bytes = memlock(map_data(map))?;
            total += bytes;
            println!("  map {name:<16} {bytes:>12} bytes");
        }
        println!(
            "  all maps         {total:>12} bytes = {:.1} bytes per flow",
            total as f64 / max_flows as f64
        );
    }
    for (what, expire_all) in [("nothing to remove", false), ("remove all", true)] {
        for batched in [false, true] {
            let mut ebpf = load(max_flows)?;
            let now = nat_loader::monotonic_ns();
            let bindings = fill(&mut ebpf, sessions, now, idle, |_| expire_all)?;
            let mut maps = CtMaps::take(&mut ebpf)?;
            let mut phases = Vec::new();
            let (removed, cpu) = if batched {
                let (s, cpu) = sweep(&mut maps, max_flows, now)?;
                phases = s.phases;
                (s.expired, cpu)
            } else {
                walk_entry_by_entry(&mut maps, now)?
            };
            let method = if batched {
                "batched sweep"
            } else {
                "entry by entry"
            };
            println!(
                "{what:<18} {method:<15} {bindings} bindings: removed {removed}, CPU {:.3} s",
                cpu.as_secs_f64()
            );
            for (phase, cpu) in phases {
                println!("    {phase:<32} {:>7.1} ms", cpu.as_secs_f64() * 1e3);
            }
            let _ = sweep_scale::sessions_left(&maps)?;
        }
    }
    Ok(())
}

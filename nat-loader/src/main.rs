//! `nat-loader`: attaches the NAT gateway's eBPF programs to the `--int` and
//! `--ext` NICs and runs its control plane in the foreground until SIGINT or
//! SIGTERM. On that exit, and on any failure half-way through a fresh
//! start, it removes everything it added.
//!
//! The maps and program links are pinned (`--bpffs-dir`), so the dataplane
//! survives the process: after a crash, a SIGKILL or a SIGUSR2 handover the
//! programs keep forwarding, and the next loader adopts them and swaps in
//! its own programs atomically. `nat-loader teardown` removes a dataplane
//! whose loader is gone.
//!
//! The binary's modules, top down: [`cli`] (the flags) → [`config`] (flags
//! over the config file, checked) → [`daemon`] (the run: [`setup`], the
//! loop, shutdown; [`report`] logs the counters), [`teardown`], and the
//! commands on a running gateway: [`show`] (`stats`, `conntrack`) and
//! [`policy_cmd`] (`policy`). The library (`nat_loader`) holds everything that touches the kernel.

mod cli;
mod config;
mod daemon;
mod policy_cmd;
mod report;
mod setup;
mod show;
mod teardown;
mod values;

use std::{io::IsTerminal, process::ExitCode};

use anyhow::Result;

use crate::{
    cli::{Cli, Command},
    config::{Config, Reload},
};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let (cli, given) = Cli::parse_args();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nat-loader: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: Result<ExitCode> = rt.block_on(async {
        match cli.command {
            Some(Command::Teardown {
                ext,
                int,
                bpffs_dir,
            }) => teardown::teardown(&ext, &int, &bpffs_dir)
                .await
                .map(|()| ExitCode::SUCCESS),
            Some(Command::CheckAdoption(args)) => {
                let config = Config::load(*args, &given)?;
                let pins = nat_loader::pins::PinDir::new(&config.bpffs_dir);
                match pins.can_adopt(config.max_flows, config.filtering.code()) {
                    Ok(true) => println!(
                        "adoptable: the dataplane pinned in {} fits this build and these flags",
                        pins.path().display()
                    ),
                    Ok(false) => println!("nothing pinned in {}", pins.path().display()),
                    Err(e) => {
                        println!("not adoptable: {e:#}");
                        return Ok(ExitCode::FAILURE);
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
            Some(Command::Policy(cmd)) => policy_cmd::run(cmd).map(|()| ExitCode::SUCCESS),
            Some(Command::Stats { read }) => show::stats(&read).map(|()| ExitCode::SUCCESS),
            Some(Command::Conntrack { what }) => show::conntrack(&what).map(|()| ExitCode::SUCCESS),
            None => {
                let reload = Reload::new(&cli.gateway, &given);
                daemon::run(Config::load(cli.gateway, &given)?, reload).await
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            // One line: the chain of contexts, outermost first.
            eprintln!("nat-loader: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

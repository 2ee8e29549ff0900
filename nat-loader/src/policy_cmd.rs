//! `nat-loader policy apply|show|test`: the egress policy of a running
//! gateway (signalled to reload, or read from its maps) or of a config
//! file (which rule decides a flow).

use anyhow::{Context, Result, bail};
use nat_common::policy::compile;

use crate::{cli::PolicyCommand, config};

/// `nat-loader policy ...`.
pub fn run(cmd: PolicyCommand) -> Result<()> {
    match cmd {
        PolicyCommand::Apply { recheck, bpffs_dir } => {
            let Some(pid) = nat_loader::policy::lock_holder(&bpffs_dir)? else {
                bail!(
                    "no nat-loader is running on {} (nobody holds its lock)",
                    bpffs_dir.display()
                );
            };
            let (sig, name) = if recheck {
                (libc::SIGUSR1, "SIGUSR1 (reload and recheck)")
            } else {
                (libc::SIGHUP, "SIGHUP (reload)")
            };
            // SAFETY: a plain kill(2) to the pid holding the lock.
            if unsafe { libc::kill(pid as i32, sig) } != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("signalling nat-loader (pid {pid})"));
            }
            println!("sent {name} to nat-loader (pid {pid}); its log says what it applied");
            Ok(())
        }
        PolicyCommand::Show { bpffs_dir, config } => {
            use nat_common::policy::{Prefix, Verdict};
            let pins = nat_loader::pins::PinDir::new(&bpffs_dir);
            let maps = nat_loader::policy::PolicyMaps::of_running(&pins).with_context(|| {
                format!("no running gateway's policy in {}", bpffs_dir.display())
            })?;
            let Some(rules) = maps.show()? else {
                println!("no egress policy: every new flow is allowed");
                return Ok(());
            };
            let names: Vec<String> = match &config {
                Some(path) => config::test_policy(Some(path), &[])?
                    .rules
                    .into_iter()
                    .map(|r| r.name)
                    .collect(),
                None => Vec::new(),
            };
            let named = names.len() + 1 == rules.len();
            if config.is_some() && !named {
                eprintln!(
                    "nat-loader: the config file has {} rules, the gateway {}: names left out",
                    names.len(),
                    rules.len() - 1
                );
            }
            println!(
                "{:>5}  {:<24} {:<18} {:<18} {:<5} {:<11} {:<24} {:>10}",
                "#", "name", "inside", "destination", "proto", "ports", "verdict", "hits"
            );
            let last = rules.len() - 1;
            for (i, s) in rules.iter().enumerate() {
                let r = &s.rule;
                let inside = Prefix::new(
                    std::net::Ipv4Addr::from(r.src.to_ne_bytes()),
                    r.src_mask.count_ones() as u8,
                );
                let proto = match r.proto {
                    0 => "any",
                    6 => "tcp",
                    17 => "udp",
                    1 => "icmp",
                    _ => "?",
                };
                let ports = if (r.port_min, r.port_max) == (0, u16::MAX) {
                    "any".to_string()
                } else if r.port_min == r.port_max {
                    r.port_min.to_string()
                } else {
                    format!("{}-{}", r.port_min, r.port_max)
                };
                let dst = s.dst.map_or("(shadowed)".to_string(), |d| d.to_string());
                let (num, name) = if i == last {
                    (String::new(), "default".to_string())
                } else if named {
                    ((i + 1).to_string(), names[i].clone())
                } else {
                    ((i + 1).to_string(), String::new())
                };
                println!(
                    "{num:>5}  {name:<24} {:<18} {dst:<18} {proto:<5} {ports:<11} {:<24} {:>10}",
                    inside.to_string(),
                    Verdict::decode(r.action, r.answer).to_string(),
                    s.hits
                );
            }
            Ok(())
        }
        PolicyCommand::Test {
            config,
            src,
            dst,
            proto,
            port,
            deny,
            allow,
            policy_default,
        } => {
            let mut flags = Vec::new();
            for r in &deny {
                flags.extend(["--deny".to_string(), r.spec.clone()]);
            }
            for r in &allow {
                flags.extend(["--allow".to_string(), r.spec.clone()]);
            }
            if let Some(d) = policy_default {
                flags.extend(["--policy-default".to_string(), d.to_string()]);
            }
            let p = config::test_policy(config.as_deref(), &flags)?;
            let port = if proto == nat_common::IPPROTO_ICMP {
                0
            } else {
                port
            };
            let compiled = compile(&p).map_err(|e| anyhow::anyhow!("policy: {e}"))?;
            let (idx, verdict) = compiled
                .lookup(src, dst, proto, port)
                .context("the compiled policy decided nothing")?;
            match p.rules.get(idx) {
                Some(r) => println!("rule {} {:?}: {verdict}", idx + 1, r.name),
                None => println!("default: {verdict}"),
            }
            Ok(())
        }
    }
}

//! `nat-loader stats` and `nat-loader conntrack`: a running gateway's
//! counters and sessions, read-only from its pins ([`nat_loader::inspect`]).

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::Result;
use nat_loader::{
    conntrack::Flow,
    inspect::{self, Filter},
    monotonic_ns,
    pins::PinDir,
    summary::proto_name,
};
use serde_json::json;

use crate::cli::{ConntrackCommand, FilterArgs, Output, ReadArgs};

pub fn stats(read: &ReadArgs) -> Result<()> {
    let pins = PinDir::new(&read.bpffs_dir);
    let s = inspect::stats(&pins)?;
    let traffic = inspect::traffic(&pins)?;
    match read.output {
        Output::Json => println!("{}", inspect::stats_json(&s, &traffic)),
        Output::Text => {
            for line in s.lines() {
                println!("{line}");
            }
            for (dir, proto, t) in &traffic {
                println!(
                    "traffic {dir} {proto}: packets={} bytes={}",
                    t.packets, t.bytes
                );
            }
        }
    }
    Ok(())
}

fn filter(f: &FilterArgs) -> Filter {
    Filter {
        proto: f.proto.map(|p| p.number()),
        inside: f.inside,
        outside: f.outside,
        port: f.port,
        external_port: None,
        state: f.state.clone(),
    }
}

fn flows(read: &ReadArgs, filter: &Filter) -> Result<Vec<Flow>> {
    let pins = PinDir::new(&read.bpffs_dir);
    let sessions = inspect::sessions(&pins)?;
    let pool = inspect::pool(&pins)?;
    let now = monotonic_ns();
    Ok(sessions
        .iter()
        .map(|(k, v)| Flow::from_entry(k, v, &pool, now))
        .filter(|f| filter.matches(f))
        .collect())
}

fn print_flows(flows: &[Flow], output: Output) {
    match output {
        Output::Json => {
            let all: Vec<_> = flows.iter().map(inspect::flow_json).collect();
            println!("{}", serde_json::Value::Array(all));
        }
        Output::Text => {
            for f in flows {
                println!("{f}");
            }
        }
    }
}

pub fn conntrack(what: &ConntrackCommand) -> Result<()> {
    match what {
        ConntrackCommand::List { filter: f, read } => {
            print_flows(&flows(read, &filter(f))?, read.output);
        }
        ConntrackCommand::Count { filter: f, read } => {
            let n = flows(read, &filter(f))?.len();
            match read.output {
                Output::Json => println!("{}", json!({ "count": n })),
                Output::Text => println!("{n}"),
            }
        }
        ConntrackCommand::Get { port, proto, read } => {
            let f = Filter {
                proto: proto.map(|p| p.number()),
                external_port: Some(*port),
                ..Filter::default()
            };
            let sessions = flows(read, &f)?;
            let bindings: Vec<_> = inspect::bindings(&PinDir::new(&read.bpffs_dir))?
                .into_iter()
                .filter(|(ek, _)| u16::from_be(ek.port) == *port)
                .filter(|(ek, _)| f.proto.is_none_or(|p| p == ek.proto))
                .map(|(ek, v)| {
                    let (a, p) = v.addr_port();
                    (
                        proto_name(ek.proto),
                        sock(ek.addr, ek.port),
                        sock(a, p),
                        v.released(),
                    )
                })
                .collect();
            match read.output {
                Output::Json => {
                    let b: Vec<_> = bindings
                        .iter()
                        .map(|(proto, ext, inside, released)| {
                            json!({
                                "protocol": proto,
                                "external": ext.to_string(),
                                "inside": inside.to_string(),
                                "released": released,
                            })
                        })
                        .collect();
                    let s: Vec<_> = sessions.iter().map(inspect::flow_json).collect();
                    println!("{}", json!({ "bindings": b, "sessions": s }));
                }
                Output::Text => {
                    for (proto, ext, inside, released) in &bindings {
                        let held = if *released { " (released, held)" } else { "" };
                        println!("binding {proto:<4} {ext} <= {inside}{held}");
                    }
                    print_flows(&sessions, Output::Text);
                }
            }
        }
    }
    Ok(())
}

fn sock(raw_addr: u32, raw_port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(raw_addr.to_ne_bytes()),
        u16::from_be(raw_port),
    )
}

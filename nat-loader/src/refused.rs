//! Counting the redirects the kernel refuses: the dataplane's tracing
//! programs (`nat_common::trace::PROGRAMS`) on the kernel's XDP
//! tracepoints, attached for as long as this loader runs.
//!
//! Attaching a program to a tracepoint needs the tracepoint's id, which
//! only tracefs tells. Where none is mounted (a minimal host, or a loader
//! started by `ip netns exec`, which gets a /sys of its own) the loader
//! mounts it at [`TRACEFS`], where a systemd host has it, and leaves it
//! there. Before attaching, it checks that the kernel's records have the
//! fields the programs read where they read them.

use std::path::Path;

use anyhow::{Context, Result, bail};
use aya::{Ebpf, programs::TracePoint};
use nat_common::trace;
use tracing::info;

use crate::{mounts, program};

/// Where tracefs is mounted, or will be.
pub const TRACEFS: &str = "/sys/kernel/tracing";
/// Where older hosts have it (below debugfs).
const TRACEFS_OLD: &str = "/sys/kernel/debug/tracing";
/// statfs magic of tracefs.
const TRACEFS_MAGIC: i64 = 0x7472_6163;

/// Loads the tracing programs (verifier only; nothing is attached).
pub fn load(ebpf: &mut Ebpf) -> Result<()> {
    for (name, _) in trace::PROGRAMS {
        let prog: &mut TracePoint = program(ebpf, name)?;
        prog.load()
            .with_context(|| format!("verifying program {name}"))?;
    }
    Ok(())
}

/// Attaches the tracing programs to their tracepoints; they stay attached
/// while `ebpf` lives.
pub fn attach(ebpf: &mut Ebpf) -> Result<()> {
    let root = tracefs()?;
    for (tp, field, offset) in trace::FIELDS {
        let path = root
            .join("events")
            .join(trace::CATEGORY)
            .join(tp)
            .join("format");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        check_field(&text, field, offset)
            .with_context(|| format!("the kernel's tracepoint {}:{tp}", trace::CATEGORY))?;
    }
    for (name, tp) in trace::PROGRAMS {
        let prog: &mut TracePoint = program(ebpf, name)?;
        prog.attach(trace::CATEGORY, tp).with_context(|| {
            format!(
                "attaching {name} to the tracepoint {}:{tp}",
                trace::CATEGORY
            )
        })?;
    }
    Ok(())
}

/// Where tracefs is mounted, mounting it at [`TRACEFS`] if nowhere.
fn tracefs() -> Result<&'static Path> {
    for p in [TRACEFS, TRACEFS_OLD] {
        if mounts::magic(Path::new(p)).is_ok_and(|m| m == TRACEFS_MAGIC) {
            return Ok(Path::new(p));
        }
    }
    mounts::mount(c"tracefs", Path::new(TRACEFS))
        .context("counting refused XDP redirects needs tracefs")?;
    info!(
        path = TRACEFS,
        "mounted tracefs (to count refused XDP redirects)"
    );
    Ok(Path::new(TRACEFS))
}

/// Fails unless the tracepoint format `text` (tracefs
/// `events/<category>/<name>/format`) has a 4-byte `field` at `offset`.
pub fn check_field(text: &str, field: &str, offset: usize) -> Result<()> {
    let found = text.lines().find_map(|line| {
        let line = line.trim();
        let decl = line.strip_prefix("field:")?.split(';').next()?;
        let name = decl
            .rsplit(|c: char| c.is_whitespace() || c == '*')
            .next()?;
        if name != field {
            return None;
        }
        let value = |key: &str| -> Option<usize> {
            line.split(';')
                .find_map(|part| part.trim().strip_prefix(key))
                .and_then(|v| v.parse().ok())
        };
        Some((value("offset:"), value("size:")))
    });
    match found {
        Some((Some(o), Some(4))) if o == offset => Ok(()),
        Some((o, size)) => bail!(
            "field {field} is at offset {o:?} with size {size:?}; this build reads 4 bytes at \
             {offset}"
        ),
        None => bail!("no field {field}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Linux 6.18's `events/xdp/xdp_devmap_xmit/format`.
    const DEVMAP_XMIT: &str = "name: xdp_devmap_xmit
ID: 578
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:int from_ifindex;\toffset:8;\tsize:4;\tsigned:1;
\tfield:u32 act;\toffset:12;\tsize:4;\tsigned:0;
\tfield:int to_ifindex;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int drops;\toffset:20;\tsize:4;\tsigned:1;
\tfield:int sent;\toffset:24;\tsize:4;\tsigned:1;
\tfield:int err;\toffset:28;\tsize:4;\tsigned:1;

print fmt: \"ndo_xdp_xmit from_ifindex=%d to_ifindex=%d\", REC->from_ifindex, REC->to_ifindex
";

    #[test]
    fn the_fields_the_programs_read_are_where_this_kernel_has_them() {
        for (tp, field, offset) in trace::FIELDS {
            if tp == trace::DEVMAP_XMIT {
                check_field(DEVMAP_XMIT, field, offset).expect(field);
            }
        }
    }

    #[test]
    fn a_field_elsewhere_or_missing_is_refused_with_both_offsets() {
        let e = check_field(DEVMAP_XMIT, "sent", 28).expect_err("sent is at 24");
        assert_eq!(
            e.to_string(),
            "field sent is at offset Some(24) with size Some(4); this build reads 4 bytes at 28"
        );
        let e = check_field(DEVMAP_XMIT, "prog_id", 8).expect_err("no prog_id");
        assert_eq!(e.to_string(), "no field prog_id");
        check_field(DEVMAP_XMIT, "common_flags", 2).expect_err("1 byte");
    }
}

//! The NAT gateway's control plane as a library: the binary (`main.rs`) and
//! the tests drive the same code.

pub mod batch;
pub mod blackhole;
pub mod build_id;
pub mod caps;
pub mod conntrack;
pub mod dataplane;
pub mod egress;
pub mod events;
pub mod health;
pub mod http;
pub mod inspect;
pub mod metrics;
pub mod mounts;
pub mod netif;
pub mod pins;
pub mod policy;
pub mod pool;
pub mod pressure;
pub mod refused;
pub mod routing;
pub mod stats;
pub mod summary;
pub mod sys;
pub mod sysctl;
pub mod tables;
pub mod translog;
pub mod xdp_features;

/// The eBPF object, embedded at build time; empty when the loader was built
/// without it (see build.rs), which [`ebpf_object`] turns into an error.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nat-ebpf.o"));

/// The embedded eBPF object, or the error that says how to build it.
pub fn ebpf_object() -> anyhow::Result<&'static [u8]> {
    if EBPF_OBJECT.is_empty() {
        anyhow::bail!(
            "this nat-loader was built without the eBPF object: run `cargo xtask build` \
             (or `cargo xtask build-ebpf` before building the loader)"
        );
    }
    Ok(EBPF_OBJECT)
}

/// A program of the loaded object by name and type: here, below the
/// modules that load (`dataplane`) and attach (`refused`) programs.
pub fn program<'a, T>(ebpf: &'a mut aya::Ebpf, name: &str) -> anyhow::Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    use anyhow::Context;
    ebpf.program_mut(name)
        .with_context(|| format!("program {name} missing from the eBPF object"))?
        .try_into()
        .with_context(|| format!("program {name} has an unexpected type"))
}

/// Takes a map out of the loaded object so the control plane can own it.
pub fn take_map<T>(ebpf: &mut aya::Ebpf, name: &str) -> anyhow::Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    use anyhow::Context;
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("map {name} missing from the eBPF object"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns()`, which
/// stamps conntrack entries.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_empty_embedded_object_is_an_error_that_says_how_to_build_it() {
        match super::ebpf_object() {
            Ok(object) => assert!(object.starts_with(b"\x7fELF"), "not an ELF object"),
            Err(e) => {
                assert!(super::EBPF_OBJECT.is_empty());
                assert!(e.to_string().contains("cargo xtask build"), "{e}");
            }
        }
    }
}

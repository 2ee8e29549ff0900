//! The NAT gateway's control plane as a library: the binary (`main.rs`) and
//! the tests drive the same code.

pub mod caps;
pub mod conntrack;
pub mod dataplane;
pub mod events;
pub mod health;
pub mod netif;
pub mod pins;
pub mod pressure;
pub mod routing;
pub mod stats;
pub mod sysctl;

/// The eBPF object, embedded at build time.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nat-ebpf.o"));

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

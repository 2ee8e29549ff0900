//! The gateway's dataplane: XDP on both NICs is the fast path; a TC ingress
//! program on each NIC finishes what XDP cannot do well, with tail-called
//! programs for the rare and heavy cases. Entry points are in xdp.rs and
//! tc.rs (and the tail-called programs in their concern's module); every
//! packet then walks parse → nat (decide) → rewrite → forward. Beside the
//! packet path, refused.rs's tracing programs count the redirects the
//! kernel refused. See docs/packet-flow.md for what each program does to a
//! packet, and why.
#![no_std]
#![no_main]

mod conntrack;
mod csum;
mod fib;
mod forward;
mod frag;
mod hairpin;
mod icmp_err;
mod maps;
mod mss;
mod nat;
mod no_port;
mod parse;
mod policy;
mod pool;
mod refused;
mod reset;
mod rewrite;
mod stats;
mod tail;
mod tc;
mod translog;
mod xdp;

// Only for the BPF target: host builds (clippy) get std's handler through
// dependencies.
#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach this; it only exists
    // because no_std requires it.
    loop {}
}

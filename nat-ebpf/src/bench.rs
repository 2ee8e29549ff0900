//! The benchmark's programs (`cargo xtask bench`): the forward-only XDP
//! program that is the ceiling of a topology, the generator and
//! the sink's counter (see fwd.rs). An object of their own: the gateway's
//! object (main.rs) carries only what the loader attaches.
#![no_std]
#![no_main]

// The gateway's route lookup and packet parser, of which forwarding needs
// only a little.
#[allow(dead_code)]
mod fib;
mod fwd;
#[allow(dead_code)]
mod parse;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach this; it only exists
    // because no_std requires it.
    loop {}
}

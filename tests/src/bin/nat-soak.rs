//! `nat-soak [--minutes N]`: the soak of issue 14 (see `nat_lab::soak`):
//! mixed traffic through the real loader while it is handed over, killed
//! and restarted, its links flap and its table is pressed. Run it through
//! `cargo xtask soak`, which builds the loader first. Needs root. Prints a
//! summary; exits non-zero if the soak failed. Ctrl-C ends it early, with
//! the checks of what ran and the lab cleaned up.

use std::sync::atomic::Ordering;

use anyhow::{Context, Result, bail};
use nat_lab::soak::{self, Plan};

extern "C" fn on_signal(_: libc::c_int) {
    soak::STOP.store(true, Ordering::Relaxed);
}

fn main() -> Result<()> {
    let mut minutes = 30u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--minutes" => {
                minutes = args
                    .next()
                    .context("--minutes needs a number")?
                    .parse()
                    .context("--minutes needs a whole number")?;
            }
            "-h" | "--help" => {
                println!("usage: nat-soak [--minutes N]   (default 30)");
                return Ok(());
            }
            other => bail!("unknown argument {other:?} (usage: nat-soak [--minutes N])"),
        }
    }
    if minutes == 0 {
        bail!("--minutes must be at least 1");
    }
    // A handler (not a blocked mask, which the loaders would inherit):
    // reset to the default in the children it starts.
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let summary = soak::run(&Plan::minutes(minutes))?;
    println!("{summary}");
    let failures = summary.failures();
    if !failures.is_empty() {
        bail!("the soak failed: {}", failures.join("; "));
    }
    Ok(())
}

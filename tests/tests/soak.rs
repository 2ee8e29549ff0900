//! The soak's short mode (`nat_lab::soak`, `cargo xtask soak` for the long
//! one): about a minute and a half of mixed traffic while the loader is
//! handed over, killed, its links flap and its table is pressed; then no
//! stream broken or corrupted, no map entry leaked, the loader's memory
//! flat.

use nat_lab::soak::{self, Plan};

#[test]
fn a_short_soak_breaks_no_stream_leaks_no_entry_and_keeps_loader_memory_flat() {
    let summary = soak::run(&Plan::short()).expect("running the soak");
    eprintln!("{summary}");
    let failures = summary.failures();
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(summary.events.len(), 5, "each kind of event once");
}

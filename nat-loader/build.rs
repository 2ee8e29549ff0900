//! Embeds the eBPF object (built by `cargo xtask build-ebpf`) into the loader,
//! so `target/release/nat-loader` is one self-contained file.
//!
//! Without the object (a plain `cargo test` or `cargo clippy` on a fresh
//! checkout) it embeds an empty one and warns: the host unit tests need no
//! object, and loading the dataplane then fails with an error that says how
//! to build it ([`nat_loader::EBPF_OBJECT`]).

use std::{env, fs, path::PathBuf};

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../target"));
    let object = env::var_os("NAT_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir.join("bpfel-unknown-none/release/nat-ebpf"));
    println!("cargo:rerun-if-env-changed=NAT_EBPF_OBJECT");
    // A missing file counts as changed: the script runs again on every
    // build until the object is there.
    println!("cargo:rerun-if-changed={}", object.display());
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo")).join("nat-ebpf.o");
    if object.exists() {
        fs::copy(&object, &out).expect("copy the eBPF object into OUT_DIR");
    } else {
        println!(
            "cargo:warning=eBPF object {} not found: this loader cannot load the dataplane \
             (run `cargo xtask build`, or set NAT_EBPF_OBJECT)",
            object.display()
        );
        fs::write(&out, []).expect("write an empty eBPF object into OUT_DIR");
    }
}

//! Embeds the eBPF object (built by `cargo xtask build-ebpf`) into the loader,
//! so `target/release/nat-loader` is one self-contained file.

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
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.exists() {
        panic!(
            "eBPF object {} not found: run `cargo xtask build-ebpf` first (or set NAT_EBPF_OBJECT)",
            object.display()
        );
    }
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo")).join("nat-ebpf.o");
    fs::copy(&object, &out).expect("copy the eBPF object into OUT_DIR");
}

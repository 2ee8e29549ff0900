#!/usr/bin/env bash
# Installs, idempotently, everything the build, the tests and the demo need on
# a fresh Debian 12 machine: the Debian Rust toolchain that ships a prebuilt BPF
# `core`, LLVM 22 for bpf-linker, bpf-linker itself, and the lab's and the
# benchmark's tools.
# Each step is skipped when what it installs is already there.
set -euo pipefail

log() { printf 'bootstrap: %s\n' "$*" >&2; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

APT_PACKAGES=(
    rustc-web cargo-web libstd-rust-web-dev-bpf llvm-22-dev
    iproute2 ethtool iputils-ping socat iperf3 tcpdump python3 kmod
    # RFC conformance tests: traceroute through the gateway.
    traceroute
    # HA tests: the failover lab's load balancer, detaching programs.
    nftables bpftool
    # The benchmark (`cargo xtask bench`): the iptables baseline, the
    # charts. (Its traffic comes from its own eBPF generator.)
    iptables python3-matplotlib
    # The metrics test: a real Prometheus scrapes the lab gateway; promtool
    # checks the exposition.
    prometheus
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing apt packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    log "apt packages present"
fi

if [ ! -d /usr/lib/rustlib/bpfel-unknown-none ]; then
    log "error: /usr/lib/rustlib/bpfel-unknown-none missing after installing libstd-rust-web-dev-bpf" >&2
    exit 1
fi

CARGO_BIN="${CARGO_HOME:-$HOME/.cargo}/bin"
BPF_LINKER_VERSION="0.13.0"
if [ -x "$CARGO_BIN/bpf-linker" ] && "$CARGO_BIN/bpf-linker" --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
    log "bpf-linker $BPF_LINKER_VERSION present"
else
    log "building bpf-linker $BPF_LINKER_VERSION against LLVM 22 (takes a few minutes)"
    # Built with Debian's cargo so it links the same LLVM the BPF core was built with.
    LLVM_PREFIX=/usr/lib/llvm-22 RUSTC=/usr/bin/rustc /usr/bin/cargo install bpf-linker \
        --version "$BPF_LINKER_VERSION" --locked --no-default-features --features llvm-22 \
        --root "${CARGO_HOME:-$HOME/.cargo}"
fi

if ! mount | grep -q ' /sys/fs/bpf type bpf'; then
    log "mounting bpffs at /sys/fs/bpf"
    $SUDO mount -t bpf bpf /sys/fs/bpf || log "warning: could not mount bpffs"
fi

log "ready"

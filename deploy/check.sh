#!/usr/bin/env bash
# CI check of deploy/ and packaging/. Run from anywhere, as root, after
#   cargo xtask build-ebpf && cargo build --release -p nat-loader
# It installs what it needs (shellcheck, dpkg-dev, checkov in a venv under
# target/, cargo-deb), then:
#   1. builds the .deb from target/release/nat-loader (cargo deb --no-build)
#   2. inspects it with dpkg-deb: fields, files, unit, conffiles, binary; the
#      config file parses, sets nothing and has a key for every flag
#   3. systemd-analyze verify (and an offline security review) of the
#      packaged unit, in a root holding the package's files
#   4. the template/packaging wiring tests (deploy/tests, unittest)
#   5. checkov on deploy/, minus the checks in deploy/checkov-skips.txt
#   6. shellcheck on every *.sh of the repository
#   7. install.sh against the built .deb: really installs the package on this
#      machine (purged again afterwards) with a recording stand-in for
#      systemctl, so no service starts; then re-runs it to prove idempotence,
#      and resolves interfaces by MAC behind a stub metadata service in a
#      private network namespace
# Exits non-zero if any step fails; the last line is "N passed, N failed".
set -euo pipefail
shopt -s inherit_errexit

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# CARGO_TARGET_DIR is honoured like cargo and cargo-deb do.
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
WORK=$TARGET_DIR/deploy-check
BIN=$TARGET_DIR/release/nat-loader
CHECKOV_VERSION=3.3.30
CARGO_DEB_VERSION=3.8.0
PACKAGE=nat-loader
START=$SECONDS

log() { printf 'deploy-check: %s\n' "$*" >&2; }

[ "$(id -u)" -eq 0 ] || { log "must run as root (installs tools and, for the install test, the package)"; exit 1; }
mkdir -p "$WORK"

# --- tools ---------------------------------------------------------------------
apt_missing=()
for p in shellcheck dpkg-dev binutils iproute2 curl; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || apt_missing+=("$p")
done
if [ "${#apt_missing[@]}" -gt 0 ]; then
    log "apt-get install ${apt_missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${apt_missing[@]}" >/dev/null
fi

VENV=$WORK/venv
if ! "$VENV/bin/checkov" --version 2>/dev/null | grep -qx "$CHECKOV_VERSION"; then
    log "installing checkov $CHECKOV_VERSION into $VENV (about a minute)"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "checkov==$CHECKOV_VERSION"
fi

if ! cargo deb --version >/dev/null 2>&1; then
    log "installing cargo-deb $CARGO_DEB_VERSION (a few minutes)"
    cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked --quiet
fi
log "tools: $(shellcheck --version | sed -n 's/^version: /shellcheck /p'), checkov $("$VENV/bin/checkov" --version), $(cargo deb --version 2>&1 | head -1), $(systemd-analyze --version | head -1)"

# --- step runner -----------------------------------------------------------------
passed=()
failed=()
step() { # name function
    local name=$1 t0=$SECONDS
    shift
    log "=== $name"
    # A background subshell, not one in an `if`: there errexit would be off.
    (
        set -euo pipefail
        "$@"
    ) &
    if wait "$!"; then
        passed+=("$name")
        log "PASS $name ($((SECONDS - t0)) s)"
    else
        failed+=("$name")
        log "FAIL $name ($((SECONDS - t0)) s)"
    fi
}
fail() { # ends the step (its subshell) as failed
    log "  $*"
    exit 1
}

DEB=""

build_deb() {
    [ -x "$BIN" ] || fail "$BIN missing: run cargo xtask build-ebpf && cargo build --release -p nat-loader first"
    rm -rf "$WORK/deb"
    mkdir -p "$WORK/deb"
    cargo deb -p "$PACKAGE" --no-build --output "$WORK/deb/" >"$WORK/cargo-deb.log" 2>&1 \
        || { cat "$WORK/cargo-deb.log" >&2; fail "cargo deb failed"; }
    local debs=("$WORK"/deb/*.deb)
    { [ "${#debs[@]}" -eq 1 ] && [ -f "${debs[0]}" ]; } || fail "expected one .deb in $WORK/deb"
    log "  built ${debs[0]#"$ROOT"/}"
}

# The .text of two ELF files is equal: the package's (stripped) binary is the
# build's.
same_code() {
    objcopy -O binary --only-section=.text "$1" "$WORK/a.text"
    objcopy -O binary --only-section=.text "$2" "$WORK/b.text"
    cmp -s "$WORK/a.text" "$WORK/b.text"
}

inspect_deb() {
    local deb=$1 x=$WORK/extract
    rm -rf "$x"
    mkdir -p "$x"
    [ "$(dpkg-deb --field "$deb" Package)" = "$PACKAGE" ] || fail "Package is not $PACKAGE"
    [ "$(dpkg-deb --field "$deb" Architecture)" = amd64 ] || fail "Architecture is not amd64"
    dpkg-deb --field "$deb" Depends | grep -qw systemd || fail "does not depend on systemd"
    dpkg-deb --field "$deb" Depends | grep -qw libc6 || fail "does not depend on libc6"
    log "  $(dpkg-deb --field "$deb" Package Version Depends | tr '\n' ' ')"
    dpkg-deb --contents "$deb" >"$WORK/contents.txt"
    local want
    for want in './usr/bin/nat-loader' './usr/lib/systemd/system/nat-loader.service' \
        './etc/nat-loader/nat-loader.toml' './etc/nat-loader/nat-loader.env' \
        './usr/share/doc/nat-loader/nat-loader.toml'; do
        grep -q " $want\$" "$WORK/contents.txt" || fail "$want not in the package"
    done
    grep -Eq '^-rwxr-xr-x (root/root|0/0) .* ./usr/bin/nat-loader$' "$WORK/contents.txt" \
        || fail "usr/bin/nat-loader is not root-owned 0755"
    dpkg-deb --info "$deb" conffiles >"$WORK/conffiles"
    [ "$(sort "$WORK/conffiles" | tr '\n' ' ')" = "/etc/nat-loader/nat-loader.env /etc/nat-loader/nat-loader.toml " ] \
        || fail "conffiles is '$(tr '\n' ' ' <"$WORK/conffiles")', expected nat-loader.env and nat-loader.toml"
    dpkg-deb --extract "$deb" "$x"
    cmp "$x/usr/lib/systemd/system/nat-loader.service" packaging/nat-loader.service \
        || fail "packaged unit differs from packaging/nat-loader.service"
    cmp "$x/etc/nat-loader/nat-loader.env" packaging/nat-loader.env \
        || fail "packaged env file differs from packaging/nat-loader.env"
    cmp "$x/etc/nat-loader/nat-loader.toml" packaging/nat-loader.toml \
        || fail "packaged config file differs from packaging/nat-loader.toml"
    cmp "$x/usr/share/doc/nat-loader/nat-loader.toml" packaging/nat-loader.toml \
        || fail "the config file's reference copy differs from packaging/nat-loader.toml"
    # Shipped with every key commented out: it parses, and sets nothing.
    toml_keys "$x/etc/nat-loader/nat-loader.toml" >"$WORK/packaged-keys" \
        || fail "the packaged config file is not valid TOML"
    [ ! -s "$WORK/packaged-keys" ] || fail "the packaged config file sets $(tr '\n' ' ' <"$WORK/packaged-keys")"
    # ... and lists a key for every flag of the built loader.
    local flag
    for flag in $("$BIN" --help | sed -n 's/^ *--\([a-z-]*\).*/\1/p' | grep -vx 'config\|help\|version'); do
        grep -Eq "^# $flag = " "$x/etc/nat-loader/nat-loader.toml" || fail "the packaged config file has no key $flag"
    done
    same_code "$x/usr/bin/nat-loader" "$BIN" || fail "packaged binary's code differs from $BIN"
    log "  files, unit, config and env file, conffiles and binary OK"
}

# The keys a TOML file sets, as key=value lines (fails if it is not TOML).
toml_keys() {
    python3 -c '
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    for k, v in tomllib.load(f).items():
        print(f"{k}={v}")' "$1"
}

verify_unit() {
    local deb=$1 r=$WORK/unitroot out
    rm -rf "$r"
    mkdir -p "$r/usr/lib/systemd/system"
    dpkg-deb --extract "$deb" "$r"
    # The units the service refers to (network-online.target, ...): the host's.
    cp -an /lib/systemd/system/. "$r/usr/lib/systemd/system/"
    ln -sfn usr/lib "$r/lib"
    # ExecReload's /bin/kill comes from an essential package (procps), on
    # every host the .deb installs on: the host's, as for the units.
    mkdir -p "$r/bin"
    cp -a /bin/kill "$r/bin/kill"
    # Verified against the package's own files: ExecStart's binary must exist
    # and be executable inside the root.
    out=$(systemd-analyze verify --root="$r" "$r/usr/lib/systemd/system/nat-loader.service" 2>&1) \
        || { printf '%s\n' "$out" >&2; fail "systemd-analyze verify failed"; }
    [ -z "$out" ] || { printf '%s\n' "$out" >&2; fail "systemd-analyze verify warned"; }
    # Rejects a unit whose ExecStart binary is missing, so the check is real.
    rm "$r/usr/bin/nat-loader"
    if systemd-analyze verify --root="$r" "$r/usr/lib/systemd/system/nat-loader.service" >/dev/null 2>&1; then
        fail "systemd-analyze verify does not notice a missing binary: the check is not effective"
    fi
    # --threshold counts in tenths: 50 is an overall exposure of 5.0 ("MEDIUM").
    out=$(systemd-analyze security --offline=yes --root="$r" --threshold=50 \
        "$r/usr/lib/systemd/system/nat-loader.service" 2>&1) \
        || { printf '%s\n' "$out" >&2; fail "security exposure above 5.0"; }
    log "  verify clean; $(printf '%s\n' "$out" | grep -i 'overall exposure' | sed 's/\x1b\[[0-9;]*m//g')"
}

wiring_tests() {
    NAT_DEB=$1 PYTHONDONTWRITEBYTECODE=1 python3 -m unittest discover -s deploy/tests -t deploy/tests -v
}

checkov_scan() {
    local skips=() id reason line
    while IFS= read -r line; do
        case "$line" in '' | '#'*) continue ;; esac
        read -r id reason <<<"$line"
        [[ "$id" =~ ^CKV2?_[A-Z0-9_]+$ ]] || fail "checkov-skips.txt: bad check id '$id'"
        [ -n "$reason" ] || fail "checkov-skips.txt: $id has no reason"
        skips+=("$id")
    done <deploy/checkov-skips.txt
    local args=(-d deploy --quiet --compact --skip-download)
    [ "${#skips[@]}" -eq 0 ] || args+=(--skip-check "$(
        IFS=,
        echo "${skips[*]}"
    )")
    log "  skipping ${skips[*]:-nothing} (see deploy/checkov-skips.txt)"
    # checkov reaches out to its vendor's API unless told not to; --skip-download
    # tells it, and a private network namespace makes sure (this machine may
    # talk to package registries only).
    local runner=()
    if unshare -n true 2>/dev/null; then
        runner=(unshare -n)
    else
        export HTTPS_PROXY=http://127.0.0.1:9 HTTP_PROXY=http://127.0.0.1:9
    fi
    "${runner[@]}" "$VENV/bin/checkov" "${args[@]}" 2>"$WORK/checkov.stderr"
}

shellcheck_all() {
    local scripts=()
    mapfile -t scripts < <(find . -name '*.sh' -not -path './target/*' -not -path './.git/*' | sort)
    [ "${#scripts[@]}" -gt 0 ] || fail "no scripts found"
    log "  ${scripts[*]}"
    shellcheck -x "${scripts[@]}"
}

# A stand-in for systemctl: records every call and keeps enabled/active state
# in files, so install.sh's logic runs without starting anything.
make_fake_systemctl() {
    local dir=$WORK/fake
    rm -rf "$dir"
    mkdir -p "$dir/state"
    cat >"$dir/systemctl" <<EOF
#!/usr/bin/env bash
set -euo pipefail
echo "\$*" >>"$dir/calls"
state=$dir/state
args=()
for a in "\$@"; do [[ "\$a" == --* ]] || args+=("\$a"); done
case "\${args[0]}" in
    daemon-reload) ;;
    enable) touch "\$state/enabled.\${args[1]}" ;;
    start | restart) touch "\$state/active.\${args[1]}" ;;
    is-enabled) [ -e "\$state/enabled.\${args[1]}" ] ;;
    is-active) [ -e "\$state/active.\${args[1]}" ] ;;
    status) echo "fake systemctl: \${args[1]}" ;;
    *) echo "fake systemctl: unexpected \$*" >&2; exit 1 ;;
esac
EOF
    chmod +x "$dir/systemctl"
}

install_run() { # label, then install.sh arguments
    local label=$1
    shift
    : >"$WORK/fake/calls"
    log "  install.sh run: $label"
    SYSTEMCTL=$WORK/fake/systemctl bash deploy/azure/install.sh --log "$WORK/install.log" "$@" \
        >>"$WORK/install.out" 2>&1 || { tail -30 "$WORK/install.out" >&2; fail "install.sh failed ($label)"; }
}

calls_match() { grep -qx "$1" "$WORK/fake/calls" || fail "install.sh did not call systemctl $1 (calls: $(tr '\n' ';' <"$WORK/fake/calls"))"; }
calls_lack() { ! grep -Eq "$1" "$WORK/fake/calls" || fail "install.sh called systemctl $(grep -E "$1" "$WORK/fake/calls" | head -1) needlessly"; }

install_test() {
    local deb=$1 version
    version=$(dpkg-deb --field "$deb" Version)
    rm -f "$WORK/install.log" "$WORK/install.out"
    make_fake_systemctl

    # 1. fresh install
    install_run "fresh install" --deb "$deb" --ext natchk-ext --int natchk-int \
        --loader-args "--probe-port 9999" --skip-interface-check
    [ "$(dpkg-query -W -f='${db:Status-Abbrev}${Version}' "$PACKAGE")" = "ii $version" ] \
        || fail "$PACKAGE $version is not installed after install.sh"
    same_code /usr/bin/nat-loader "$BIN" || fail "/usr/bin/nat-loader is not the built binary"
    cmp -s /usr/lib/systemd/system/nat-loader.service packaging/nat-loader.service || fail "installed unit differs"
    [ "$(toml_keys /etc/nat-loader/nat-loader.toml | tr '\n' ' ')" = "ext=natchk-ext int=natchk-int " ] \
        || fail "config file sets '$(toml_keys /etc/nat-loader/nat-loader.toml | tr '\n' ' ')', expected ext and int"
    grep -qx 'NAT_LOADER_ARGS="--probe-port 9999"' /etc/nat-loader/nat-loader.env || fail "env file lacks the args"
    ! grep -q '^NAT_EXT_IF\|^NAT_INT_IF' /etc/nat-loader/nat-loader.env || fail "env file still names the interfaces"
    calls_match "daemon-reload"
    calls_match "enable nat-loader.service"
    calls_match "start nat-loader.service"
    log "  fresh install: package $version installed, settings written, service enabled and started"

    # 2. the same again: nothing changes, nothing restarts
    local dpkg_status_before
    dpkg_status_before=$(stat -c %Y /var/lib/dpkg/status)
    install_run "same again" --deb "$deb" --ext natchk-ext --int natchk-int \
        --loader-args "--probe-port 9999" --skip-interface-check
    [ "$(stat -c %Y /var/lib/dpkg/status)" = "$dpkg_status_before" ] || fail "second run touched dpkg"
    calls_lack '^(daemon-reload|enable|start|restart|stop)( |$)'
    grep -q 'already installed: not reinstalling' "$WORK/install.log" || fail "log does not say it skipped the install"
    grep -q 'left alone' "$WORK/install.log" || fail "log does not say the service was left alone"
    log "  second run: no reinstall, no restart"

    # 3. changed settings: rewritten, service restarted, package not reinstalled
    install_run "new settings" --deb "$deb" --ext natchk-ext --int natchk-int \
        --loader-args "--probe-port 9999 --max-flows 1000" --skip-interface-check
    [ "$(stat -c %Y /var/lib/dpkg/status)" = "$dpkg_status_before" ] || fail "settings change reinstalled the package"
    grep -qx 'NAT_LOADER_ARGS="--probe-port 9999 --max-flows 1000"' /etc/nat-loader/nat-loader.env \
        || fail "new args not written"
    calls_match "restart nat-loader.service"
    log "  settings change: env rewritten, service restarted, package kept"

    # 3a. files of a package from before the config file (interfaces in the
    #     env file, the packaged config file untouched), same settings: the
    #     files are rewritten in the current layout, nothing restarts.
    printf '%s\n' NAT_EXT_IF=natchk-ext NAT_INT_IF=natchk-int \
        'NAT_LOADER_ARGS="--probe-port 9999 --max-flows 1000"' >/etc/nat-loader/nat-loader.env
    cp packaging/nat-loader.toml /etc/nat-loader/nat-loader.toml
    : >"$WORK/install.log"
    install_run "older layout" --deb "$deb" --ext natchk-ext --int natchk-int \
        --loader-args "--probe-port 9999 --max-flows 1000" --skip-interface-check
    calls_lack '^(start|restart|stop)( |$)'
    grep -q 'settings unchanged' "$WORK/install.log" || fail "log does not say the settings are unchanged"
    toml_keys /etc/nat-loader/nat-loader.toml | grep -qx 'ext=natchk-ext' || fail "ext not moved to the config file"
    ! grep -q '^NAT_EXT_IF' /etc/nat-loader/nat-loader.env || fail "env file not rewritten"
    log "  older layout: interfaces moved to the config file, service not restarted"

    # 3b. a new package, same settings, service running: the package's
    #     postinst hands the dataplane over (SIGUSR2); install.sh must not
    #     restart it, which would lose every flow. (Forgetting the installed
    #     file's checksum makes the same .deb count as a new one.)
    rm -f /var/lib/nat-loader-install/package.sha256
    : >"$WORK/install.log"
    install_run "package upgrade" --deb "$deb" --ext natchk-ext --int natchk-int \
        --loader-args "--probe-port 9999 --max-flows 1000" --skip-interface-check
    grep -q "installing $PACKAGE $version" "$WORK/install.log" || fail "the package was not reinstalled"
    calls_lack '^(start|restart|stop)( |$)'
    grep -q 'handed over to the new binary' "$WORK/install.log" || fail "log does not say the package handed over"
    log "  package upgrade: reinstalled, service handed over by postinst, not restarted"

    # 4. accelerated networking, in a private network namespace: a "VF" that
    #    shares the synthetic NIC's MAC and has it as master must be skipped
    #    when 'auto' resolves the NICs from the metadata service (stubbed on
    #    the namespace's loopback), and refused when named. Bridges stand in
    #    for the synthetic NICs, veths enslaved to them for the VFs.
    # shellcheck disable=SC2016 # the script's $ are the inner shell's
    unshare --net --mount --propagation private bash -euo pipefail -c '
        work=$1 deb=$2
        mount -t sysfs sysfs /sys # the interfaces of this namespace in /sys/class/net
        ip link set lo up
        ip link add syn0 address 02:00:5e:00:53:10 type bridge
        ip link add syn1 address 02:00:5e:00:53:11 type bridge
        ip link add vf0 address 02:00:5e:00:53:10 type veth peer name vf0peer
        ip link add vf1 address 02:00:5e:00:53:11 type veth peer name vf1peer
        ip link set vf0 master syn0
        ip link set vf1 master syn1
        mkdir -p "$work/imds/metadata/instance/network"
        printf "%s" "[{\"macAddress\":\"02005E005310\",\"ipv4\":{\"ipAddress\":[{\"privateIpAddress\":\"10.0.1.5\"}],\"subnet\":[{\"address\":\"10.0.1.0\",\"prefix\":\"24\"}]}},{\"macAddress\":\"02005E005311\",\"ipv4\":{\"ipAddress\":[{\"privateIpAddress\":\"10.0.2.5\"}],\"subnet\":[{\"address\":\"10.0.2.0\",\"prefix\":\"24\"}]}}]" \
            >"$work/imds/metadata/instance/network/interface"
        python3 -m http.server 18169 --bind 127.0.0.1 --directory "$work/imds" >/dev/null 2>&1 &
        server=$!
        trap "kill $server" EXIT
        for _ in $(seq 50); do curl -fs -o /dev/null "http://127.0.0.1:18169/metadata/instance/network/interface" && break; sleep 0.1; done
        : >"$work/fake/calls"
        NAT_IMDS_URL=http://127.0.0.1:18169 SYSTEMCTL=$work/fake/systemctl bash deploy/azure/install.sh \
            --log "$work/install.log" --deb "$deb" --ext auto --int auto >>"$work/install.out" 2>&1
        grep -qx "ext = \"syn0\"" /etc/nat-loader/nat-loader.toml
        grep -qx "int = \"syn1\"" /etc/nat-loader/nat-loader.toml
        if SYSTEMCTL=$work/fake/systemctl bash deploy/azure/install.sh --log "$work/install.log" \
            --deb "$deb" --ext vf0 --int syn1 >>"$work/install.out" 2>&1; then
            echo "install.sh accepted the enslaved VF vf0" >&2
            exit 1
        fi
        grep -q "vf0 is enslaved to syn0" "$work/install.log"
    ' _ "$WORK" "$deb" || { tail -30 "$WORK/install.out" >&2; fail "MAC resolution / VF refusal failed"; }
    log "  'auto' picked the synthetic NICs syn0/syn1 over their VFs; a named VF was refused"
}

cleanup_install() {
    if [ "${PREINSTALLED:-1}" -eq 0 ] && dpkg-query -W "$PACKAGE" >/dev/null 2>&1; then
        log "purging the $PACKAGE package the install test installed"
        dpkg --purge "$PACKAGE" >/dev/null 2>&1 || log "warning: dpkg --purge $PACKAGE failed"
        rm -rf /var/lib/nat-loader-install /var/cache/nat-loader-install
    fi
}

# --- run --------------------------------------------------------------------------
step "cargo deb (package the release build)" build_deb
debs=("$WORK"/deb/*.deb)
if [ -f "${debs[0]}" ]; then
    DEB=${debs[0]}
fi

if [ -n "$DEB" ]; then
    step "dpkg-deb inspection" inspect_deb "$DEB"
    step "systemd-analyze verify" verify_unit "$DEB"
else
    failed+=("dpkg-deb inspection (no .deb)" "systemd-analyze verify (no .deb)")
fi
step "template and packaging wiring tests" wiring_tests "$DEB"
step "checkov on deploy/" checkov_scan
step "shellcheck" shellcheck_all
if [ -n "$DEB" ]; then
    if dpkg-query -W -f='${db:Status-Abbrev}' "$PACKAGE" 2>/dev/null | grep -q '^ii'; then
        PREINSTALLED=1
        log "note: $PACKAGE was installed before this check; it stays installed (at the built version)"
    else
        PREINSTALLED=0
    fi
    trap cleanup_install EXIT
    step "install.sh against the built .deb" install_test "$DEB"
    cleanup_install
    trap - EXIT
else
    failed+=("install.sh against the built .deb (no .deb)")
fi

log "=== summary ($((SECONDS - START)) s)"
for s in "${passed[@]}"; do log "  passed: $s"; done
for s in "${failed[@]}"; do log "  FAILED: $s"; done
echo "deploy-check: ${#passed[@]} passed, ${#failed[@]} failed"
[ "${#failed[@]}" -eq 0 ]

#!/usr/bin/env bash
# Installs the nat-loader package on a NAT instance, configures it (the
# interfaces in /etc/nat-loader/nat-loader.toml, further flags in
# /etc/nat-loader/nat-loader.env) and starts its service. Idempotent: a second run with the same package and settings
# changes nothing and restarts nothing. Everything it does goes to the log
# (/var/log/nat-loader-install.log by default) as well as to stderr.
#
# The Azure template (azuredeploy.json) embeds this script and runs it through
# the custom-script extension as
#   install.sh --package-url URL --ext auto --int auto --int-policy-routing \
#              --loader-args "--probe-port 9999"
#
# Usage: install.sh (--deb FILE | --package-url URL) [options]
#   --deb FILE              install this .deb (as built by `cargo deb -p nat-loader`)
#   --package-url URL       download the .deb from URL (e.g. a release asset)
#   --ext IF|auto           external interface (default eth0)
#   --int IF|auto           internal interface (default eth1)
#                           auto: the VM's first/second NIC per the Azure
#                           instance metadata service, resolved by MAC to the
#                           synthetic (hv_netvsc) interface, never to the
#                           accelerated-networking VF enslaved under it
#   --loader-args "ARGS"    further nat-loader flags (NAT_LOADER_ARGS in the env
#                           file; they override the config file's keys)
#   --int-policy-routing    route replies from the internal NIC's own address
#                           (load balancer probes) back out of the internal NIC
#                           (netplan drop-in; needs the metadata service)
#   --skip-interface-check  do not require the interfaces to exist now
#   --log FILE              log file (default /var/log/nat-loader-install.log)
# Environment: SYSTEMCTL      the systemctl command (default systemctl); the CI
#                             test points it at a recorder, so that no real
#                             service starts on the CI machine
#              NAT_IMDS_URL  base URL of the instance metadata service (default
#                             http://169.254.169.254; the CI test's is a stub)
set -euo pipefail
shopt -s inherit_errexit # a failing $(...) fails the script too

readonly PACKAGE=nat-loader
readonly UNIT=nat-loader.service
readonly ENV_FILE=/etc/nat-loader/nat-loader.env
readonly CONFIG_FILE=/etc/nat-loader/nat-loader.toml
readonly STATE_DIR=/var/lib/nat-loader-install
readonly CACHE_DIR=/var/cache/nat-loader-install
readonly NETPLAN_FILE=/etc/netplan/60-nat-loader-int.yaml
readonly NETPLAN_EXT_FILE=/etc/netplan/60-nat-loader-ext.yaml
readonly IMDS=${NAT_IMDS_URL:-http://169.254.169.254}/metadata/instance/network/interface
readonly IMDS_API=api-version=2021-02-01

deb=""
package_url=""
ext_if=eth0
int_if=eth1
loader_args=""
policy_routing=0
check_interfaces=1
log_file=/var/log/nat-loader-install.log
read -r -a systemctl_cmd <<<"${SYSTEMCTL:-systemctl}"

log() { printf '%s install.sh: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}
usage() {
    sed -n '/^# Usage:/,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
    exit 2
}
need_arg() { [ "$#" -ge 2 ] || die "$1 needs a value"; }

while [ "$#" -gt 0 ]; do
    case "$1" in
        --deb) need_arg "$@"; deb=$2; shift 2 ;;
        --package-url) need_arg "$@"; package_url=$2; shift 2 ;;
        --ext) need_arg "$@"; ext_if=$2; shift 2 ;;
        --int) need_arg "$@"; int_if=$2; shift 2 ;;
        --loader-args) need_arg "$@"; loader_args=$2; shift 2 ;;
        --int-policy-routing) policy_routing=1; shift ;;
        --skip-interface-check) check_interfaces=0; shift ;;
        --log) need_arg "$@"; log_file=$2; shift 2 ;;
        -h | --help) usage ;;
        *) log "unknown argument: $1"; usage ;;
    esac
done

[ "$(id -u)" -eq 0 ] || die "must run as root"
if { [ -n "$deb" ] && [ -n "$package_url" ]; } || { [ -z "$deb" ] && [ -z "$package_url" ]; }; then
    die "give exactly one of --deb FILE and --package-url URL"
fi

mkdir -p "$(dirname "$log_file")"
exec 2> >(tee -a "$log_file" >&2)
log "start: pid $$, args: deb=${deb:-} url=${package_url:-} ext=$ext_if int=$int_if loader-args='$loader_args' policy-routing=$policy_routing"

systemctl_run() {
    log "run: ${systemctl_cmd[*]} $*"
    "${systemctl_cmd[@]}" "$@"
}

apt_install() {
    # apt-get resolves the package's dependencies; a stale package list gets
    # one refresh and a retry.
    local opts=(-y -q -o Dpkg::Options::=--force-confold --allow-downgrades)
    if ! DEBIAN_FRONTEND=noninteractive apt-get install "${opts[@]}" "$@" >&2; then
        log "apt-get install failed; refreshing package lists and retrying"
        apt-get update -q >&2
        DEBIAN_FRONTEND=noninteractive apt-get install "${opts[@]}" "$@" >&2
    fi
}

# --- 1. the package file ----------------------------------------------------
if [ -n "$package_url" ]; then
    if ! command -v curl >/dev/null 2>&1; then
        log "installing curl to download the package"
        apt_install curl
    fi
    mkdir -p "$CACHE_DIR"
    deb="$CACHE_DIR/${PACKAGE}.deb"
    log "downloading $package_url"
    curl -fsSL --retry 10 --retry-delay 3 --retry-connrefused -o "$deb.part" "$package_url" \
        || die "download of $package_url failed"
    mv -f "$deb.part" "$deb"
fi
[ -f "$deb" ] || die "no such package file: $deb"
deb=$(readlink -f "$deb")
deb_name=$(dpkg-deb --field "$deb" Package) || die "$deb is not a Debian package"
[ "$deb_name" = "$PACKAGE" ] || die "$deb holds package '$deb_name', expected '$PACKAGE'"
deb_version=$(dpkg-deb --field "$deb" Version)
deb_sha=$(sha256sum "$deb" | cut -d' ' -f1)
log "package file $deb: $PACKAGE $deb_version (sha256 $deb_sha)"

# --- 2. interfaces ------------------------------------------------------------
imds_json=""
if [ "$ext_if" = auto ] || [ "$int_if" = auto ] || [ "$policy_routing" -eq 1 ]; then
    log "asking the instance metadata service for the NICs"
    imds_json=$(curl -fsS --noproxy '*' --retry 5 --retry-delay 2 -H Metadata:true "$IMDS?$IMDS_API") \
        || die "the instance metadata service did not answer (needed by 'auto' and --int-policy-routing)"
fi

# Field of NIC number $1 (0 = primary) from the metadata service.
imds_nic_field() {
    printf '%s' "$imds_json" | python3 -c '
import json, sys
nic = json.load(sys.stdin)[int(sys.argv[1])]
v4 = nic["ipv4"]
print({"mac": nic["macAddress"],
       "ip": v4["ipAddress"][0]["privateIpAddress"],
       "subnet": v4["subnet"][0]["address"],
       "prefix": v4["subnet"][0]["prefix"]}[sys.argv[2]])' "$1" "$2"
}

# The interface that owns MAC $1 and is not enslaved to another one: with
# accelerated networking the Mellanox VF carries the same MAC as the synthetic
# hv_netvsc interface and has it as its master; the loader must use the latter.
iface_by_mac() {
    local want dev name
    want=$(printf '%s' "$1" | tr -d ':-' | tr '[:upper:]' '[:lower:]' | sed 's/../&:/g; s/:$//')
    for dev in /sys/class/net/*; do
        name=${dev##*/}
        [ "$(cat "$dev/address" 2>/dev/null)" = "$want" ] || continue
        [ -e "$dev/master" ] && continue
        printf '%s\n' "$name"
        return 0
    done
    die "no interface with MAC $want"
}

resolve_iface() { # role nic-index name
    if [ "$3" = auto ]; then
        local mac name
        mac=$(imds_nic_field "$2" mac)
        name=$(iface_by_mac "$mac")
        log "$1 interface: NIC $2 of the metadata service is $name"
        printf '%s\n' "$name"
    else
        printf '%s\n' "$3"
    fi
}

check_iface() { # role name
    local dev=/sys/class/net/$2
    if [ ! -e "$dev" ]; then
        [ "$check_interfaces" -eq 1 ] || { log "$1 interface $2 not present (check skipped)"; return 0; }
        die "$1 interface $2 does not exist"
    fi
    if [ -e "$dev/master" ]; then
        die "$1 interface $2 is enslaved to $(basename "$(readlink -f "$dev/master")"): it is an accelerated-networking VF; use its master"
    fi
    log "$1 interface $2: driver $(basename "$(readlink -f "$dev/device/driver" 2>/dev/null || echo none)")"
}

ext_if=$(resolve_iface external 0 "$ext_if")
int_if=$(resolve_iface internal 1 "$int_if")
[ "$ext_if" != "$int_if" ] || die "external and internal interface are both $ext_if"
check_iface external "$ext_if"
check_iface internal "$int_if"
for v in "$ext_if" "$int_if" "$loader_args"; do
    case "$v" in *[\"\'\\\$\`]*) die "quotes, backslashes and \$ are not allowed in settings: $v" ;; esac
done

# --- 3. settings (conffiles: apt keeps them on upgrades) -----------------------
# Written before the package is installed, so that an upgrade's handover
# (see 4.) starts the new binary with them. The interfaces go into the config
# file; the flags stay flags: the env file's NAT_LOADER_ARGS, which the unit's
# ExecStart passes on and which override the config file's keys.
changed=0
settings_changed=0

# The interfaces and flags the service runs with, as "ext int args": the
# config file's ext and int, or (files of a package from before the config
# file) the env file's NAT_EXT_IF and NAT_INT_IF; the env file's flags.
current_settings() {
    local ext int args
    ext=$(sed -n 's/^ext = "\(.*\)"$/\1/p' "$CONFIG_FILE" 2>/dev/null || true)
    int=$(sed -n 's/^int = "\(.*\)"$/\1/p' "$CONFIG_FILE" 2>/dev/null || true)
    [ -n "$ext" ] || ext=$(sed -n 's/^NAT_EXT_IF=//p' "$ENV_FILE" 2>/dev/null || true)
    [ -n "$int" ] || int=$(sed -n 's/^NAT_INT_IF=//p' "$ENV_FILE" 2>/dev/null || true)
    args=$(sed -n 's/^NAT_LOADER_ARGS="\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$ENV_FILE" 2>/dev/null || true)
    printf '%s %s %s\n' "$ext" "$int" "$args"
}

new_config=$(mktemp)
new_env=$(mktemp)
trap 'rm -f "$new_config" "$new_env"' EXIT
cat >"$new_config" <<EOF
# Written by deploy/azure/install.sh; a re-run rewrites it. Every key, with
# its default: /usr/share/doc/nat-loader/nat-loader.toml. The flags in
# NAT_LOADER_ARGS ($ENV_FILE) override these keys.
ext = "$ext_if"
int = "$int_if"
EOF
cat >"$new_env" <<EOF
# Written by deploy/azure/install.sh; a re-run rewrites it.
# The settings are in $CONFIG_FILE; these nat-loader flags override its keys.
NAT_LOADER_ARGS="$loader_args"
EOF
before=$(current_settings)
for file in "$CONFIG_FILE" "$ENV_FILE"; do
    new=$new_config
    [ "$file" = "$CONFIG_FILE" ] || new=$new_env
    if cmp -s "$new" "$file"; then
        log "$file already up to date"
    else
        install -D -m 0644 "$new" "$file"
        changed=1
        log "wrote $file"
    fi
done
if [ "$(current_settings)" != "$before" ]; then
    settings_changed=1
    log "new settings: ext=$ext_if int=$int_if args='$loader_args' (were: '$before')"
elif [ "$changed" -eq 1 ]; then
    # Files of an older package: the same settings in the current layout.
    log "settings unchanged (ext=$ext_if int=$int_if args='$loader_args'); files rewritten"
fi

# --- 4. install it unless this very file is installed already -----------------
# On an upgrade of a running service the package's postinst hands the pinned
# dataplane over to the new binary (SIGUSR2), which reads the settings above.
package_changed=0
installed_version=$(dpkg-query -W -f='${db:Status-Status} ${Version}' "$PACKAGE" 2>/dev/null || true)
installed_sha=$(cat "$STATE_DIR/package.sha256" 2>/dev/null || true)
if [ "$installed_version" = "installed $deb_version" ] && [ "$installed_sha" = "$deb_sha" ]; then
    log "$PACKAGE $deb_version from this file is already installed: not reinstalling"
else
    log "installing $PACKAGE $deb_version (was: ${installed_version:-not installed})"
    apt_install "$deb"
    mkdir -p "$STATE_DIR"
    printf '%s\n' "$deb_sha" >"$STATE_DIR/package.sha256"
    changed=1
    package_changed=1
    log "installed $PACKAGE $(dpkg-query -W -f='${Version}' "$PACKAGE")"
fi

# Installs netplan file $2 from temporary file $1 and applies it, unless it
# holds that already; $3 says what it sets, for the log.
install_plan() {
    if cmp -s "$1" "$2"; then
        log "$2 already up to date"
        rm -f "$1"
    else
        install -D -m 0600 "$1" "$2"
        rm -f "$1"
        log "wrote $2 ($3); applying"
        netplan apply
    fi
}

# --- 5. replies from the internal NIC leave through it -------------------------
if [ "$policy_routing" -eq 1 ]; then
    int_ip=$(imds_nic_field 1 ip)
    int_gw=$(python3 -c 'import ipaddress, sys; print(ipaddress.ip_network(sys.argv[1], strict=False)[1])' \
        "$(imds_nic_field 1 subnet)/$(imds_nic_field 1 prefix)")
    new_plan=$(mktemp)
    cat >"$new_plan" <<EOF
# Written by nat-loader's install.sh: traffic from the internal NIC's own
# address (replies to the internal load balancer's health probes) leaves
# through the internal NIC, not the primary one.
network:
  version: 2
  ethernets:
    $int_if:
      routes:
        - to: 0.0.0.0/0
          via: $int_gw
          table: 200
      routing-policy:
        - from: $int_ip/32
          table: 200
EOF
    install_plan "$new_plan" "$NETPLAN_FILE" "from $int_ip via $int_gw, table 200"
fi

# --- 5b. the external NIC's further IP configurations: the SNAT pool -----------
# Azure's DHCP configures only a NIC's primary address; the template's further
# IP configurations (publicIpConfigsPerInstance) each have a private address
# with a public IP of its own, which the loader's `--snat-ip auto` pools once
# they are on the interface.
if [ -n "$imds_json" ]; then
    ext_extra=$(printf '%s' "$imds_json" | python3 -c '
import json, sys
v4 = json.load(sys.stdin)[0]["ipv4"]
prefix = v4["subnet"][0]["prefix"]
for a in v4["ipAddress"][1:]:
    print(a["privateIpAddress"] + "/" + str(prefix))')
    if [ -n "$ext_extra" ]; then
        new_plan=$(mktemp)
        {
            printf '%s\n' "# Written by nat-loader's install.sh: the external NIC's further addresses" \
                "# (the SNAT pool of --snat-ip auto)." "network:" "  version: 2" "  ethernets:" \
                "    $ext_if:" "      addresses:"
            printf '%s\n' "$ext_extra" | sed 's/^/        - /'
        } >"$new_plan"
        install_plan "$new_plan" "$NETPLAN_EXT_FILE" "$(printf '%s' "$ext_extra" | tr '\n' ' ')"
    fi
fi

# --- 6. the service -------------------------------------------------------------
if [ "$changed" -eq 1 ]; then
    systemctl_run daemon-reload
fi
if systemctl_run is-enabled --quiet "$UNIT"; then
    log "$UNIT already enabled"
else
    systemctl_run enable "$UNIT"
fi
if ! systemctl_run is-active --quiet "$UNIT"; then
    systemctl_run start "$UNIT"
elif [ "$settings_changed" -eq 1 ]; then
    # New flags need a new process, and a handover could not adopt a
    # dataplane of another shape (--max-flows): a clean restart, which
    # loses the flows through this instance. Drain it first to avoid that.
    log "settings changed: restarting $UNIT (its flows are lost)"
    systemctl_run restart "$UNIT"
elif [ "$package_changed" -eq 1 ]; then
    # The package's postinst has handed the pinned dataplane over to the
    # new binary (SIGUSR2, exit 75, restarted by systemd): flows kept. A
    # restart here would tear that dataplane down again.
    log "package upgraded: $UNIT was handed over to the new binary by the package, not restarted"
else
    log "$UNIT already running with these settings: left alone"
fi

for _ in 1 2 3 4 5; do
    sleep 1
    "${systemctl_cmd[@]}" is-active --quiet "$UNIT" || break
done
if ! "${systemctl_cmd[@]}" is-active --quiet "$UNIT"; then
    "${systemctl_cmd[@]}" status --no-pager "$UNIT" >&2 || true
    die "$UNIT is not running"
fi
log "done: $UNIT is running ($PACKAGE $deb_version, ext=$ext_if int=$int_if)"

#!/usr/bin/env bash
# Checks that the README's first command works on a fresh machine of the
# kind vmsnapfs is developed on (Debian 12 with bookworm-backports, where
# qemu-utils 10.0.2 comes preinstalled and no qemu-system-x86):
#  1. puts this machine in that state: qemu-utils 10.0.2 from
#     bookworm-backports installed with apt; qemu-system-x86,
#     qemu-system-common, fuse3, restic, libvirt, tini, cpio and kmod
#     removed; the unpacked QEMU 10
#     ($VMSNAPFS_QEMU10, default /opt/vmsnapfs/qemu-10) removed;
#  2. runs scripts/install-deps.sh, as a new user would;
#  3. checks that QEMU 7.2 is on PATH, QEMU 10.0 in its prefix, that a VM
#     of each starts (firmware found) and answers QMP, that fusermount3
#     and restic run, that libvirt 9.0 (libvirtd, its QEMU driver,
#     virsh), tini and the libvirt-qemu user are there, and cpio, depmod
#     and modprobe (the real test guest's build).
# It changes installed packages: it runs as root only, and refuses while
# any QEMU runs or a FUSE file system is mounted (someone is using them).
# `--check-only` does step 3 alone, changing nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
QEMU10=${VMSNAPFS_QEMU10:-/opt/vmsnapfs/qemu-10}
export DEBIAN_FRONTEND=noninteractive

say() { echo "check-fresh-machine: $*"; }
fail() { say "FAILED: $*" >&2; exit 1; }

check_only=false
[ "${1:-}" = "--check-only" ] && check_only=true

# The first line of a command's --version ("" when it does not run).
version() {
    local out
    out=$("$@" --version 2>/dev/null) || return 0
    echo "${out%%$'\n'*}"
}

if ! $check_only; then
[ "$(id -u)" -eq 0 ] || fail "must run as root (it installs and removes packages)"

# Nothing may be using QEMU or FUSE while packages change under it.
busy() {
    local procs mounts
    procs=$(pgrep -a 'qemu-' || true)
    mounts=$(awk '$3 ~ /^fuse/ {print $2}' /proc/mounts)
    if [ -n "$procs$mounts" ]; then
        printf '%s\n%s\n' "$procs" "$mounts"
        return 0
    fi
    return 1
}
for _ in $(seq 1 60); do
    busy >/dev/null || break
    sleep 2
done
if users=$(busy); then
    fail "QEMU or FUSE is in use; not changing packages under it:
$users"
fi

# 1. The state of a fresh machine.
say "making this machine look fresh"
backports=/etc/apt/sources.list.d/bookworm-backports.sources
if ! grep -rs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/ >/dev/null; then
    cat >"$backports" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
fi
apt-get update -qq
apt-get purge -y -qq qemu-system-x86 qemu-system-common fuse3 restic \
    libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients tini cpio kmod >/dev/null
apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-utils >/dev/null
apt-get autoremove -y -qq >/dev/null
rm -rf "$QEMU10"
hash -r
for cmd in qemu-system-x86_64 fusermount3 restic virsh libvirtd tini cpio depmod modprobe; do
    if command -v "$cmd" >/dev/null 2>&1; then
        fail "$cmd is still installed: the machine does not look fresh"
    fi
done
utils=$(version qemu-img)
[[ $utils == *"version 10."* ]] || fail "qemu-utils from backports not installed ($utils)"
say "fresh: no qemu-system-x86, no fuse3, no restic, no libvirt, no cpio, no kmod; $utils"

# 2. The README's first command, as a new user runs it.
say "running scripts/install-deps.sh"
scripts/install-deps.sh
hash -r
fi

# 3. Both QEMU versions and the tools work.
expect_version() {
    local want=$1
    shift
    local v
    v=$(version "$@")
    [[ $v == *" $want"* ]] || fail "$* --version says '$v', expected $want"
    say "ok: $* -> $v"
}
expect_version 7.2 qemu-system-x86_64
expect_version 7.2 qemu-img
expect_version 7.2 qemu-nbd
expect_version 10. "$QEMU10/usr/bin/qemu-system-x86_64"
expect_version 10. "$QEMU10/usr/bin/qemu-img"
expect_version 10. "$QEMU10/usr/bin/qemu-nbd"

# A VM of each version starts (its firmware is found) and answers QMP.
boots() {
    local qemu=$1 out
    out=$(printf '%s\n' '{"execute":"qmp_capabilities"}' '{"execute":"query-version"}' \
        '{"execute":"quit"}' |
        timeout 60 "$qemu" -machine q35 -m 64 -nodefaults -no-user-config -display none \
            -serial none -S -qmp stdio 2>&1) || fail "$qemu did not start: $out"
    [[ $out == *'"qemu"'* ]] || fail "$qemu did not answer QMP: $out"
    say "ok: $qemu starts a q35 VM and answers QMP"
}
boots "$(command -v qemu-system-x86_64)"
boots "$QEMU10/usr/bin/qemu-system-x86_64"

fusermount3 -V >/dev/null 2>&1 || fail "fusermount3 does not run"
say "ok: $(fusermount3 -V 2>&1)"
restic version >/dev/null 2>&1 || fail "restic does not run"
say "ok: $(restic version)"
# libvirt mode: libvirt 9.0's daemon, QEMU driver and virsh, the reaper
# the tests run libvirtd under, and the user libvirt runs QEMU as.
expect_version 9.0 libvirtd
v=$(virsh --version 2>/dev/null) || fail "virsh does not run"
[[ $v == 9.0* ]] || fail "virsh --version says '$v', expected 9.0"
[ -e /usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so ] ||
    fail "libvirt's QEMU driver is not installed"
tini --version >/dev/null 2>&1 || fail "tini does not run"
id libvirt-qemu >/dev/null 2>&1 || fail "no libvirt-qemu user"
say "ok: libvirt $(virsh --version), its QEMU driver, tini, user libvirt-qemu"
# The real test guest's build (tests/guest/build-guest.sh).
for cmd in cpio depmod modprobe; do
    command -v "$cmd" >/dev/null 2>&1 || fail "$cmd is not installed"
done
say "ok: cpio, depmod and modprobe for the test guest"
say "passed"

#!/usr/bin/env bash
# Installs what vmsnapfs and its tests need on Debian 12 when it is missing:
#  - QEMU 7.2 from bookworm (qemu-system-x86 and qemu-utils named together,
#    at bookworm's version, so that apt keeps them at one version even where
#    a newer qemu-utils came preinstalled from backports);
#  - QEMU 10.0 from bookworm-backports, unpacked beside it into
#    $VMSNAPFS_QEMU10 (default /opt/vmsnapfs/qemu-10) with `apt-get download`
#    + `dpkg -x`, for `scripts/test.sh` to run the suite on both versions;
#  - fuse3, and restic and rsync for the backup round-trip tests;
#  - libvirt 9.0 from bookworm for libvirt mode and its tests: the daemon,
#    its QEMU driver and virsh only (libvirt-daemon-system would pull in
#    systemd; no QEMU package is touched), tini (a reaper for the QEMU
#    processes libvirtd daemonizes where no init reaps them), the
#    libvirt-qemu user and group the Debian build runs QEMU as, a
#    qemu.conf that logs QEMU's output to a file (no virtlogd without
#    systemd), and /dev/kvm readable by group kvm as udev would make it
#    (else libvirt probes QEMU again on every define);
#  - e2fsprogs, dosfstools, mtools and fdisk (sfdisk) for the tests of the
#    guest's files (`files/`), which build ext4 and vfat disks;
#  - cpio and kmod (depmod, modprobe) for the real Linux guest of the tests
#    (tests/guest/build-guest.sh: its own packages are downloaded at test
#    time with apt-get download).
# Every check reads a command's whole output (no `grep -q` in a pipe:
# under pipefail its early exit fails the pipe with SIGPIPE).
set -euo pipefail

QEMU10=${VMSNAPFS_QEMU10:-/opt/vmsnapfs/qemu-10}
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive

# The version a command reports, e.g. "7.2.18" from "QEMU emulator version 7.2.18 (...)".
qemu_version() {
    local out
    out=$("$@" --version 2>/dev/null) || return 0
    out=${out%%$'\n'*}
    out=${out#*version }
    echo "${out%% *}"
}

have_qemu72() {
    command -v qemu-system-x86_64 >/dev/null 2>&1 || return 1
    command -v qemu-img >/dev/null 2>&1 || return 1
    local s u
    s=$(qemu_version qemu-system-x86_64)
    u=$(qemu_version qemu-img)
    [[ $s == 7.2* && $u == 7.2* ]]
}

have_qemu10() {
    local s u
    s=$(qemu_version "$QEMU10/usr/bin/qemu-system-x86_64")
    u=$(qemu_version "$QEMU10/usr/bin/qemu-img")
    [[ $s == 10.* && $u == 10.* ]]
}

have_tools() {
    command -v fusermount3 >/dev/null 2>&1 && command -v restic >/dev/null 2>&1 &&
        command -v rsync >/dev/null 2>&1 &&
        command -v mke2fs >/dev/null 2>&1 && command -v mkfs.vfat >/dev/null 2>&1 &&
        command -v mcopy >/dev/null 2>&1 && command -v sfdisk >/dev/null 2>&1 &&
        command -v cpio >/dev/null 2>&1 && command -v depmod >/dev/null 2>&1 &&
        command -v modprobe >/dev/null 2>&1
}

have_libvirt() {
    command -v virsh >/dev/null 2>&1 && command -v libvirtd >/dev/null 2>&1 &&
        [ -e /usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so ] &&
        command -v tini >/dev/null 2>&1 && id libvirt-qemu >/dev/null 2>&1 &&
        [ -f /etc/libvirt/qemu.conf ]
}

# What libvirtd needs besides its packages; run every time (idempotent).
setup_libvirt() {
    getent group kvm >/dev/null || $SUDO groupadd --system kvm
    getent group libvirt-qemu >/dev/null || $SUDO groupadd --system libvirt-qemu
    id libvirt-qemu >/dev/null 2>&1 ||
        $SUDO useradd --system --gid libvirt-qemu --groups kvm --home-dir /var/lib/libvirt \
            --no-create-home --shell /usr/sbin/nologin libvirt-qemu
    if [ ! -f /etc/libvirt/qemu.conf ]; then
        $SUDO mkdir -p /etc/libvirt
        printf '%s\n' \
            "# Written by vmsnapfs's scripts/install-deps.sh for a libvirtd run" \
            "# without systemd (no virtlogd): QEMU's output goes to a plain file." \
            'stdio_handler = "file"' | $SUDO tee /etc/libvirt/qemu.conf >/dev/null
    fi
    if [ -c /dev/kvm ] && [ "$(stat -c %G /dev/kvm)" = root ]; then
        $SUDO chgrp kvm /dev/kvm
        $SUDO chmod g+rw /dev/kvm
    fi
}

if have_qemu72 && have_qemu10 && have_tools && have_libvirt; then
    setup_libvirt
    exit 0
fi

# bookworm-backports carries QEMU 10.0.
backports=/etc/apt/sources.list.d/bookworm-backports.sources
if ! grep -rs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/ >/dev/null; then
    $SUDO tee "$backports" >/dev/null <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
fi
$SUDO apt-get update -qq

# The newest version of a package that a suite offers ("" when none).
suite_version() {
    local pkg=$1 suite=$2 table
    table=$(apt-cache madison "$pkg")
    awk -v s="$suite/main" '$0 ~ (" " s " ") {print $3; exit}' <<<"$table"
}

if ! have_qemu72 || ! have_tools; then
    sys=$(suite_version qemu-system-x86 bookworm)
    utils=$(suite_version qemu-utils bookworm)
    [ -n "$sys" ] && [ -n "$utils" ] || {
        echo "install-deps: bookworm offers no qemu-system-x86/qemu-utils" >&2
        exit 1
    }
    $SUDO apt-get install -y -qq --no-install-recommends --allow-downgrades \
        "qemu-system-x86=$sys" "qemu-utils=$utils" fuse3 restic rsync \
        e2fsprogs dosfstools mtools fdisk cpio kmod >/dev/null
fi
have_qemu72 || { echo "install-deps: QEMU 7.2 not available" >&2; exit 1; }

if ! have_qemu10; then
    v=$(suite_version qemu-system-x86 bookworm-backports)
    [ -n "$v" ] || { echo "install-deps: bookworm-backports offers no QEMU" >&2; exit 1; }
    dl=$(mktemp -d)
    trap 'rm -rf "$dl"' EXIT
    (cd "$dl" && apt-get download -qq qemu-system-x86="$v" qemu-system-common="$v" \
        qemu-system-data="$v" qemu-utils="$v" qemu-block-extra="$v" 2>/dev/null)
    $SUDO rm -rf "$QEMU10.new"
    $SUDO mkdir -p "$QEMU10.new"
    for deb in "$dl"/*.deb; do
        $SUDO dpkg -x "$deb" "$QEMU10.new"
    done
    $SUDO rm -rf "$QEMU10"
    $SUDO mv "$QEMU10.new" "$QEMU10"
fi
have_qemu10 || { echo "install-deps: QEMU 10 not runnable from $QEMU10" >&2; exit 1; }

if ! have_libvirt; then
    # Named packages only, at bookworm's versions; none of them depends
    # on a QEMU package, so QEMU 7.2 stays as it is.
    $SUDO apt-get install -y -qq --no-install-recommends \
        libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients tini >/dev/null
fi
setup_libvirt
have_libvirt || { echo "install-deps: libvirt not installed" >&2; exit 1; }

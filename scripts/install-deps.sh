#!/usr/bin/env bash
# Installs what vmsnapfs needs on Debian 12 when it is missing: QEMU 7.2
# (qemu-system-x86 and qemu-utils together, so that apt keeps them at the
# same version), fuse3, and restic for the backup round-trip tests.
set -euo pipefail

have_qemu() {
    command -v qemu-system-x86_64 >/dev/null 2>&1 &&
        command -v qemu-img >/dev/null 2>&1 &&
        qemu-img --version | grep -q 'version 7\.2' &&
        qemu-system-x86_64 --version | grep -q 'version 7\.2'
}

if have_qemu && command -v fusermount3 >/dev/null 2>&1 && command -v restic >/dev/null 2>&1; then
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
# A newer qemu-utils may be installed from backports: pin it back to the
# bookworm release that matches qemu-system-x86.
utils="qemu-utils"
if apt-cache policy qemu-utils | grep -q 'bookworm/main'; then
    ver=$(apt-cache madison qemu-utils | awk '/bookworm\/main|bookworm-security/ {print $3; exit}')
    [ -n "$ver" ] && utils="qemu-utils=$ver"
    sysver=$(apt-cache madison qemu-system-x86 | awk -v v="$ver" '$3 == v {print $3; exit}')
fi
$SUDO apt-get install -y -qq --no-install-recommends --allow-downgrades \
    "qemu-system-x86${sysver:+=$sysver}" "$utils" fuse3 restic >/dev/null
have_qemu || { echo "install-deps: QEMU 7.2 not available" >&2; exit 1; }

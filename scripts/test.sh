#!/usr/bin/env bash
# Runs the whole test suite (unit tests, the XML corpus, and the tests on
# real QEMU VMs through a real FUSE mount) twice: once with QEMU 7.2 (the
# one on PATH) and once with QEMU 10.0 (unpacked into $VMSNAPFS_QEMU10,
# put first on PATH). Both passes must pass. Installs what is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
QEMU10=${VMSNAPFS_QEMU10:-/opt/vmsnapfs/qemu-10}

# The first line of a command's --version (read whole: no pipe to head).
version() {
    local out
    out=$("$1" --version)
    echo "${out%%$'\n'*}"
}

# One pass of `cargo test` with the QEMU found first on PATH.
pass() {
    local name=$1
    shift
    echo "=== test pass: $name: $(command -v qemu-system-x86_64)"
    echo "===   $(version qemu-system-x86_64); $(version qemu-img); $(version qemu-nbd)"
    cargo test --workspace --release "$@"
}

pass "QEMU 7.2" "$@"
PATH="$QEMU10/usr/bin:$PATH" pass "QEMU 10.0" "$@"
echo "=== both passes passed (QEMU 7.2 and QEMU 10.0)"

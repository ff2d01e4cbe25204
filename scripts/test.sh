#!/usr/bin/env bash
# Runs the whole test suite: unit tests, the XML corpus, and the tests on
# real QEMU VMs through a real FUSE mount. Installs what is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo test --workspace --release "$@"

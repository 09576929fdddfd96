#!/usr/bin/env bash
# Runs every check and test of the workspace on a fresh machine with only the Rust toolchain:
# installs what the tests need if it is missing, builds the binaries the integration tests
# start, then runs formatting, lints, unit and integration tests.
set -euo pipefail
cd "$(dirname "$0")/.."

# Tools the tests start as real processes: `need <command> <debian package>`.
need_pkgs=()
need() { command -v "$1" >/dev/null 2>&1 || need_pkgs+=("$2"); }
need redis-server redis-server   # Redis-mode, fault and cluster tests (7.0+ for functions)
need redis-cli redis-tools
need openssl openssl             # key pairs for the RS256/ES256 token tests
if [ ${#need_pkgs[@]} -gt 0 ]; then
    echo "installing: ${need_pkgs[*]}"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt clippy

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The integration tests start these binaries; build them before the tests run.
cargo build --workspace --bins
cargo test --workspace

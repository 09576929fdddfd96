#!/usr/bin/env bash
# Prints the path of a Sockudo binary (the Pusher-protocol WebSocket server measured beside the
# hub), installing it on first use: `cargo install sockudo --locked` into
# ~/.cache/hub-loadtests/sockudo (SOCKUDO_VERSION, 5.2.0), which needs protoc (Debian's
# protobuf-compiler, installed with apt-get when missing). About 5 minutes on 2 cores.
set -euo pipefail
VERSION=${SOCKUDO_VERSION:-5.2.0}
ROOT=${SOCKUDO_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/hub-loadtests/sockudo}
BIN="$ROOT/bin/sockudo"
if [ -x "$BIN" ] && "$BIN" --version 2>/dev/null | grep -q "$VERSION"; then
    echo "$BIN"; exit 0
fi
if ! command -v protoc >/dev/null; then
    echo "installing protobuf-compiler (Sockudo's build needs protoc)" >&2
    if [ "$(id -u)" = 0 ]; then apt-get install -y protobuf-compiler >&2; else sudo apt-get install -y protobuf-compiler >&2; fi
fi
echo "installing sockudo $VERSION into $ROOT (cargo install --locked; about 5 minutes)" >&2
cargo install sockudo --version "$VERSION" --locked --root "$ROOT" >&2
echo "$BIN"

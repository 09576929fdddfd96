# Helpers the scenario scripts share (sourced, not run).

# Processes the scenario started (append their PIDs): stopped by PID when it exits.
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() { # wait_for <tries of 0.05 s> <command...>
    local n=$1; shift
    for _ in $(seq "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.05; done
    echo "timed out waiting for: $*" >&2; return 1
}

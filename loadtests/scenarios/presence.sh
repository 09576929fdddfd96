#!/usr/bin/env bash
# Scenario: a presence storm. NODES (2) hubs on one Redis; USERS (10,000) users, one SSE stream
# each with its own token `sub`, spread over the nodes, join one channel, all drop and come back
# AWAY_MS later (a reconnect storm: no join or leave should result), then all leave. An observer
# with presence=true counts the events; Redis's INFO commandstats gives the Redis operations per
# join, per reconnect and per leave (commands inside the hub's functions included).
# WEBHOOKS=1: the nodes also send webhooks (HUB_WEBHOOK_URL) to a receiver in the load
# generator, which counts every event once by id, the duplicates, the largest batch, and when
# the last event of the join and of the leave phase arrived.
# Medians of RUNS (3). Everything listens on loopback and is stopped by PID.
set -euo pipefail
cd "$(dirname "$0")/../.."
USERS=${USERS:-10000} NODES=${NODES:-2} RUNS=${RUNS:-3} HEARTBEAT=${HEARTBEAT:-5} AWAY_MS=${AWAY_MS:-500}
# Each stream's queue (HUB_OUTBOX_LEN): OUTBOX=4 shows the observer's events do not depend on it.
OUTBOX=${OUTBOX:-256}
WEBHOOKS=${WEBHOOKS:-0}
command -v redis-server >/dev/null || { echo "needs redis-server" >&2; exit 1; }
cargo build -q --release -p hub -p loadtests
OUT=$(mktemp -d /tmp/scenario-presence.XXXX)
. loadtests/scenarios/lib.sh
SECRET=presence-storm-secret-of-some-length

run_one() {
    local r=$1 port url targets=() pids=() hook_env=() hook_args=()
    port=$(free_port); url=redis://127.0.0.1:$port
    if [ "$WEBHOOKS" = 1 ]; then
        local hook=127.0.0.1:$(free_port)
        hook_env=(HUB_WEBHOOK_URL="http://$hook/" HUB_WEBHOOK_SECRET=storm-webhook-secret)
        hook_args=(--webhook-listen "$hook")
    fi
    redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no > "$OUT/redis-$r.log" 2>&1 &
    local redis=$!; PIDS+=("$redis")
    wait_for 100 redis-cli -p "$port" ping
    for i in $(seq 0 $((NODES - 1))); do
        local pub adm
        pub=127.0.0.1:$(free_port) adm=127.0.0.1:$(free_port)
        env ${hook_env[@]+"${hook_env[@]}"} HUB_BIND=$pub HUB_ADMIN_BIND=$adm HUB_LOG=warn HUB_REDIS_URL=$url HUB_NODE_ID=node$i \
            HUB_JWT_SECRET=$SECRET HUB_HEARTBEAT_SECS=$HEARTBEAT HUB_MAX_CONNECTIONS_PER_USER=10 HUB_OUTBOX_LEN=$OUTBOX \
            HUB_MAX_CONNECTIONS=$((USERS + 1000)) target/release/hub > "$OUT/hub$i-$r.out" 2> "$OUT/hub$i-$r.err" &
        pids+=($!); PIDS+=($!)
        wait_for 200 curl -sf "http://$adm/readyz"
        targets+=(--target "$pub")
    done
    target/release/loadgen presence-storm "${targets[@]}" --redis "$url" --secret "$SECRET" \
        --users "$USERS" --away-ms "$AWAY_MS" --settle-secs $((HEARTBEAT + 3)) ${hook_args[@]+"${hook_args[@]}"} \
        > "$OUT/report-$r.json" 2> "$OUT/loadgen-$r.err"
    for p in "${pids[@]}" "$redis"; do kill -TERM "$p"; wait "$p" 2>/dev/null || true; done
    cat "$OUT/report-$r.json"
}

REPORTS=()
for r in $(seq "$RUNS"); do
    echo "run $r/$RUNS" >&2
    REPORTS+=("$(run_one "$r")")
done
python3 - "${REPORTS[@]}" <<'PY'
import json, statistics, sys
runs = [json.loads(r) for r in sys.argv[1:]]
print(f"{runs[0]['users']} users over {runs[0]['nodes']} nodes on one Redis; medians of {len(runs)} runs")
for key in ["joins_seen", "leaves_seen", "join_all_secs", "redis_calls_per_join", "presence_calls_per_join",
            "reconnect_storm_events", "redis_calls_per_reconnect", "presence_calls_per_reconnect",
            "leave_all_secs", "redis_calls_per_leave", "presence_calls_per_leave"]:
    vals = [r[key] for r in runs]
    print(f"{key:28}{statistics.median(vals):>10.2f}   runs: {[round(v, 2) for v in vals]}")
if "webhooks" in runs[0]:
    print("webhooks (each event counted once by id):")
    for key in runs[0]["webhooks"]:
        vals = [r["webhooks"][key] if r["webhooks"][key] is not None else float("nan") for r in runs]
        print(f"  {key:32}{statistics.median(vals):>10.2f}   runs: {[round(v, 2) for v in vals]}")
PY

#!/usr/bin/env bash
# Soak: two hub nodes on one Redis for DURATION seconds (30 min) under everything at once:
#   - READERS streams over CHANNELS channels that must get every durable message (RATE/s,
#     published with FCALL hub_publish, retried through outages) and come back with
#     Last-Event-ID whenever they are closed;
#   - CHURNERS streams that each close after a random time below CHURN_MS and open again (and,
#     like an EventSource, come back when the server closes them);
#   - Redis restarted (SIGTERM, started again on the same port) every REDIS_EVERY seconds;
#   - node 1 restarted (SIGTERM) NODE_RESTART_AT seconds in.
# Every SAMPLE seconds: each node's RSS, open fds, stream gauge and counters (soak_sample.py).
# At the end, with every client gone: streams, fds and counts must be back where they started
# (soak_report.py prints the table; it exits non-zero on a lost or duplicated message).
# Redis keeps an append-only file (fsync always), as a production Redis that holds history
# does: a Redis without persistence forgets history on restart, and readers then get hub.reset.
# Everything listens on loopback and is stopped by PID. Needs redis-server.
set -euo pipefail
cd "$(dirname "$0")/../.."
DURATION=${DURATION:-1800} SAMPLE=${SAMPLE:-10} REDIS_EVERY=${REDIS_EVERY:-300}
NODE_RESTART_AT=${NODE_RESTART_AT:-1020} READERS=${READERS:-2000} CHANNELS=${CHANNELS:-20}
RATE=${RATE:-20} CHURNERS=${CHURNERS:-1000} CHURN_MS=${CHURN_MS:-5000}
command -v redis-server >/dev/null || { echo "needs redis-server" >&2; exit 1; }
cargo build -q --release -p hub -p loadtests
OUT=${OUT:-$(mktemp -d /tmp/soak.XXXX)}
mkdir -p "$OUT/redis"
LOADGEN=target/release/loadgen
. loadtests/scenarios/lib.sh
T0=$(date +%s.%N)
event() { echo "$(python3 -c "import time; print(round(time.time() - $T0, 1))") $*" >> "$OUT/events.log"; echo "soak: $*" >&2; }

REDIS_PORT=$(free_port) REDIS_PID=""
start_redis() {
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly yes --appendfsync always \
        --dir "$OUT/redis" >> "$OUT/redis.log" 2>&1 &
    REDIS_PID=$!; PIDS+=("$REDIS_PID")
    wait_for 200 redis-cli -p "$REDIS_PORT" ping
    echo "$REDIS_PID" > "$OUT/redis.pid"
}
declare -a NPID NPUB NADM
start_hub() { # start_hub <i>
    local i=$1
    [ -n "${NPUB[$i]:-}" ] || NPUB[$i]=127.0.0.1:$(free_port)
    [ -n "${NADM[$i]:-}" ] || NADM[$i]=127.0.0.1:$(free_port)
    env HUB_BIND="${NPUB[$i]}" HUB_ADMIN_BIND="${NADM[$i]}" HUB_DRAIN_SECS=2 HUB_LOG="${HUB_LOG:-warn}" \
        HUB_NODE_ID="node$i" HUB_REDIS_URL="redis://127.0.0.1:$REDIS_PORT" \
        target/release/hub >> "$OUT/hub$i.out" 2>> "$OUT/hub$i.err" &
    NPID[$i]=$!; PIDS+=("${NPID[$i]}")
    wait_for 400 curl -sf "http://${NADM[$i]}/readyz"
    echo "${NPID[$i]} http://${NADM[$i]}" > "$OUT/node$i"
}
stop_pid() { kill -TERM "$1"; wait "$1" || true; }

start_redis
start_hub 0
start_hub 1
sample() { python3 loadtests/scenarios/soak_sample.py "$OUT" "$T0" "$1"; }
sample idle

# Churners first (they run until DURATION), then the readers (they end when every stream has
# every message, or DURATION + 300 s).
$LOADGEN run --target "${NPUB[0]}" --target "${NPUB[1]}" --path '/v1/sse?channel=public:soakchurn{ch}' \
    --streams "$CHURNERS" --processes 2 --first-source 10 --channel-count 10 --channel 'public:soakchurn{n}' \
    --http "http://${NADM[0]}" --count 0 --churn-ms "$CHURN_MS" --reconnect --reconnect-ms 2000 --duration "$DURATION" \
    --report "$OUT/churners.json" > /dev/null 2> "$OUT/churners.err" &
CHURN=$!; PIDS+=("$CHURN")
$LOADGEN run --target "${NPUB[0]}" --target "${NPUB[1]}" --path '/v1/sse?channel=public:soak{ch}' \
    --streams "$READERS" --processes 2 --first-source 2 --channel-count "$CHANNELS" --channel 'public:soak{n}' \
    --redis "redis://127.0.0.1:$REDIS_PORT" --retry-secs 60 --count $((RATE * DURATION)) --rate "$RATE" \
    --reconnect --reconnect-ms 2000 --duration $((DURATION + 300)) --ready-file "$OUT/ready" \
    --report "$OUT/readers.json" > /dev/null 2> "$OUT/readers.err" &
READ=$!; PIDS+=("$READ")
wait_for 2400 test -f "$OUT/ready"
event "readers open: $(cat "$OUT/ready")"

START=$(date +%s)
NEXT_SAMPLE=$START NEXT_REDIS=$((START + REDIS_EVERY)) NODE_DONE=0
while kill -0 "$READ" 2>/dev/null || kill -0 "$CHURN" 2>/dev/null; do
    now=$(date +%s)
    if [ "$now" -ge "$NEXT_SAMPLE" ]; then sample load; NEXT_SAMPLE=$((NEXT_SAMPLE + SAMPLE)); fi
    if [ "$now" -ge "$NEXT_REDIS" ] && [ "$now" -lt $((START + DURATION)) ]; then
        event "redis restart"
        stop_pid "$REDIS_PID"; start_redis
        event "redis back"
        NEXT_REDIS=$((NEXT_REDIS + REDIS_EVERY))
    fi
    if [ "$NODE_DONE" = 0 ] && [ "$now" -ge $((START + NODE_RESTART_AT)) ]; then
        event "node1 restart"
        stop_pid "${NPID[1]}"; start_hub 1
        event "node1 back"
        NODE_DONE=1
    fi
    sleep 1
done
wait "$READ" || event "readers' loadgen failed"
wait "$CHURN" || event "churners' loadgen failed"
event "clients gone"
# Every stream released, then three samples of the quiet nodes.
sample zero || event "a node still holds streams a minute after its clients left"
for _ in 1 2 3; do sleep "$SAMPLE"; sample quiet; done
for i in 0 1; do curl -sf "http://${NADM[$i]}/metrics" > "$OUT/node$i.metrics" || true; done
python3 loadtests/scenarios/soak_report.py "$OUT"

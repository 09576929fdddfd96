#!/usr/bin/env bash
# Scenario: a small channel beside a large one. One hub; BIG (10,000) WebSocket readers of one
# channel get a message a second (BIG_COUNT, 25) while SMALL (10) readers of another channel
# get SMALL_RATE (20) messages a second for SMALL_COUNT / SMALL_RATE seconds, published from
# the moment the large channel's publishing starts: about one small message in ten is
# published while a large fan-out is under way. Reported (medians of RUNS, 3): the small
# channel's delivery latency p50 / p99 / max and delivered share, the large channel's p99, and
# the publish answer times of both publishers.
# MODE=memory (embedded broker, publishes over HTTP) or MODE=redis (one redis-server; both
# publishers go through Redis, so the hub's subscriber task carries both channels).
# PIN=1 (default): the hub (and Redis) on CPU 0, the load generators on CPU 1.
# Everything listens on loopback, stops by itself and is stopped by PID.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIG=${BIG:-10000} BIG_PROCS=${BIG_PROCS:-5} BIG_COUNT=${BIG_COUNT:-25} SMALL=${SMALL:-10}
SMALL_RATE=${SMALL_RATE:-20} SMALL_COUNT=${SMALL_COUNT:-400} RUNS=${RUNS:-3} MODE=${MODE:-memory}
PIN=${PIN:-1} TRANSPORT=${TRANSPORT:-ws}
SRV=() GEN=()
if [ "$PIN" = 1 ]; then SRV=(taskset -c 0) GEN=(taskset -c 1); fi
cargo build -q --release -p hub -p loadtests
OUT=$(mktemp -d /tmp/scenario-mixed.XXXX)
. loadtests/scenarios/lib.sh
LOADGEN=target/release/loadgen

stream_args() { # stream_args <channel prefix>
    if [ "$TRANSPORT" = ws ]; then
        echo --ws --path /v1/ws --subscribe "{\"op\":\"subscribe\",\"channel\":\"public:$1c{ch}\"}"
    else
        echo --path "/v1/sse?channel=public:$1c{ch}"
    fi
}

run_one() { # run_one <run>
    local r=$1 pub adm hub redis="" rpid="" env=() via=()
    pub=127.0.0.1:$(free_port) adm=127.0.0.1:$(free_port)
    if [ "$MODE" = redis ]; then
        local port; port=$(free_port)
        "${SRV[@]}" redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no > "$OUT/redis-$r.log" 2>&1 &
        rpid=$!; PIDS+=("$rpid"); redis="redis://127.0.0.1:$port"
        wait_for 100 redis-cli -p "$port" ping
        env+=(HUB_REDIS_URL="$redis"); via=(--redis "$redis")
    else
        via=(--http "http://$adm")
    fi
    env HUB_BIND="$pub" HUB_ADMIN_BIND="$adm" HUB_LOG=warn HUB_DRAIN_SECS=0 HUB_MAX_CONNECTIONS=20000 \
        ${env[@]+"${env[@]}"} "${SRV[@]}" target/release/hub > "$OUT/hub-$r.out" 2> "$OUT/hub-$r.err" &
    hub=$!; PIDS+=("$hub")
    wait_for 200 curl -sf "http://$adm/readyz"
    rm -f "$OUT/ready-big"
    # shellcheck disable=SC2046
    "${GEN[@]}" $LOADGEN run --target "$pub" --server-pid "$hub" $(stream_args "big$r") "${via[@]}" \
        --channel "public:big${r}c{n}" --streams "$BIG" --processes "$BIG_PROCS" --count "$BIG_COUNT" --rate 1 \
        --first-source 2 --duration 120 --ready-file "$OUT/ready-big" --report "$OUT/big-$r.json" \
        > /dev/null 2> "$OUT/big-$r.err" &
    local big=$!; PIDS+=("$big")
    wait_for 2400 test -f "$OUT/ready-big"
    # The small channel's readers and publisher, started as the large channel's publishing
    # starts (its ready file is written when its streams are open, just before it publishes).
    # shellcheck disable=SC2046
    "${GEN[@]}" $LOADGEN run --target "$pub" $(stream_args "small$r") "${via[@]}" \
        --channel "public:small${r}c{n}" --streams "$SMALL" --processes 1 --count "$SMALL_COUNT" \
        --rate "$SMALL_RATE" --first-source 40 --duration 120 --report "$OUT/small-$r.json" \
        > /dev/null 2> "$OUT/small-$r.err" &
    local small=$!; PIDS+=("$small")
    wait "$small" || true
    wait "$big" || true
    kill -TERM "$hub"; wait "$hub" 2>/dev/null || true
    if [ -n "$rpid" ]; then kill -TERM "$rpid"; wait "$rpid" 2>/dev/null || true; fi
}

for r in $(seq "$RUNS"); do
    echo "run $r/$RUNS" >&2
    run_one "$r"
done
python3 - "$OUT" "$RUNS" "$MODE" "$TRANSPORT" "$BIG" "$SMALL" "$SMALL_RATE" <<'PY'
import json, statistics, sys
out, runs, mode, transport, big, small, rate = sys.argv[1:8]
runs = int(runs)
rows = []
for r in range(1, runs + 1):
    b = json.load(open(f"{out}/big-{r}.json"))
    s = json.load(open(f"{out}/small-{r}.json"))
    rows.append({
        "small p50 (ms)": s["latency"]["p50_ms"],
        "small p99 (ms)": s["latency"]["p99_ms"],
        "small max (ms)": s["latency"]["max_ms"],
        "small delivered (%)": 100.0 * s["deliveries"] / max(1, s["expected_deliveries"]),
        "small publish answer p50 (ms)": s["publish"].get("rtt_p50_us", 0) / 1000,
        "small publish answer p99 (ms)": s["publish"].get("rtt_p99_us", 0) / 1000,
        "big opened": b["opened"],
        "big delivered (%)": 100.0 * b["deliveries"] / max(1, b["expected_deliveries"]),
        "big p99 (ms)": b["latency"]["p99_ms"],
        "big publish answer p50 (ms)": b["publish"].get("rtt_p50_us", 0) / 1000,
        "big publish answer max (ms)": b["publish"].get("rtt_max_us", 0) / 1000,
    })
print(f"{mode} mode, {transport}: {big} readers of a channel at 1 msg/s, {small} of another at {rate}/s; medians of {runs} runs ({out})")
for k in rows[0]:
    vals = [r[k] for r in rows]
    print(f"  {k:32} {statistics.median(vals):10.2f}   runs {[round(v, 2) for v in vals]}")
PY

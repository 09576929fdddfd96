#!/usr/bin/env bash
# Scenarios 1-3 of issue 5, side by side in one run: STREAMS streams on one channel (idle
# memory per stream, time to connect all), then COUNT messages at RATE per second (delivered vs
# expected, deliveries/s, latency p50/p99/max, server CPU-seconds per million deliveries).
# RATE=0 publishes each message as soon as the previous publish is answered (throughput).
# Hub (embedded broker) and Nchan (nginx, memory store, 2 workers) alternate, RUNS times each;
# prints medians and ratios. Loopback only; every server is stopped by its PID.
#   fan-out:    RUNS=3 STREAMS=10000 PROCS=5 COUNT=20 RATE=1 bash loadtests/scenarios/fanout.sh
#   throughput: RUNS=3 STREAMS=1000 PROCS=1 COUNT=5000 RATE=0 bash loadtests/scenarios/fanout.sh
#   slow readers: STALL=100 of the STREAMS stop reading once open; PAD adds bytes per message:
#               RUNS=3 STREAMS=1100 STALL=100 PROCS=1 COUNT=3000 RATE=0 PAD=1000 bash loadtests/scenarios/fanout.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
STREAMS=${STREAMS:-10000} PROCS=${PROCS:-5} COUNT=${COUNT:-20} RUNS=${RUNS:-3} RATE=${RATE:-1}
# Longest a run may take (seconds), whatever happens.
LIMIT=${LIMIT:-120} STALL=${STALL:-0} PAD=${PAD:-0}
command -v nginx >/dev/null && [ -f /usr/lib/nginx/modules/ngx_nchan_module.so ] || {
    echo "needs nginx and libnginx-mod-nchan (apt-get install nginx libnginx-mod-nchan)" >&2; exit 1; }
cargo build -q --release -p hub -p loadtests
OUT=$(mktemp -d /tmp/fanout.XXXX)
LOADGEN=target/release/loadgen

run_hub() {
    HUB_BIND=127.0.0.1:0 HUB_ADMIN_BIND=127.0.0.1:0 HUB_DRAIN_SECS=0 HUB_LOG=warn \
        target/release/hub > "$OUT/hub.out" 2> "$OUT/hub.err" &
    local pid=$!
    for _ in $(seq 100); do grep -q listening "$OUT/hub.out" 2>/dev/null && break; sleep 0.05; done
    local pub adm
    pub=$(grep -o 'public=[^ ]*' "$OUT/hub.out" | cut -d= -f2)
    adm=$(grep -o 'admin=[^ ]*' "$OUT/hub.out" | cut -d= -f2)
    $LOADGEN run --target "$pub" --path '/v1/sse?channel=public:bench' --streams "$STREAMS" --processes "$PROCS" \
        --http "http://$adm" --channel public:bench --count "$COUNT" --rate "$RATE" --stall "$STALL" --pad "$PAD" --server-pid "$pid" \
        --duration "$LIMIT" --report "$OUT/hub-$1.json" > /dev/null
    kill -TERM "$pid"; wait "$pid" || true
}

run_nchan() {
    local dir="$OUT/nchan-$1" port
    mkdir -p "$dir"
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    sed -e "s#__PORT__#$port#; s#__DIR__#$dir#g" loadtests/nchan.conf > "$dir/nginx.conf"
    nginx -p "$dir" -c "$dir/nginx.conf" -g 'daemon off;' &
    local pid=$!
    for _ in $(seq 100); do [ -s "$dir/nginx.pid" ] && break; sleep 0.05; done
    sleep 0.3
    $LOADGEN run --target "127.0.0.1:$port" --path /sub/bench --streams "$STREAMS" --processes "$PROCS" \
        --raw-post "http://127.0.0.1:$port/pub?id={channel}" --channel bench --count "$COUNT" --rate "$RATE" --stall "$STALL" --pad "$PAD" \
        --server-pid "$pid" --duration "$LIMIT" --report "$OUT/nchan-$1.json" > /dev/null
    kill -TERM "$pid"; wait "$pid" || true
}

for r in $(seq "$RUNS"); do
    echo "run $r/$RUNS: hub" >&2; run_hub "$r"
    echo "run $r/$RUNS: nchan" >&2; run_nchan "$r"
done

python3 - "$OUT" "$RUNS" "$STREAMS" "$COUNT" "$RATE" <<'PY'
import json, statistics, sys
out, runs, streams, count, rate = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
def load(name): return [json.load(open(f"{out}/{name}-{r}.json")) for r in range(1, runs + 1)]
rows = [
    ("streams opened", lambda r: r["opened"]),
    ("connect all (s)", lambda r: r["connect_secs"]),
    ("server RSS per idle stream (KB)", lambda r: r["server_rss_kb_per_stream"]),
    ("delivered / expected (%)", lambda r: 100.0 * r["deliveries"] / max(1, r["expected_deliveries"])),
    ("duplicates", lambda r: r["duplicates"]),
    ("streams ended by the server", lambda r: r["holds"]["streams_ended"]),
    ("deliveries per second", lambda r: r["deliveries_per_sec"]),
    ("latency p50 (ms)", lambda r: r["latency"]["p50_ms"]),
    ("latency p99 (ms)", lambda r: r["latency"]["p99_ms"]),
    ("latency max (ms)", lambda r: r["latency"]["max_ms"]),
    ("server CPU-s per million deliveries", lambda r: r["server_cpu_secs_per_million_deliveries"]),
    ("server RSS at the end (MB)", lambda r: r["server_after"]["rss_kb"] / 1024),
]
hub, nchan = load("hub"), load("nchan")
stalled = json.load(open(f"{out}/hub-1.json"))["holds"].get("streams_stalled", 0)
print(f"{streams} streams ({stalled} stop reading), {count} messages at rate {rate}/s (0 = closed loop); medians of {runs} runs")
print(f"{'':38} {'hub':>10} {'nchan':>10} {'hub/nchan':>10}")
for name, f in rows:
    h = statistics.median(f(r) for r in hub); n = statistics.median(f(r) for r in nchan)
    ratio = f"{h / n:.2f}" if n else "-"
    print(f"{name:38} {h:10.2f} {n:10.2f} {ratio:>10}")
print(f"reports: {out}")
PY

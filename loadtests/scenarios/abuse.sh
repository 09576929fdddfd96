#!/usr/bin/env bash
# Scenario: abuse beside legitimate readers. One hub (embedded broker); READERS (5,000) SSE
# readers from many addresses (--spread-sources) get COUNT (30) messages at 1/s while an
# attacker on one address (127.0.0.9) runs, from the moment the readers are connected:
#   none           no attack (the baseline)
#   slowloris      ATTACKERS (5,000) connections sending one byte of a head every 5 s
#                  (HUB_HEAD_TIMEOUT_SECS at its default, 10)
#   slowloris-off  the same with the head timeout as long as it goes (300 s)
#   flood          ATTACKERS workers asking for streams as fast as answers come, holding every
#                  one granted, with HUB_MAX_STREAMS_PER_IP=100 HUB_CONNECT_RATE_PER_IP=20
#   flood-off      the same with the per-address limits off
# Reported per variant (medians of RUNS, 3): the readers' delivered share and p99 (and the hub's
# own publish-to-write p99 from hub_delivery_latency_seconds, which the readers' CPU does not
# touch), the hub's
# CPU per million deliveries, its RSS before the attack and at most during it, how many of 50
# newcomers (fresh addresses, 10 s into the attack) got a stream, and what the attacker got.
# PIN=1 (default): the hub on CPU 0, the readers on CPU 1, the attacker on ATTACK_ON's core:
# `server` (default) CPU 0, `readers` CPU 1. On loopback the kernel does both ends' TCP work
# for a connection (handshake, close) on the CPU of the side that sends, mostly the
# attacker's: on the readers' core that work, which on a network is the server machine's,
# delays the readers and not the hub; on the hub's core the hub pays it and the attacker's
# own user time too (the harsher place for the hub). The attacker runs at nice 19
# (ATTACK_NICE): a real attacker's CPU is neither the server's nor the readers'. Everything
# listens on loopback, stops by itself and is stopped by PID.
set -euo pipefail
cd "$(dirname "$0")/../.."
READERS=${READERS:-5000} PROCS=${PROCS:-3} COUNT=${COUNT:-30} RUNS=${RUNS:-3} ATTACKERS=${ATTACKERS:-5000}
VARIANTS=${VARIANTS:-none slowloris slowloris-off flood flood-off} PIN=${PIN:-1} ATTACK_NICE=${ATTACK_NICE:-19}
ATTACK_ON=${ATTACK_ON:-server}
SRV=() GEN=() ATK=()
if [ "$PIN" = 1 ]; then
    SRV=(taskset -c 0) GEN=(taskset -c 1)
    case $ATTACK_ON in
        server) ATK=(taskset -c 0) ;;
        readers) ATK=(taskset -c 1) ;;
        *) echo "ATTACK_ON is server or readers" >&2; exit 1 ;;
    esac
fi
cargo build -q --release -p hub -p loadtests
OUT=$(mktemp -d /tmp/scenario-abuse.XXXX)
. loadtests/scenarios/lib.sh
LOADGEN=target/release/loadgen

run_one() { # run_one <variant> <run>
    local v=$1 r=$2 pub adm hub env=() attack=()
    pub=127.0.0.1:$(free_port) adm=127.0.0.1:$(free_port)
    case $v in
        none) ;;
        slowloris) attack=(--mode slowloris --interval-ms 5000) ;;
        slowloris-off) env+=(HUB_HEAD_TIMEOUT_SECS=300); attack=(--mode slowloris --interval-ms 5000) ;;
        flood) env+=(HUB_MAX_STREAMS_PER_IP=100 HUB_CONNECT_RATE_PER_IP=20); attack=(--mode flood) ;;
        flood-off) attack=(--mode flood) ;;
        *) echo "unknown variant $v" >&2; exit 1 ;;
    esac
    env HUB_BIND="$pub" HUB_ADMIN_BIND="$adm" HUB_LOG=warn HUB_DRAIN_SECS=0 ${env[@]+"${env[@]}"} \
        "${SRV[@]}" target/release/hub > "$OUT/hub-$v-$r.out" 2> "$OUT/hub-$v-$r.err" &
    hub=$!; PIDS+=("$hub")
    wait_for 200 curl -sf "http://$adm/readyz"
    rm -f "$OUT/ready"
    "${GEN[@]}" $LOADGEN run --target "$pub" --server-pid "$hub" --path "/v1/sse?channel=public:legit" \
        --http "http://$adm" --channel "public:legit" --spread-sources 2000 \
        --streams "$READERS" --processes "$PROCS" --count "$COUNT" --rate 1 --duration 120 \
        --ready-file "$OUT/ready" --report "$OUT/report-$v-$r.json" > /dev/null 2> "$OUT/loadgen-$v-$r.err" &
    local lg=$!; PIDS+=("$lg")
    wait_for 2400 test -f "$OUT/ready"
    local rss0; rss0=$(awk '/^VmRSS:/{print $2}' "/proc/$hub/status")
    local atk=""
    if [ ${#attack[@]} -gt 0 ]; then
        ${ATK[@]+"${ATK[@]}"} nice -n "$ATTACK_NICE" $LOADGEN attack "${attack[@]}" --target "$pub" --connections "$ATTACKERS" --duration-secs $((COUNT + 5)) \
            > "$OUT/attack-$v-$r.json" 2> "$OUT/attack-$v-$r.err" &
        atk=$!; PIDS+=("$atk")
    fi
    # RSS: at most, 10 s into the attack and at its last second (flat: the end not above 10 s).
    local rssmax=$rss0 t=0 newcomers="" rss10=$rss0 rssend=$rss0
    while kill -0 "$lg" 2>/dev/null; do
        t=$((t + 1))
        if [ "$t" = 10 ]; then
            # 50 newcomers from fresh addresses: does a legitimate client still get in?
            newcomers=$(seq 1 50 | xargs -P 50 -I{} curl -s -o /dev/null -w '%{http_code}\n' -m 1 \
                --interface "127.0.1.{}" "http://$pub/v1/sse?channel=public:newcomer" \
                | sort | uniq -c | awk '{printf "%s:%s ", $2, $1}' || true)
        fi
        local now; now=$(awk '/^VmRSS:/{print $2}' "/proc/$hub/status" 2>/dev/null || echo 0)
        [ "$now" -gt "$rssmax" ] && rssmax=$now
        [ "$t" = 10 ] && rss10=$now
        [ "$now" -gt 0 ] && rssend=$now
        sleep 1
    done
    wait "$lg" || true
    if [ -n "$atk" ]; then wait "$atk" || true; fi
    local rejected
    curl -sf "http://$adm/metrics" > "$OUT/metrics-$v-$r.txt" || true
    rejected=$(awk '/^hub_connections_rejected_total/ && $2 > 0 {printf "%s=%s ", $1, $2}' "$OUT/metrics-$v-$r.txt")
    kill -TERM "$hub"; wait "$hub" 2>/dev/null || true
    python3 - "$OUT/report-$v-$r.json" "$OUT/attack-$v-$r.json" "$rss0" "$rssmax" "$rejected" "$newcomers" "$OUT/metrics-$v-$r.txt" "$rss10" "$rssend" <<'PY'
import json, sys, os, re
rep = json.load(open(sys.argv[1]))
# The hub's own view: publish to write on the stream (hub_delivery_latency_seconds), free of
# the load generator's CPU; p99 interpolated within its bucket, and the share within 50 ms.
buckets = []
for line in open(sys.argv[7]):
    m = re.match(r'hub_delivery_latency_seconds_bucket\{le="([^"]+)"\} (\S+)', line)
    if m:
        buckets.append((float("inf") if m.group(1) == "+Inf" else float(m.group(1)), float(m.group(2))))
total = buckets[-1][1] if buckets else 0
hub_p99 = hub_50 = None
if total:
    lo, below = 0.0, 0.0
    for le, n in buckets:
        if n >= 0.99 * total:
            hub_p99 = 1000 * (lo + (le - lo) * (0.99 * total - below) / max(n - below, 1)) if le != float("inf") else 1000 * lo
            break
        lo, below = le, n
    hub_50 = 100.0 * dict(buckets).get(0.05, 0) / total
atk = json.load(open(sys.argv[2])) if os.path.exists(sys.argv[2]) and os.path.getsize(sys.argv[2]) else {}
print(json.dumps({
    "opened": rep["opened"],
    "delivered_pct": 100.0 * rep["deliveries"] / max(1, rep["expected_deliveries"]),
    "p99_ms": rep["latency"]["p99_ms"],
    "cpu_per_million": rep["server_cpu_secs_per_million_deliveries"],
    "hub_p99_ms": hub_p99,
    "hub_within_50ms_pct": hub_50,
    "rss_before_mb": int(sys.argv[3]) / 1024,
    "rss_max_mb": int(sys.argv[4]) / 1024,
    "rss_10s_mb": int(sys.argv[8]) / 1024,
    "rss_end_mb": int(sys.argv[9]) / 1024,
    "attack": atk,
    "rejected": sys.argv[5],
    "newcomers": sys.argv[6],
}))
PY
}

# Interleaved (each run of every variant, then the next run): a slow drift of the machine
# (other tenants, thermal) falls on every variant alike instead of on one variant's block.
for r in $(seq "$RUNS"); do
    for v in $VARIANTS; do
        echo "$v run $r/$RUNS" >&2
        run_one "$v" "$r" > "$OUT/summary-$v-$r.json"
    done
done
python3 - "$OUT" "$RUNS" $VARIANTS <<'PY'
import json, statistics, sys
out, runs, variants = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
print(f"results in {out}; medians of {runs} runs")
base = None
for v in variants:
    rs = [json.load(open(f"{out}/summary-{v}-{r}.json")) for r in range(1, runs + 1)]
    med = lambda k: statistics.median(r[k] for r in rs if r[k] is not None)
    row = {k: med(k) for k in ["opened", "delivered_pct", "p99_ms", "cpu_per_million", "rss_before_mb", "rss_max_mb", "rss_10s_mb", "rss_end_mb", "hub_p99_ms", "hub_within_50ms_pct"]}
    if base is None:
        base = row
    atk = rs[len(rs) // 2]["attack"]
    print(f"{v:14} readers {row['opened']:.0f}  delivered {row['delivered_pct']:.1f}%  p99 {row['p99_ms']:.1f} ms "
          f"({row['p99_ms'] / max(base['p99_ms'], 1e-9):.2f}x)  CPU-s/M {row['cpu_per_million']:.1f}  "
          f"RSS {row['rss_before_mb']:.0f} -> max {row['rss_max_mb']:.0f} MB (10 s in {row['rss_10s_mb']:.0f}, end {row['rss_end_mb']:.0f})")
    print(f"{'':14} runs p99 {[round(r['p99_ms'], 1) for r in rs]}  delivered {[round(r['delivered_pct'], 1) for r in rs]}")
    print(f"{'':14} the hub's own publish-to-write p99 {row['hub_p99_ms']:.1f} ms ({row['hub_p99_ms'] / max(base['hub_p99_ms'], 1e-9):.2f}x), "
          f"{row['hub_within_50ms_pct']:.1f}% within 50 ms; runs {[round(r['hub_p99_ms'], 1) for r in rs]}")
    if atk:
        print(f"{'':14} attacker: {json.dumps({k: atk[k] for k in ['opened', 'connect_failed', 'closed_by_server', 'statuses', 'held']})}")
    print(f"{'':14} newcomers (status:count): {[r['newcomers'] for r in rs]}")
    print(f"{'':14} hub refused: {rs[len(rs) // 2]['rejected']}")
PY

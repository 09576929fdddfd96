#!/usr/bin/env bash
# Scenario: 100,000 streams across a Redis Cluster on one machine. A 3-master Redis Cluster and
# NODES (6) hubs, ~16,700 streams each (under the 20,000 descriptors a process may hold here);
# the load generator holds the streams in PROCS (12) processes, each from its own loopback
# address (holder i reads from node i mod NODES). Phases (PHASES picks some), each on fresh
# streams and fresh nodes:
#   fanout    STREAMS on one channel read on every node, 1 message/s for FANOUT_SECS (60):
#             time to connect them all, idle memory per node, the delivery p50/p99/max and
#             delivered share, Redis CPU per published message (all masters, INFO cpu; what
#             the masters spend with the nodes up and idle, measured for 10 s first, taken off)
#   channels  STREAMS over CHANNELS (10,000) channels, CHAN_MSGS (20,000) messages at CHAN_RATE
#             (500)/s, each to one channel, SETTLE (30) s after the last stream opened (the
#             presence counts of 10,000 channels on every node are written meanwhile; Redis's
#             CPU each second of it is kept): per-channel latency, Redis CPU per message
#   storm     STREAMS on one durable channel at 1/s for STORM_SECS (40) over STORM_NODES (7)
#             nodes (6 would put 20,000 streams on each of the five left: over the descriptors
#             a process may hold here); STORM_AFTER (10) s into publishing the last node stops (SIGTERM, no drain) and its streams come back with
#             Last-Event-ID on the other nodes (`--failover`: after the reconnect delay below
#             RECONNECT_MS, as EventSource's `retry:`, a refused stream goes to another node at
#             once, as a load balancer would send it): first drop to last resume, gaps, duplicates
#   presence  USERS (100,000) users, one SSE stream each with its own token, join one channel
#             over the nodes (held by PROCS `loadgen presence-users` processes), all drop and
#             come back 500 ms later (no join or leave may result), then all leave
#             (`loadgen presence-storm`, HEARTBEAT 30 s, the default): the time until an observer saw every
#             join and every leave, what `GET /v1/presence` counts, Redis calls per join and
#             leave (summed over the masters) and Redis CPU for the whole storm
#   nchan     the fan-out phase on one Redis (not a cluster), the hub and Nchan in Redis mode side
#             by side (`run.sh PEERS="hub nchan" NODES=6 MODE=redis`; 6 nginx of 2 workers):
#             streams held, memory, latency, CPU (needs nginx and libnginx-mod-nchan)
# Medians are not taken: one run of each phase (RUNS=1) holds the machine for several minutes;
# RUNS=3 repeats them. Everything listens on loopback, stops by itself and is stopped by PID.
set -euo pipefail
cd "$(dirname "$0")/../.."
STREAMS=${STREAMS:-100000} NODES=${NODES:-6} PROCS=${PROCS:-12} RUNS=${RUNS:-1}
FANOUT_SECS=${FANOUT_SECS:-60} CHANNELS=${CHANNELS:-10000} CHAN_MSGS=${CHAN_MSGS:-20000}
CHAN_RATE=${CHAN_RATE:-500} STORM_SECS=${STORM_SECS:-40} STORM_AFTER=${STORM_AFTER:-10}
RECONNECT_MS=${RECONNECT_MS:-2000} LIMIT=${LIMIT:-400} SETTLE=${SETTLE:-30}
STORM_NODES=${STORM_NODES:-7}
PHASES=${PHASES:-fanout channels storm presence nchan}
USERS=${USERS:-100000} HEARTBEAT=${HEARTBEAT:-30} SECRET=cluster-scenario-secret-of-some-length
command -v redis-server >/dev/null && command -v redis-cli >/dev/null || { echo "needs redis-server and redis-cli" >&2; exit 1; }
cargo build -q --release -p hub -p loadtests
OUT=$(mktemp -d /tmp/scenario-cluster.XXXX)
. loadtests/scenarios/lib.sh
LOADGEN=target/release/loadgen
echo "results in $OUT" >&2

RPORTS=() RPIDS=()
# A free port whose cluster bus port (+10000) exists too.
cluster_port() { local p; while :; do p=$(free_port); [ "$p" -lt 55000 ] && { echo "$p"; return; }; done; }
start_cluster() {
    RPORTS=() RPIDS=()
    local i port dir
    for i in 0 1 2; do
        port=$(cluster_port) dir="$OUT/redis$i-$RANDOM"
        mkdir -p "$dir"
        redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" \
            --cluster-enabled yes --cluster-config-file "$dir/nodes.conf" --cluster-node-timeout 5000 \
            > "$dir/log" 2>&1 &
        RPIDS+=($!); PIDS+=($!); RPORTS+=("$port")
        wait_for 100 redis-cli -p "$port" ping
    done
    redis-cli --cluster create "127.0.0.1:${RPORTS[0]}" "127.0.0.1:${RPORTS[1]}" "127.0.0.1:${RPORTS[2]}" \
        --cluster-replicas 0 --cluster-yes > "$OUT/cluster-create.log" 2>&1
    for port in "${RPORTS[@]}"; do
        wait_for 400 sh -c "redis-cli -p $port cluster info | grep -q cluster_state:ok"
    done
}
stop_cluster() { for p in "${RPIDS[@]}"; do kill -TERM "$p"; wait "$p" 2>/dev/null || true; done; RPIDS=(); }
# CPU seconds (user + sys) of every master so far.
redis_cpu() {
    local port total=0
    for port in "${RPORTS[@]}"; do
        total=$(redis-cli -p "$port" info cpu | awk -F: -v t="$total" '/^used_cpu_(sys|user):/ {t += $2} END {print t}')
    done
    echo "$total"
}

NPID=() NPUB=() NADM=()
start_hubs() { # start_hubs [extra env...]
    NPID=() NPUB=() NADM=()
    local i
    for i in $(seq 0 $((NODES - 1))); do
        NPUB[$i]=127.0.0.1:$(free_port) NADM[$i]=127.0.0.1:$(free_port)
        env HUB_BIND="${NPUB[$i]}" HUB_ADMIN_BIND="${NADM[$i]}" HUB_DRAIN_SECS=0 HUB_LOG=warn \
            HUB_MAX_CONNECTIONS=20000 HUB_NODE_ID="node$i" HUB_REDIS_URL="redis-cluster://127.0.0.1:${RPORTS[0]}" "$@" \
            target/release/hub >> "$OUT/hub$i.out" 2>> "$OUT/hub$i.err" &
        NPID[$i]=$!; PIDS+=("${NPID[$i]}")
    done
    for i in $(seq 0 $((NODES - 1))); do wait_for 400 curl -sf "http://${NADM[$i]}/readyz"; done
}
# Every node's refusals and closes by reason, kept with the phase's report.
save_rejections() { # save_rejections <report>
    local i
    for i in $(seq 0 $((NODES - 1))); do
        curl -sf "http://${NADM[$i]}/metrics" 2>/dev/null \
            | awk -v n="node$i" '/^hub_connections_(rejected|closed)_total/ && $2 > 0 {print n, $1, $2}' || true
    done > "${1%.json}-refusals.txt"
}
stop_hubs() { local p; for p in "${NPID[@]}"; do kill -TERM "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; }
rss_of() { awk '/^VmRSS:/{print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

# Redis CPU seconds per second with the nodes up and idle (pings, leases, status): taken off
# each phase's Redis CPU before it is divided by the messages.
REDIS_IDLE=""
redis_idle() {
    local a b
    a=$(redis_cpu); sleep 10; b=$(redis_cpu)
    REDIS_IDLE=$(python3 -c "print(($b - $a) / 10)")
}

# loadgen run over every node: run_streams <report> <path> <channel> <channel count> <count> <rate> [more]
# Each phase's holders leave from addresses of their own (fan-out 127.0.0.2.., channels .30..,
# storm .60..): the previous phase's 100,000 closed streams hold their ports in TIME_WAIT for
# a minute, and the kernel's search for a free port among them made opening a phase that
# reused the addresses take ~50 s instead of ~5 s (and fail a few dozen opens).
FIRST_SOURCE=2
run_streams() {
    local report=$1 path=$2 channel=$3 chans=$4 count=$5 rate=$6; shift 6
    local args=(--first-source "$FIRST_SOURCE") i
    for i in $(seq 0 $((NODES - 1))); do args+=(--target "${NPUB[$i]}" --server-pid "${NPID[$i]}"); done
    rm -f "$OUT/ready"
    $LOADGEN run "${args[@]}" --path "$path" --http "http://${NADM[0]}" --channel "$channel" \
        --channel-count "$chans" --streams "$STREAMS" --processes "$PROCS" --count "$count" --rate "$rate" \
        --duration "$LIMIT" --ready-file "$OUT/ready" --report "$report" "$@" > /dev/null 2> "${report%.json}.err" &
    LG=$!; PIDS+=("$LG")
}

phase_fanout() { # phase_fanout <run>
    local r=$1 rep="$OUT/fanout-$r.json" rss=() cpu0 cpu1 t0 t1
    start_cluster; start_hubs; redis_idle
    FIRST_SOURCE=2
    run_streams "$rep" "/v1/sse?channel=public:all" "public:all" 1 "$FANOUT_SECS" 1
    wait_for $((LIMIT * 20)) test -f "$OUT/ready"
    for i in $(seq 0 $((NODES - 1))); do rss+=("$(rss_of "${NPID[$i]}")"); done
    cpu0=$(redis_cpu); t0=$(date +%s.%N)
    wait "$LG" || true
    cpu1=$(redis_cpu); t1=$(date +%s.%N)
    python3 - "$rep" "$cpu0" "$cpu1" "$t0" "$t1" "$REDIS_IDLE" "${rss[@]}" <<'PY'
import json, sys
rep = json.load(open(sys.argv[1]))
secs = float(sys.argv[5]) - float(sys.argv[4])
rep["redis_idle_cpu_per_sec"] = float(sys.argv[6])
rep["redis_cpu_secs"] = float(sys.argv[3]) - float(sys.argv[2]) - float(sys.argv[6]) * secs
rep["node_rss_kb_connected"] = [int(x) for x in sys.argv[7:]]
json.dump(rep, open(sys.argv[1], "w"), indent=1)
PY
    save_rejections "$rep"
    stop_hubs; stop_cluster
}

phase_channels() {
    local r=$1 rep="$OUT/channels-$r.json" cpu0 cpu1 t0 t1 cpus
    start_cluster; start_hubs; redis_idle
    FIRST_SOURCE=30
    run_streams "$rep" "/v1/sse?channel=public:c{ch}" "public:c{n}" "$CHANNELS" "$CHAN_MSGS" "$CHAN_RATE" \
        --settle-secs "$SETTLE"
    wait_for $((LIMIT * 20)) test -f "$OUT/ready"
    # What the opening set off in Redis (presence counts of 10,000 channels on every node),
    # second by second until publishing starts.
    cpus=$(redis_cpu)
    for _ in $(seq "$SETTLE"); do sleep 1; cpus="$cpus $(redis_cpu)"; done
    echo "$cpus" > "$OUT/channels-$r-settle-cpu.txt"
    cpu0=$(redis_cpu); t0=$(date +%s.%N)
    wait "$LG" || true
    cpu1=$(redis_cpu); t1=$(date +%s.%N)
    python3 - "$rep" "$cpu0" "$cpu1" "$t0" "$t1" "$REDIS_IDLE" <<'PY'
import json, sys
rep = json.load(open(sys.argv[1]))
secs = float(sys.argv[5]) - float(sys.argv[4])
rep["redis_idle_cpu_per_sec"] = float(sys.argv[6])
rep["redis_cpu_secs"] = float(sys.argv[3]) - float(sys.argv[2]) - float(sys.argv[6]) * secs
json.dump(rep, open(sys.argv[1], "w"), indent=1)
PY
    save_rejections "$rep"
    stop_hubs; stop_cluster
}

phase_storm() {
    local r=$1
    local rep="$OUT/storm-$r.json" NODES=$STORM_NODES PROCS=$((STORM_NODES * 2))
    local last=$((NODES - 1))
    start_cluster; start_hubs
    FIRST_SOURCE=60
    run_streams "$rep" "/v1/sse?channel=public:storm" "public:storm" 1 "$STORM_SECS" 1 \
        --reconnect --reconnect-ms "$RECONNECT_MS" --failover
    wait_for $((LIMIT * 20)) test -f "$OUT/ready"
    sleep "$STORM_AFTER"  # publishing is under way: the last node goes now
    kill -TERM "${NPID[$last]}"; wait "${NPID[$last]}" 2>/dev/null || true
    wait "$LG" || true
    save_rejections "$rep"
    stop_hubs; stop_cluster
}

phase_presence() {
    local r=$1 rep="$OUT/presence-$r.json" targets=() masters=() cpu0 cpu1
    start_cluster; start_hubs HUB_JWT_SECRET="$SECRET" HUB_HEARTBEAT_SECS="$HEARTBEAT" \
        HUB_MAX_CONNECTIONS_PER_USER=10
    for i in $(seq 0 $((NODES - 1))); do targets+=(--target "${NPUB[$i]}"); done
    for port in "${RPORTS[@]}"; do masters+=(--redis "redis://127.0.0.1:$port"); done
    cpu0=$(redis_cpu)
    $LOADGEN presence-storm "${targets[@]}" "${masters[@]}" --admin "http://${NADM[0]}" \
        --secret "$SECRET" --users "$USERS" --processes "$PROCS" --away-ms 500 \
        --settle-secs $((HEARTBEAT + 3)) --phase-secs "$LIMIT" > "$rep" 2> "${rep%.json}.err" || true
    cpu1=$(redis_cpu)
    python3 - "$rep" "$cpu0" "$cpu1" <<'PY'
import json, sys
rep = json.load(open(sys.argv[1]))
rep["redis_cpu_secs"] = float(sys.argv[3]) - float(sys.argv[2])
json.dump(rep, open(sys.argv[1], "w"), indent=1)
PY
    save_rejections "$rep"
    stop_hubs; stop_cluster
}

phase_nchan() {
    # The peer beside the hub, both on one Redis (Nchan has no cluster mode to compare with
    # this one), through the side-by-side script: its table is printed as it is.
    PEERS="hub nchan" NODES=$NODES MODE=redis STREAMS=$STREAMS PROCS=$PROCS COUNT=$FANOUT_SECS RATE=1 \
        RUNS=1 LIMIT=$LIMIT bash loadtests/scenarios/run.sh > "$OUT/nchan-$1.txt" 2> "$OUT/nchan-$1.err" || true
}

for r in $(seq "$RUNS"); do
    for p in $PHASES; do echo "run $r/$RUNS: $p" >&2; "phase_$p" "$r"; done
done
python3 - "$OUT" "$RUNS" "$NODES" "$STREAMS" $PHASES <<'PY'
import json, os, statistics, sys
out, runs, nodes, streams, phases = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:]
def load(p):
    return [json.load(open(f"{out}/{p}-{r}.json")) for r in range(1, runs + 1) if os.path.exists(f"{out}/{p}-{r}.json")]
med = lambda xs: statistics.median(xs) if xs else float("nan")
print(f"{streams} streams, {nodes} hubs on a 3-master Redis Cluster; medians of {runs} run(s); results in {out}")
if "fanout" in phases and load("fanout"):
    rs = load("fanout")
    sent = [r["publish"]["sent"] for r in rs]
    print(f"fanout    opened {med([r['opened'] for r in rs]):.0f}  connect {med([r['connect_secs'] for r in rs]):.1f} s  "
          f"delivered {med([100 * r['deliveries'] / max(1, r['expected_deliveries']) for r in rs]):.2f}%  "
          f"p50 {med([r['latency']['p50_ms'] for r in rs]):.0f} ms  p99 {med([r['latency']['p99_ms'] for r in rs]):.0f} ms  "
          f"max {med([r['latency']['max_ms'] for r in rs]):.0f} ms  gaps {med([r['gaps'] for r in rs]):.0f}  dups {med([r['duplicates'] for r in rs]):.0f}")
    per_node = [statistics.mean(r["node_rss_kb_connected"]) / 1024 for r in rs]
    print(f"          RSS per node with every stream open {med(per_node):.0f} MB ({med([r['server_rss_kb_per_stream'] or 0 for r in rs]):.2f} KB per stream over the idle nodes)  "
          f"hub CPU {med([r['server_cpu_secs_per_million_deliveries'] or 0 for r in rs]):.1f} s per million deliveries  "
          f"Redis CPU {1000 * med([r['redis_cpu_secs'] / max(1, r['publish']['sent']) for r in rs]):.2f} ms per published message "
          f"(beyond {1000 * med([r['redis_idle_cpu_per_sec'] for r in rs]):.0f} ms a second with the nodes idle)")
if "channels" in phases and load("channels"):
    rs = load("channels")
    print(f"channels  delivered {med([100 * r['deliveries'] / max(1, r['expected_deliveries']) for r in rs]):.2f}%  "
          f"p50 {med([r['latency']['p50_ms'] for r in rs]):.1f} ms  p99 {med([r['latency']['p99_ms'] for r in rs]):.1f} ms  "
          f"max {med([r['latency']['max_ms'] for r in rs]):.0f} ms  published {med([r['publish']['sent'] / max(r['publish']['secs'], 1e-9) for r in rs]):.0f}/s  "
          f"Redis CPU {1000 * med([r['redis_cpu_secs'] / max(1, r['publish']['sent']) for r in rs]):.3f} ms per message  gaps {med([r['gaps'] for r in rs]):.0f}")
if "storm" in phases and load("storm"):
    rs = load("storm")
    print(f"storm     reconnected {med([r['reconnects'] for r in rs]):.0f}  still down {med([r['still_down'] for r in rs]):.0f}  "
          f"first drop to last resume {med([r['resume_secs'] or 0 for r in rs]):.2f} s  resume p50 {med([r['resume']['p50_ms'] for r in rs]):.0f} ms "
          f"p99 {med([r['resume']['p99_ms'] for r in rs]):.0f} ms  delivered {med([100 * r['deliveries'] / max(1, r['expected_deliveries']) for r in rs]):.2f}%  "
          f"gaps {med([r['gaps'] for r in rs]):.0f}  dups {med([r['duplicates'] for r in rs]):.0f}  retries {med([r['reconnect_retries'] for r in rs]):.0f}")
if "presence" in phases and load("presence"):
    rs = load("presence")
    keys = ["users", "joins_seen", "join_all_secs", "admin_users", "reconnect_storm_events", "leaves_seen",
            "leave_all_secs", "redis_calls_per_join", "presence_calls_per_join", "redis_calls_per_leave", "redis_cpu_secs"]
    print("presence  " + "  ".join(f"{k} {med([r[k] for r in rs if r.get(k) is not None]):.4g}" for k in keys))
PY
for r in $(seq "$RUNS"); do
    if [[ " $PHASES " == *" nchan "* ]] && [ -f "$OUT/nchan-$r.txt" ]; then
        echo "nchan (run $r): the hub and Nchan on one Redis, $STREAMS streams asked for"
        grep -v '^run ' "$OUT/nchan-$r.txt" | grep -E 'streams opened|connect all|RSS per idle|delivered /|latency|CPU-s per|RSS at the end|refused|hub/nchan' || true
    fi
done

#!/usr/bin/env bash
# One workload against the hub and Nchan, side by side in the same run (issue 5's scenarios are
# this script with different settings: see the wrappers next to it and ../../BENCHMARKS.md).
# Servers alternate, RUNS times each; one table of medians and hub/Nchan ratios is printed.
# Everything it starts (redis-server, hubs, nginx) listens on loopback and is stopped by PID.
#
#   STREAMS PROCS   streams in all, held by PROCS loadgen processes (127.0.0.2, .3, ...)
#   CHANNELS        streams spread over this many channels; messages go to them in turn
#   COUNT RATE      messages, per second (RATE=0: each as soon as the previous one is answered;
#                   COUNT=0: idle streams only)
#   NODES MODE      server processes; MODE=memory (embedded broker / Nchan memory store) or
#                   MODE=redis (one redis-server shared by all nodes; forced when NODES > 1)
#   TRANSPORT       sse or ws
#   STALL PAD       streams that stop reading once open; padding bytes per message
#   STORM=1         every node is restarted (SIGTERM, started again on the same port) STORM_AFTER
#                   seconds into publishing; streams come back with Last-Event-ID (a hub
#                   WebSocket: subscribes with "since") after a random delay below RECONNECT_MS
#                   (EventSource waits the hub's `retry:` 2000 ms); publishes refused while a
#                   node is down are tried again. MODE=redis keeps history across the restart;
#                   MODE=memory loses it (and what was published meanwhile) with the node, as
#                   Sockudo, which has no history, always does
#   CAP             the server's stream limit (hub: HUB_MAX_CONNECTIONS; Nchan:
#                   nchan_max_channel_subscribers, per channel), default 20000
#   CHURN_MS        churn: each stream closes after a random time below this and opens again,
#                   fresh, until LIMIT; refused attempts are counted (COUNT=0 for no messages)
#   WAKE_MS         sleepers: the STALL streams read on after this long and must get everything;
#   STALL_RCVBUF    their socket receive buffer (bytes), so that they really stop the server
#   LEAVE_AFTER     returners: every stream leaves after this many messages, stays away AWAY_MS,
#   AWAY_MS         and comes back with Last-Event-ID; catch-up time measured
#   STEP_RATES      throughput: publish at each of these rates (STEP_SECS seconds each, fresh
#                   channels) until one is not delivered 100%; the highest that was is reported
#   PEERS           which servers to measure ("hub nchan"; "hub sockudo": Sockudo, the
#                   Pusher-protocol WebSocket server, TRANSPORT=ws and MODE=memory only;
#                   installed on first use into ~/.cache/hub-loadtests, see sockudo.sh)
#   PIN=1           servers (and Redis) on CPU 0, the load generator on CPU 1 (taskset), so
#                   that a server is measured on a core of its own rather than sharing both
#   AFTER           after the streams close, the servers' RSS is read 1, 10, 30 and AFTER seconds
#                   later (memory given back after a burst; 0: not read)
#   LIMIT           longest a run may take, seconds
#   HUB_BIN HUB_LOG another hub binary (an older build, to compare); its log level (warn)
#   COMPRESS=1      streams ask for compression (SSE Accept-Encoding: gzip, WebSocket
#                   permessage-deflate; Nchan: nchan_deflate_message_for_websocket on);
#                   PAD_JSON=1 makes the padding JSON records instead of one repeated byte
#   HOOK=1          the hub authorizes every stream through its authorization hook
#                   (HUB_AUTH_URL: `loadgen auth-hook`, answering locally, a user per call):
#                   channels are protected (room:...) instead of public:...; every stream
#                   sends a session cookie of its own, as browsers do; hub only
set -euo pipefail
cd "$(dirname "$0")/../.."
STREAMS=${STREAMS:-10000} PROCS=${PROCS:-5} COUNT=${COUNT:-20} RUNS=${RUNS:-3} RATE=${RATE:-1}
CHANNELS=${CHANNELS:-1} NODES=${NODES:-1} MODE=${MODE:-memory} TRANSPORT=${TRANSPORT:-sse}
STALL=${STALL:-0} PAD=${PAD:-0} STORM=${STORM:-0} STORM_AFTER=${STORM_AFTER:-3}
RECONNECT_MS=${RECONNECT_MS:-2000} PEERS=${PEERS:-hub nchan} LIMIT=${LIMIT:-120} PIN=${PIN:-0}
AFTER=${AFTER:-0} CAP=${CAP:-20000} CHURN_MS=${CHURN_MS:-0} WAKE_MS=${WAKE_MS:-0} STALL_RCVBUF=${STALL_RCVBUF:-0}
LEAVE_AFTER=${LEAVE_AFTER:-0} AWAY_MS=${AWAY_MS:-0} STEP_RATES=${STEP_RATES:-} STEP_SECS=${STEP_SECS:-5}
HOOK=${HOOK:-0} NS=public COMPRESS=${COMPRESS:-0} PAD_JSON=${PAD_JSON:-0}
if [ "$HOOK" = 1 ]; then
    NS=room
    [[ " $PEERS " == *" nchan "* ]] && { echo "HOOK=1 measures the hub only: set PEERS=hub" >&2; exit 1; }
fi
SRV=() GEN=()
if [ "$PIN" = 1 ]; then SRV=(taskset -c 0) GEN=(taskset -c 1); fi
[ "$NODES" -gt 1 ] && MODE=redis
[ $((COUNT % CHANNELS)) -eq 0 ] || { echo "COUNT must be a multiple of CHANNELS (each stream expects COUNT/CHANNELS)" >&2; exit 1; }
if [[ " $PEERS " == *" nchan "* ]]; then
    command -v nginx >/dev/null && [ -f /usr/lib/nginx/modules/ngx_nchan_module.so ] || {
        echo "needs nginx and libnginx-mod-nchan (apt-get install nginx libnginx-mod-nchan)" >&2; exit 1; }
fi
SOCKUDO=""
if [[ " $PEERS " == *" sockudo "* ]]; then
    [ "$TRANSPORT" = ws ] && [ "$MODE" = memory ] && [ "$NODES" = 1 ] || {
        echo "Sockudo is measured over WebSocket, one node, its local adapter: TRANSPORT=ws MODE=memory NODES=1" >&2; exit 1; }
    SOCKUDO=$(bash loadtests/scenarios/sockudo.sh)
fi
[ "$MODE" = redis ] && ! command -v redis-server >/dev/null && { echo "needs redis-server" >&2; exit 1; }
cargo build -q --release -p hub -p loadtests
OUT=$(mktemp -d /tmp/scenario.XXXX)
LOADGEN=target/release/loadgen

. loadtests/scenarios/lib.sh

REDIS_PID="" REDIS_URL=""
start_redis() {
    local port; port=$(free_port)
    "${SRV[@]}" redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no > "$OUT/redis.log" 2>&1 &
    REDIS_PID=$!; PIDS+=("$REDIS_PID"); REDIS_URL="redis://127.0.0.1:$port"
    wait_for 100 redis-cli -p "$port" ping
}
stop_redis() {
    if [ -n "$REDIS_PID" ]; then kill -TERM "$REDIS_PID"; wait "$REDIS_PID" || true; REDIS_PID=""; fi
}

# Node i of the current server: its pid, public address, and (hub) admin address.
declare -a NPID NPUB NADM NDIR
start_hub() { # start_hub <i>
    local i=$1
    [ -n "${NPUB[$i]:-}" ] || NPUB[$i]=127.0.0.1:$(free_port)
    [ -n "${NADM[$i]:-}" ] || NADM[$i]=127.0.0.1:$(free_port)
    local env=(HUB_BIND="${NPUB[$i]}" HUB_ADMIN_BIND="${NADM[$i]}" HUB_DRAIN_SECS=0 HUB_LOG="${HUB_LOG:-warn}"
               HUB_MAX_CONNECTIONS="$CAP" HUB_NODE_ID="node$i")
    if [ "$MODE" = redis ]; then env+=(HUB_REDIS_URL="$REDIS_URL"); fi
    if [ "$HOOK" = 1 ]; then env+=(HUB_AUTH_URL="http://$HOOK_ADDR/auth"); fi
    env "${env[@]}" "${SRV[@]}" "${HUB_BIN:-target/release/hub}" >> "$OUT/hub$i.out" 2>> "$OUT/hub$i.err" &
    NPID[$i]=$!; PIDS+=("${NPID[$i]}")
    wait_for 200 curl -sf "http://${NADM[$i]}/readyz"
}
start_nchan() { # start_nchan <i>
    local i=$1 dir="$OUT/nchan$i" redis=""
    mkdir -p "$dir"
    [ -n "${NPUB[$i]:-}" ] || NPUB[$i]=127.0.0.1:$(free_port)
    if [ "$MODE" = redis ]; then redis="nchan_redis_url \"$REDIS_URL\"; nchan_use_redis on;"; fi
    local deflate=""; if [ "$COMPRESS" = 1 ]; then deflate="nchan_deflate_message_for_websocket on;"; fi
    sed -e "s#__PORT__#${NPUB[$i]#*:}#; s#__DIR__#$dir#g; s#__REDIS__#$redis#; s#__MAXSUBS__#$CAP#; s#__DEFLATE__#$deflate#" loadtests/nchan.conf > "$dir/nginx.conf"
    rm -f "$dir/nginx.pid"
    "${SRV[@]}" nginx -p "$dir" -c "$dir/nginx.conf" -g 'daemon off;' &
    NPID[$i]=$!; PIDS+=("${NPID[$i]}")
    wait_for 200 curl -s -o /dev/null "http://${NPUB[$i]}/pub?id=probe"
}
start_sockudo() { # start_sockudo <i>
    local i=$1 dir="$OUT/sockudo$i"
    mkdir -p "$dir"
    [ -n "${NPUB[$i]:-}" ] || NPUB[$i]=127.0.0.1:$(free_port)
    sed -e "s#__PORT__#${NPUB[$i]#*:}#; s#__MAXCONN__#$CAP#" loadtests/sockudo.json > "$dir/config.json"
    # Its log level: warnings (it logs every connection at info).
    (cd "$dir" && exec env RUST_LOG=warn "${SRV[@]}" "$SOCKUDO" --config "$dir/config.json") > "$dir/out.log" 2>&1 &
    NPID[$i]=$!; PIDS+=("${NPID[$i]}")
    wait_for 200 curl -sf "http://${NPUB[$i]}/up/bench"
}
stop_node() { kill -TERM "${NPID[$1]}"; wait "${NPID[$1]}" || true; }
HOOK_PID="" HOOK_ADDR=""
if [ "$HOOK" = 1 ]; then
    HOOK_ADDR=127.0.0.1:$(free_port)
    "${SRV[@]}" $LOADGEN auth-hook --listen "$HOOK_ADDR" --duration $((LIMIT * RUNS + 600)) > "$OUT/hook.out" 2>&1 &
    HOOK_PID=$!; PIDS+=("$HOOK_PID")
fi

# One loadgen run against the started nodes: loadgen <server> <report file> <channel prefix>
#   <count> <rate>.
loadgen_run() {
    local server=$1 report=$2 pre=$3 count=$4 rate=$5 args=()
    for i in $(seq 0 $((NODES - 1))); do args+=(--target "${NPUB[$i]}" --server-pid "${NPID[$i]}"); done
    if [ -n "$REDIS_PID" ]; then args+=(--server-pid "$REDIS_PID"); fi
    if [ "$server" = hub ]; then
        if [ "$TRANSPORT" = ws ]; then
            args+=(--ws --path /v1/ws --subscribe "{\"op\":\"subscribe\",\"channel\":\"$NS:${pre}c{ch}\"}")
        else
            args+=(--path "/v1/sse?channel=$NS:${pre}c{ch}")
        fi
        if [ "$MODE" = redis ]; then args+=(--redis "$REDIS_URL"); else args+=(--http "http://${NADM[0]}"); fi
        args+=(--channel "$NS:${pre}c{n}")
    elif [ "$server" = sockudo ]; then
        args+=(--ws --path "/app/bench-key?protocol=7&client=loadgen&version=1"
               --subscribe "{\"event\":\"pusher:subscribe\",\"data\":{\"channel\":\"${pre}c{ch}\"}}"
               --pusher "http://${NPUB[0]}" --channel "${pre}c{n}")
    else
        # Nchan serves an EventSource subscriber only to `Accept: text/event-stream` (the hub is
        # asked without it, so that its refusals come as statuses, counted by reason).
        if [ "$TRANSPORT" = ws ]; then args+=(--ws --path "/ws/${pre}c{ch}"); else args+=(--path "/sub/${pre}c{ch}" --accept-event-stream); fi
        args+=(--raw-post "http://${NPUB[0]}/pub?id={channel}" --channel "${pre}c{n}")
    fi
    if [ "$STORM" = 1 ]; then args+=(--reconnect --reconnect-ms "$RECONNECT_MS" --retry-secs 30); fi
    # Opening 10,000 streams at once through the hook is itself a storm: refused first opens
    # come back, as EventSources would.
    if [ "$HOOK" = 1 ]; then args+=(--open-retries 20 --session-cookie); fi
    if [ "$COMPRESS" = 1 ]; then args+=(--compress); fi
    if [ "$PAD_JSON" = 1 ]; then args+=(--pad-json); fi
    args+=(--churn-ms "$CHURN_MS" --wake-ms "$WAKE_MS" --stall-rcvbuf "$STALL_RCVBUF"
           --leave-after "$LEAVE_AFTER" --away-ms "$AWAY_MS")
    rm -f "$OUT/ready"
    # Each server's streams leave from addresses of their own (hub 127.0.0.2.., Nchan
    # 127.0.0.130.., Sockudo 127.0.0.190..): the previous run's closed streams hold their ports in TIME_WAIT for a
    # minute, and with thousands of those on one address the kernel's search for a port to
    # bind slows every open of the next run (seen at 100,000 streams: 5 s became 50 s).
    local first=130; case $server in hub) first=2 ;; sockudo) first=190 ;; esac
    args+=(--first-source "$first")
    "${GEN[@]}" $LOADGEN run "${args[@]}" --streams "$STREAMS" --processes "$PROCS" --channel-count "$CHANNELS" \
        --count "$count" --rate "$rate" --stall "$STALL" --pad "$PAD" --duration "$LIMIT" \
        --ready-file "$OUT/ready" --report "$report" > /dev/null 2> "${report%.json}.err" &
    LG=$!
}

# RSS (KB) of every node and its children (nginx's workers) now.
rss_now() {
    local total=0 p
    for i in $(seq 0 $((NODES - 1))); do
        for p in "${NPID[$i]}" $(pgrep -P "${NPID[$i]}" || true); do
            total=$((total + $(awk '/^VmRSS:/{print $2}' "/proc/$p/status" 2>/dev/null || echo 0)))
        done
    done
    echo "$total"
}
after_rss() { # after_rss <report>: adds {"1": kb, "10": kb, ...} as rss_after_kb
    local report=$1 start t pairs=""
    start=$(date +%s.%N)
    for t in 1 10 30 "$AFTER"; do
        sleep "$(python3 -c "import time; print(max(0, $start + $t - time.time()))")"
        pairs="$pairs\"$t\": $(rss_now), "
    done
    python3 - "$report" "{${pairs%, }}" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
r["rss_after_kb"] = json.loads(sys.argv[2])
json.dump(r, open(sys.argv[1], "w"), indent=1)
PY
}

run_one() { # run_one <hub|nchan> <run number>
    local server=$1 r=$2
    NPID=() NPUB=() NADM=()
    if [ "$MODE" = redis ]; then start_redis; fi
    for i in $(seq 0 $((NODES - 1))); do "start_$server" "$i"; done
    if [ -n "$STEP_RATES" ]; then
        # Throughput: step the rate up on fresh channels until delivery is not 100%.
        local k=0 best=0
        for rate in $STEP_RATES; do
            k=$((k + 1))
            loadgen_run "$server" "$OUT/$server-$r-step$k.json" "s$k" $((rate * STEP_SECS)) "$rate"
            wait "$LG" || true
            if ! python3 - "$OUT/$server-$r-step$k.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
ok = r["opened"] > 0 and r["deliveries"] == r["expected_deliveries"] and r["gaps"] == 0 and r["duplicates"] == 0
sys.exit(0 if ok else 1)
PY
            then break; fi
            best=$k
        done
        python3 - "$OUT" "$server" "$r" "$best" <<'PY'
import json, sys
out, server, r, best = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
steps = []
k = 1
while True:
    try:
        steps.append(json.load(open(f"{out}/{server}-{r}-step{k}.json")))
    except FileNotFoundError:
        break
    k += 1
# The run's report: the last step delivered in full (or the first, if none was), with the
# publish rate it achieved as the sustained rate.
rep = dict(steps[best - 1] if best else steps[0])
rep["sustained_rate"] = (rep["publish"]["sent"] / rep["publish"]["secs"]) if best and rep["publish"]["secs"] else 0
rep["steps"] = [{"sent": s["publish"]["sent"], "secs": s["publish"]["secs"], "delivered": s["deliveries"], "expected": s["expected_deliveries"]} for s in steps]
json.dump(rep, open(f"{out}/{server}-{r}.json", "w"), indent=1)
PY
    else
        loadgen_run "$server" "$OUT/$server-$r.json" "" "$COUNT" "$RATE"
        if [ "$STORM" = 1 ]; then
            wait_for $((LIMIT * 20)) test -f "$OUT/ready"
            sleep "$STORM_AFTER"  # publishing is under way: restart every node now
            for i in $(seq 0 $((NODES - 1))); do stop_node "$i"; "start_$server" "$i"; done
        fi
        wait "$LG"
        if [ "$AFTER" -gt 0 ]; then after_rss "$OUT/$server-$r.json"; fi
    fi
    if [ "$server" = hub ]; then  # the hub's own publish-to-write histogram, for the table
        for i in $(seq 0 $((NODES - 1))); do
            curl -sf "http://${NADM[$i]}/metrics" > "$OUT/hub-$r-node$i.metrics" || true
        done
    fi
    for i in $(seq 0 $((NODES - 1))); do stop_node "$i"; done
    stop_redis
}

for r in $(seq "$RUNS"); do
    for s in $PEERS; do echo "run $r/$RUNS: $s" >&2; run_one "$s" "$r"; done
done

# The kernel settings a reconnect storm's figure depends on (listen backlog, SYN queue).
KERNEL="somaxconn=$(sysctl -n net.core.somaxconn 2>/dev/null || echo ?) tcp_max_syn_backlog=$(sysctl -n net.ipv4.tcp_max_syn_backlog 2>/dev/null || echo ?) syncookies=$(sysctl -n net.ipv4.tcp_syncookies 2>/dev/null || echo ?)"
python3 loadtests/scenarios/table.py "$OUT" "$RUNS" "$PEERS" \
    "$KERNEL; $STREAMS streams over $CHANNELS channel(s), $TRANSPORT, $NODES node(s), $MODE mode, pinned=$PIN; $COUNT messages at $RATE/s (0 = closed loop); $STALL stop reading (wake after ${WAKE_MS} ms); storm=$STORM; churn=${CHURN_MS} ms; leave after ${LEAVE_AFTER} for ${AWAY_MS} ms; steps=${STEP_RATES:-none}; cap=$CAP"

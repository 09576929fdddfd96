#!/usr/bin/env bash
# Scenario: compression (issue 24). Each message is PAD bytes of JSON records (PAD_JSON=1).
#   1. Bytes on the wire per delivery for 200 B, 2 KB and 20 KB messages (SIZES), BYTES_STREAMS
#      (1,000) streams, 10 messages: the hub's SSE plain and gzip, its WebSocket plain and
#      permessage-deflate, Nchan's WebSocket plain and permessage-deflate
#      (nchan_deflate_message_for_websocket), one run each (the bytes do not vary between runs).
#   2. CPU per delivery and memory per idle stream at STREAMS (10,000), 2 KB messages, 1/s for
#      COUNT (20) s, RUNS (3) runs: SSE plain against gzip (the hub), WebSocket plain against
#      permessage-deflate (the hub and Nchan side by side).
# Each line is run.sh's table (medians and hub/Nchan ratios); everything stops by itself.
set -euo pipefail
cd "$(dirname "$0")/../.."
SIZES=${SIZES:-200 2000 20000} BYTES_STREAMS=${BYTES_STREAMS:-1000} STREAMS=${STREAMS:-10000}
RUNS=${RUNS:-3} COUNT=${COUNT:-20} PART=${PART:-1 2}
run() { # run <label> <env...>
    local label=$1; shift
    echo "== $label"
    env "$@" PAD_JSON=1 bash loadtests/scenarios/run.sh 2>/dev/null \
        | grep -E "^(delivered / expected|bytes on the wire|server CPU-s per million|server RSS per idle|latency p99)" || true
}
for part in $PART; do
    if [ "$part" = 1 ]; then
        for size in $SIZES; do
            pad=$((size - 24))
            common=(STREAMS="$BYTES_STREAMS" PROCS=1 COUNT=10 RUNS=1 PAD="$pad")
            run "$size B, SSE plain (hub)" "${common[@]}" TRANSPORT=sse COMPRESS=0 PEERS=hub
            run "$size B, SSE gzip (hub)" "${common[@]}" TRANSPORT=sse COMPRESS=1 PEERS=hub
            run "$size B, WebSocket plain (hub, Nchan)" "${common[@]}" TRANSPORT=ws COMPRESS=0 PEERS="hub nchan"
            run "$size B, WebSocket permessage-deflate (hub, Nchan)" "${common[@]}" TRANSPORT=ws COMPRESS=1 PEERS="hub nchan"
        done
    fi
    if [ "$part" = 2 ]; then
        common=(STREAMS="$STREAMS" PROCS=5 COUNT="$COUNT" RUNS="$RUNS" PAD=1976)
        run "2 KB at $STREAMS streams, SSE plain (hub)" "${common[@]}" TRANSPORT=sse COMPRESS=0 PEERS=hub
        run "2 KB at $STREAMS streams, SSE gzip (hub)" "${common[@]}" TRANSPORT=sse COMPRESS=1 PEERS=hub
        run "2 KB at $STREAMS streams, WebSocket plain (hub, Nchan)" "${common[@]}" TRANSPORT=ws COMPRESS=0 PEERS="hub nchan"
        run "2 KB at $STREAMS streams, WebSocket permessage-deflate (hub, Nchan)" "${common[@]}" TRANSPORT=ws COMPRESS=1 PEERS="hub nchan"
    fi
done

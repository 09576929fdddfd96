#!/usr/bin/env bash
# Every scenario, one after the other, hub and Nchan side by side (about 80 minutes).
# Output goes to the terminal and to $OUT (default /tmp/scenarios-<time>.txt).
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-/tmp/scenarios-$(date +%Y%m%d-%H%M%S).txt}
run() { echo "== $*" | tee -a "$OUT"; env "$@" 2>/dev/null | tee -a "$OUT"; echo | tee -a "$OUT"; }
run ./idle.sh
run STREAMS=18000 PROCS=6 ./idle.sh
run ./fanout.sh
run MODE=redis ./fanout.sh
run TRANSPORT=ws ./fanout.sh
run PIN=1 ./fanout.sh
run ./throughput.sh
run ./channels.sh
run ./multinode.sh
run ./storm.sh
run ./slow.sh
run ./churn.sh
run ./sleepers.sh
run BASELINE=1 ./sleepers.sh
run ./returners.sh
run MODE=redis ./returners.sh
echo "all results: $OUT"

#!/usr/bin/env bash
# Runs a scenario alternately against two hub builds, PAIRS times (old first, then this
# checkout's release build), each invocation with RUNS=1; every run's table goes to the log.
#
#   OLD=<path to the other build's hub binary> PAIRS=3 bash loadtests/scenarios/compare.sh fanout.sh
#
# Other settings (PEERS, TRANSPORT, STREAMS...) pass through to the scenario; PEERS defaults to
# "hub" (set PEERS="hub nchan" to have Nchan in each invocation too).
set -euo pipefail
cd "$(dirname "$0")"
scenario=${1:?usage: compare.sh <scenario.sh>}
: "${OLD:?OLD must name the hub binary of the other build}"
[ -x "$OLD" ] || { echo "OLD=$OLD is not an executable" >&2; exit 1; }
PAIRS=${PAIRS:-3}
export PEERS=${PEERS:-hub} RUNS=1
for i in $(seq 1 "$PAIRS"); do
    echo "=== pair $i: old ($OLD)"
    HUB_BIN="$OLD" bash "$scenario"
    echo "=== pair $i: new (this checkout)"
    bash "$scenario"
done

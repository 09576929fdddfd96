#!/usr/bin/env bash
# Scenario 5: multi-node, three server processes on one Redis, 6,000 streams each, the fan-out workload.
# Settings can be overridden from the environment (see run.sh); RUNS=3 by default.
exec env NODES=3 STREAMS=${STREAMS:-18000} PROCS=${PROCS:-6} COUNT=${COUNT:-20} RATE=${RATE:-1} MODE=redis "$(dirname "$0")/run.sh"

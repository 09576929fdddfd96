#!/usr/bin/env bash
# Scenario 7: slow readers, 100 streams that stop reading among 1,000 that read, 1 KB messages as fast as replies come.
# Settings can be overridden from the environment (see run.sh); RUNS=3 by default.
exec env STREAMS=${STREAMS:-1100} STALL=${STALL:-100} PROCS=${PROCS:-1} COUNT=${COUNT:-3000} RATE=0 PAD=${PAD:-1000} "$(dirname "$0")/run.sh"

#!/usr/bin/env bash
# Scenario 1: idle streams on one channel: memory per stream, time to connect all (STREAMS=18000 PROCS=6 for the large run).
# Settings can be overridden from the environment (see run.sh); RUNS=3 by default.
exec env STREAMS=${STREAMS:-10000} PROCS=${PROCS:-5} COUNT=0 "$(dirname "$0")/run.sh"

#!/usr/bin/env bash
# Scenario 3: throughput, 1,000 streams, each message published as soon as the previous one is answered.
# Settings can be overridden from the environment (see run.sh); RUNS=3 by default.
exec env STREAMS=${STREAMS:-1000} PROCS=${PROCS:-1} COUNT=${COUNT:-5000} RATE=0 "$(dirname "$0")/run.sh"

#!/usr/bin/env bash
# Scenario 2: fan-out, 10,000 streams on one channel, 1 message/s for 20 s (MODE=redis: hub on Redis vs Nchan on Redis; TRANSPORT=ws: WebSockets).
# Settings can be overridden from the environment (see run.sh); RUNS=3 by default.
exec env STREAMS=${STREAMS:-10000} PROCS=${PROCS:-5} COUNT=${COUNT:-20} RATE=${RATE:-1} "$(dirname "$0")/run.sh"

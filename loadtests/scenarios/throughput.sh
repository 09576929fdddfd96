#!/usr/bin/env bash
# Scenario 3, throughput: 1,000 readers of one channel; the publish rate steps up (5 s per step,
# fresh channels each) until a step is not delivered 100% (in order, no gap, no duplicate); the
# highest rate that was is the result. Settings can be overridden from the environment (see
# run.sh); STEP_RATES="" with RATE=0 gives the old closed loop.
exec env STREAMS=${STREAMS:-1000} PROCS=${PROCS:-1} STEP_RATES="${STEP_RATES-500 1000 2000 4000 8000 16000}" STEP_SECS=${STEP_SECS:-5} LIMIT=${LIMIT:-60} "$(dirname "$0")/run.sh"

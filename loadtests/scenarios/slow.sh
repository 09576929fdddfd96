#!/usr/bin/env bash
# Scenario 7: slow readers, 100 streams that stop reading among 1,000 that read, 1 KB messages at
# 200/s for 10 s (BASELINE=1: the same 1,000 readers without the stalled streams, to compare
# the readers' latency with). Settings can be overridden from the environment (see run.sh).
if [ "${BASELINE:-0}" = 1 ]; then STREAMS=${STREAMS:-1000} STALL=0; fi
exec env STREAMS=${STREAMS:-1100} STALL=${STALL:-100} PROCS=${PROCS:-1} COUNT=${COUNT:-2000} RATE=${RATE:-200} PAD=${PAD:-1000} "$(dirname "$0")/run.sh"

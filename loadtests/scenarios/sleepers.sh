#!/usr/bin/env bash
# Sleepers: 10% of 10,000 streams stop reading (4 KB receive buffer) while 1 KB durable messages
# flow at 40/s, then read on 22 s after they opened (about 20 s of messages missed, more than a
# stream's queue); every stream must get every message. The server's memory is sampled just
# before they wake (BASELINE=1: the same run without sleepers, for the memory per lagging stream).
# Settings can be overridden from the environment (see run.sh).
if [ "${BASELINE:-0}" = 1 ]; then STALL=0; fi
exec env STREAMS=${STREAMS:-10000} PROCS=${PROCS:-5} STALL=${STALL:-1000} WAKE_MS=${WAKE_MS:-22000} STALL_RCVBUF=${STALL_RCVBUF:-4096} COUNT=${COUNT:-1000} RATE=${RATE:-40} PAD=${PAD:-1000} LIMIT=${LIMIT:-90} "$(dirname "$0")/run.sh"

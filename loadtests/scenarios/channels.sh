#!/usr/bin/env bash
# Scenario 4: many channels, 10,000 streams over 2,000 channels, 500 messages/s for 20 s spread over them.
# Settings can be overridden from the environment (see run.sh); RUNS=3 by default.
exec env STREAMS=${STREAMS:-10000} PROCS=${PROCS:-5} CHANNELS=${CHANNELS:-2000} COUNT=${COUNT:-10000} RATE=${RATE:-500} "$(dirname "$0")/run.sh"

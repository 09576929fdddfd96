#!/usr/bin/env bash
# Scenario 6: reconnect storm, 10,000 streams; their node restarts while durable messages flow (20/s); streams resume with Last-Event-ID.
# Against Sockudo (no history): PEERS="hub sockudo" TRANSPORT=ws MODE=memory.
# Settings can be overridden from the environment (see run.sh); RUNS=3 by default.
exec env STREAMS=${STREAMS:-10000} PROCS=${PROCS:-5} COUNT=${COUNT:-300} RATE=${RATE:-20} STORM=1 MODE=${MODE:-redis} "$(dirname "$0")/run.sh"

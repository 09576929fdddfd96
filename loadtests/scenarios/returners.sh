#!/usr/bin/env bash
# Returners: 1,000 streams read 100 durable messages, leave, stay away 5 s while the other 900 of
# 1,000 are published (400/s), and come back with Last-Event-ID: every stream must get all 1,000,
# none twice; the time from coming back to having everything is the catch-up time.
# Settings can be overridden from the environment (see run.sh).
exec env STREAMS=${STREAMS:-1000} PROCS=${PROCS:-1} LEAVE_AFTER=${LEAVE_AFTER:-100} AWAY_MS=${AWAY_MS:-5000} COUNT=${COUNT:-1000} RATE=${RATE:-400} LIMIT=${LIMIT:-60} "$(dirname "$0")/run.sh"

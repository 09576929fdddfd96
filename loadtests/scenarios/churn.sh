#!/usr/bin/env bash
# Churn: clients connect and leave continuously at the cap. CAP streams, each closing after a
# random time below 2 s and opening again at once, for 30 s: since no more than the cap are
# ever connected, every refusal is one a released stream should not have caused (must be 0).
# Settings can be overridden from the environment (see run.sh).
exec env STREAMS=${STREAMS:-5000} CAP=${CAP:-${STREAMS:-5000}} PROCS=${PROCS:-5} CHURN_MS=${CHURN_MS:-2000} COUNT=${COUNT:-0} LIMIT=${LIMIT:-30} "$(dirname "$0")/run.sh"

#!/usr/bin/env bash
# Scenario: idle SSE streams over HTTPS, HTTP/2 (PER_CONN streams per connection, 20 by default:
# a page with 20 EventSources) against HTTP/1.1 (one connection per stream), side by side in the
# same run: the hub's RSS per stream over each. Medians of RUNS (3) runs of STREAMS (10,000).
# Everything listens on loopback and is stopped by PID; a certificate is made with openssl.
set -euo pipefail
cd "$(dirname "$0")/../.."
STREAMS=${STREAMS:-10000} PER_CONN=${PER_CONN:-20} RUNS=${RUNS:-3} LIMIT=${LIMIT:-120}
command -v openssl >/dev/null || { echo "needs openssl" >&2; exit 1; }
cargo build -q --release -p hub -p loadtests
OUT=$(mktemp -d /tmp/scenario-h2.XXXX)
. loadtests/scenarios/lib.sh

# A CA and a certificate for 127.0.0.1.
(
    cd "$OUT"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=bench-ca 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=localhost 2>/dev/null
    echo "subjectAltName=IP:127.0.0.1" > ext.cnf
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile ext.cnf 2>/dev/null
)

rss() { awk '/^VmRSS:/{print $2}' "/proc/$1/status"; }

# One run: run <h2|h1>; prints "<KB per stream> <opened> <seconds to open all>".
run_one() {
    local mode=$1 pub adm per hub lg start opened
    pub=127.0.0.1:$(free_port) adm=127.0.0.1:$(free_port)
    per=$([ "$mode" = h2 ] && echo "$PER_CONN" || echo 0)
    HUB_BIND=$pub HUB_ADMIN_BIND=$adm HUB_LOG=warn HUB_MAX_CONNECTIONS=$((STREAMS + 1000)) \
        HUB_TLS_CERT=$OUT/server.pem HUB_TLS_KEY=$OUT/server.key \
        target/release/hub > "$OUT/hub-$mode.out" 2> "$OUT/hub-$mode.err" &
    hub=$!; PIDS+=("$hub")
    wait_for 200 curl -sf "http://$adm/readyz"
    local idle; idle=$(rss "$hub")
    rm -f "$OUT/ready"
    start=$(date +%s.%N)
    target/release/loadgen tls-hold --target "$pub" --ca "$OUT/ca.pem" --path "/v1/sse?channel=public:idle" \
        --streams "$STREAMS" --per-connection "$per" --duration "$LIMIT" --ready-file "$OUT/ready" \
        > "$OUT/lg-$mode.out" 2> "$OUT/lg-$mode.err" &
    lg=$!; PIDS+=("$lg")
    wait_for $((LIMIT * 20)) test -s "$OUT/ready"
    local took; took=$(python3 -c "import time; print(round(time.time() - $start, 2))")
    opened=$(cut -d' ' -f1 "$OUT/ready")
    # Every opened stream registered at the hub (bounded wait), then the RSS.
    wait_for 200 sh -c "curl -sf http://$adm/metrics | grep -q '^hub_connections{transport=\"sse\"} $opened\$'"
    local full; full=$(rss "$hub")
    kill -TERM "$lg" "$hub"; wait "$lg" 2>/dev/null || true; wait "$hub" 2>/dev/null || true
    python3 -c "print(round(($full - $idle) / max(1, $opened), 2), $opened, $took)"
}

declare -a H2 H1
for r in $(seq "$RUNS"); do
    echo "run $r/$RUNS" >&2
    H2+=("$(run_one h2)")
    H1+=("$(run_one h1)")
done
python3 - "$STREAMS" "$PER_CONN" "${H2[@]}" -- "${H1[@]}" <<'PY'
import statistics, sys
streams, per = sys.argv[1], sys.argv[2]
rest = sys.argv[3:]
cut = rest.index("--")
h2 = [list(map(float, r.split())) for r in rest[:cut]]
h1 = [list(map(float, r.split())) for r in rest[cut + 1:]]
med = lambda rows, i: statistics.median(r[i] for r in rows)
print(f"{streams} idle SSE streams over HTTPS; HTTP/2 with {per} streams per connection; medians of {len(h2)} runs")
print(f"{'':34}{'HTTP/2':>10}{'HTTP/1.1':>10}{'h2/h1':>8}")
for name, i in [("hub RSS per stream (KB)", 0), ("streams opened", 1), ("open all (s)", 2)]:
    a, b = med(h2, i), med(h1, i)
    print(f"{name:34}{a:>10}{b:>10}{(a / b if b else 0):>8.2f}")
print("runs (KB per stream): h2", [r[0] for r in h2], "h1", [r[0] for r in h1])
PY

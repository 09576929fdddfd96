"""Medians of each server's reports and the hub/Nchan ratio: table.py <dir> <runs> "<peers>" <title>."""
import glob
import json
import re
import statistics
import sys

out, runs, peers, title = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4]


def load(name):
    return [json.load(open(f"{out}/{name}-{r}.json")) for r in range(1, runs + 1)]


def rss_end(r):
    return r["server_after"]["rss_kb"] / 1024 if r.get("server_after") else None


rows = [
    ("streams opened", lambda r: r["opened"]),
    ("connect all (s)", lambda r: r["connect_secs"]),
    ("server RSS per idle stream (KB)", lambda r: r["server_rss_kb_per_stream"]),
    ("delivered / expected (%)", lambda r: 100.0 * r["deliveries"] / max(1, r["expected_deliveries"])),
    ("missed (gaps)", lambda r: r["gaps"]),
    ("duplicates", lambda r: r["duplicates"]),
    ("streams ended by the server", lambda r: r["holds"]["streams_ended"]),
    ("streams resumed after a drop", lambda r: r["reconnects"]),
    ("streams still down at the end", lambda r: r["still_down"]),
    ("first drop to last resume (s)", lambda r: r["resume_secs"]),
    ("per-stream drop to resume p50 (s)", lambda r: r["resume"]["p50_ms"] / 1000 if r["reconnects"] else None),
    ("per-stream drop to resume max (s)", lambda r: r["resume"]["max_ms"] / 1000 if r["reconnects"] else None),
    ("failed reconnect attempts", lambda r: r["reconnect_retries"]),
    ("deliveries per second", lambda r: r["deliveries_per_sec"]),
    ("bytes on the wire per delivery", lambda r: r.get("wire_bytes_per_delivery")),
    ("deliveries per client read", lambda r: r.get("deliveries_per_read")),
    ("latency p50 (ms)", lambda r: r["latency"]["p50_ms"]),
    ("latency p99 (ms)", lambda r: r["latency"]["p99_ms"]),
    ("latency max (ms)", lambda r: r["latency"]["max_ms"]),
    ("hub-side publish-to-write p50 (ms, <=)", lambda r: r["hub_side"].get(0.5)),
    ("hub-side publish-to-write p99 (ms, <=)", lambda r: r["hub_side"].get(0.99)),
    ("publish answer p50 (ms)", lambda r: r["publish"]["rtt_p50_us"] / 1000 if r.get("publish", {}).get("rtt_p50_us") else None),
    ("publish answer p99 (ms)", lambda r: r["publish"]["rtt_p99_us"] / 1000 if r.get("publish", {}).get("rtt_p99_us") else None),
    ("server CPU-s per million deliveries", lambda r: r["server_cpu_secs_per_million_deliveries"]),
    ("server RSS at the end (MB)", rss_end),
    ("server RSS idle, before any stream (MB)", lambda r: r["server_idle"]["rss_kb"] / 1024 if r.get("server_idle") else None),
    ("RSS 1 s after every stream closed (MB)", lambda r: r.get("rss_after_kb", {}).get("1", 0) / 1024 or None),
    ("RSS 10 s after (MB)", lambda r: r.get("rss_after_kb", {}).get("10", 0) / 1024 or None),
    ("RSS 30 s after (MB)", lambda r: r.get("rss_after_kb", {}).get("30", 0) / 1024 or None),
    ("RSS 60 s after (MB)", lambda r: r.get("rss_after_kb", {}).get("60", 0) / 1024 or None),
    ("churn: streams closed and reopened", lambda r: r.get("churn_cycles") or None),
    ("refused attempts (any reason)", lambda r: r.get("refused")),
    ("sleepers: RSS while they lag (MB)", lambda r: r["server_lagging"]["rss_kb"] / 1024 if r.get("server_lagging") else None),
    ("sleepers: RSS per lagging stream (KB)", lambda r: r.get("server_rss_kb_per_lagging_stream")),
    ("returners: catch-up p50 (s)", lambda r: r["catchup"]["p50_ms"] / 1000 if r.get("catchup", {}).get("max_ms") else None),
    ("returners: catch-up max (s)", lambda r: r["catchup"]["max_ms"] / 1000 if r.get("catchup", {}).get("max_ms") else None),
    ("throughput: sustained msgs/s (100% delivered)", lambda r: r.get("sustained_rate")),
    ("hub: history reads", lambda r: r["hub_metrics"].get("hub_history_reads_total")),
    ("hub: history replayed", lambda r: r["hub_metrics"].get("hub_history_replayed_total")),
    ("hub: lagged (ephemeral lost)", lambda r: r["hub_metrics"].get('hub_messages_dropped_total{reason="lagged"}')),
]


def hub_side(r, q):
    """Quantile q of the hub's own publish-to-write histogram (all nodes of run r), in ms: the
    upper bound of the bucket it falls in; None for servers without it."""
    counts = {}
    for path in glob.glob(f"{out}/hub-{r}-node*.metrics"):
        for line in open(path):
            m = re.match(r'hub_delivery_latency_seconds_bucket\{le="([^"]+)"\} (\d+)', line)
            if m:
                le = float("inf") if m.group(1) == "+Inf" else float(m.group(1))
                counts[le] = counts.get(le, 0) + int(m.group(2))
    if not counts or max(counts.values()) == 0:
        return None
    total = counts[max(counts)]
    for le in sorted(counts):
        if counts[le] >= q * total:
            return le * 1000
    return None


def hub_metrics(r):
    """Counters of the hub's own /metrics (all nodes of run r, summed)."""
    got = {}
    for path in glob.glob(f"{out}/hub-{r}-node*.metrics"):
        for line in open(path):
            if line.startswith("#") or " " not in line:
                continue
            name, value = line.rsplit(" ", 1)
            if name in ("hub_history_reads_total", "hub_history_replayed_total", 'hub_messages_dropped_total{reason="lagged"}'):
                got[name] = got.get(name, 0) + float(value)
    return got


reports = {p: load(p) for p in peers}
for p in peers:
    for i, r in enumerate(reports[p], start=1):
        r["hub_side"] = {q: hub_side(i, q) for q in (0.5, 0.99)} if p == "hub" else {}
        r["hub_metrics"] = hub_metrics(i) if p == "hub" else {}
print(f"{title}; medians of {runs} runs")
print(f"{'':38}" + "".join(f"{p:>10}" for p in peers) + (f"   {peers[0]}/{peers[1]}" if len(peers) == 2 else ""))
for name, f in rows:
    meds = []
    for p in peers:
        vals = [v for v in (f(r) for r in reports[p]) if v is not None]
        meds.append(statistics.median(vals) if vals else None)
    cells = "".join(f"{m:10.2f}" if m is not None else f"{'-':>10}" for m in meds)
    ratio = ""
    if len(meds) == 2 and meds[0] is not None and meds[1]:
        ratio = f"{meds[0] / meds[1]:13.2f}"
    print(f"{name:38}{cells}{ratio}")
print(f"reports: {out}")

#!/usr/bin/env python3
"""Prints the soak's figures (markdown) from OUT: samples.jsonl, events.log, readers.json and
churners.json. Exits 1 when a message was lost or duplicated, or when a node did not come back
to zero streams with its counts agreeing."""
import json, statistics, sys

out = sys.argv[1]
samples = [json.loads(l) for l in open(f"{out}/samples.jsonl")]
events = [l.rstrip("\n") for l in open(f"{out}/events.log")]
readers = json.load(open(f"{out}/readers.json"))
churners = json.load(open(f"{out}/churners.json"))
load = [s for s in samples if s["phase"] == "load"]
idle = next(s for s in samples if s["phase"] == "idle")
quiet = [s for s in samples if s["phase"] == "quiet"]
start = load[0]["t"] if load else 0
failed = []


def node(s, i):
    return next((n for n in s["nodes"] if n["i"] == i), {})


def mb(kb):
    return f"{kb / 1024:.1f} MB" if kb is not None else "-"


print(f"## Soak ({out})\n")
pub = readers["publish"]
print("| | |\n|---|---|")
print(f"| load | {(load[-1]['t'] - start) / 60:.1f} min sampled every 10 s; events: "
      + "; ".join(e for e in events) + " |")
print(f"| published | {pub['sent']} durable messages ({pub['errors']} given up, "
      f"{pub['retries']} retried attempts during Redis restarts) |")
print(f"| readers | {readers['opened']} streams; {readers['deliveries']} of "
      f"{readers['expected_deliveries']} deliveries; gaps {readers['gaps']}, duplicates "
      f"{readers['duplicates']}; {readers['reconnects']} reconnects (resume p50 "
      f"{readers['resume']['p50_ms']} ms, p99 {readers['resume']['p99_ms']} ms) |")
ch = churners["holds"]
print(f"| churners | {churners['opened']} streams, {churners['churn_cycles']} close-and-reopen "
      f"cycles; refused {churners['refused']} {json.dumps(ch.get('failures', {}))} |")
if readers["missing"] != 0 or readers["gaps"] or readers["duplicates"] or pub["errors"]:
    failed.append("readers lost or duplicated messages")

# Memory: node 0 runs the whole soak; medians of each 5-minute window of load.
print("\n| minutes | " + " | ".join(f"node{i} RSS" for i in (0, 1)) + " | node0 fds | node1 fds | streams (both) | Redis RSS |")
print("|---|---|---|---|---|---|---|")
print(f"| idle | {mb(node(idle, 0).get('rss_kb'))} | {mb(node(idle, 1).get('rss_kb'))} | "
      f"{node(idle, 0).get('fds')} | {node(idle, 1).get('fds')} | 0 | {mb(idle.get('redis_rss_kb'))} |")
windows = {}
for s in load:
    windows.setdefault(int((s["t"] - start) // 300), []).append(s)


def med(rows, f):
    v = [f(r) for r in rows if f(r) is not None]
    return statistics.median(v) if v else None


for w, rows in sorted(windows.items()):
    streams = med(rows, lambda r: sum((n.get("streams") or 0) for n in r["nodes"]))
    print(f"| {w * 5}-{w * 5 + 5} | {mb(med(rows, lambda r: node(r, 0).get('rss_kb')))} | "
          f"{mb(med(rows, lambda r: node(r, 1).get('rss_kb')))} | "
          f"{med(rows, lambda r: node(r, 0).get('fds'))} | {med(rows, lambda r: node(r, 1).get('fds'))} | "
          f"{streams:.0f} | {mb(med(rows, lambda r: r.get('redis_rss_kb')))} |")
q = quiet[-1]
print(f"| after (clients gone) | {mb(node(q, 0).get('rss_kb'))} | {mb(node(q, 1).get('rss_kb'))} | "
      f"{node(q, 0).get('fds')} | {node(q, 1).get('fds')} | "
      f"{sum((n.get('streams') or 0) for n in q['nodes']):.0f} | {mb(q.get('redis_rss_kb'))} |")

# Memory flat after warm-up: node 0's median RSS in the second window against the last full one.
full = [w for w, rows in windows.items() if len(rows) >= 20]
if len(full) >= 3:
    a = med(windows[full[1]], lambda r: node(r, 0).get("rss_kb"))
    b = med(windows[full[-1]], lambda r: node(r, 0).get("rss_kb"))
    print(f"\nnode0 RSS, minutes {full[1] * 5}-{full[1] * 5 + 5} -> {full[-1] * 5}-{full[-1] * 5 + 5}: "
          f"{mb(a)} -> {mb(b)} ({(b - a) / a * 100:+.1f}%)")

# Counts: in every sample, each node's gauge is its opened minus closed (a scrape is not one
# instant, so a few streams may open between two lines during load); exact once quiet.
worst = max((abs((n.get("opened") or 0) - (n.get("closed") or 0) - (n.get("streams") or 0))
             for s in load for n in s["nodes"]), default=0)
print(f"\nlargest |opened - closed - gauge| in a sample under load: {worst:.0f}")
for n in q["nodes"]:
    exact = n.get("streams") == 0 and n.get("opened") == n.get("closed")
    print(f"node{n['i']} after: streams {n.get('streams')}, opened {n.get('opened'):.0f} = closed "
          f"{n.get('closed'):.0f}: {'exact' if exact else 'NOT EXACT'}; fds {n.get('fds')} "
          f"(idle {node(idle, n['i']).get('fds')}); closed by reason {json.dumps(n.get('closed_by'))}; "
          f"refused {json.dumps(n.get('rejected_by'))}; dropped {json.dumps(n.get('dropped_by'))}; "
          f"Redis reconnects {n.get('reconnects')}, history reads {n.get('history_reads')}")
    if not exact:
        failed.append(f"node{n['i']} counts")
if failed:
    print("\nFAILED: " + ", ".join(failed))
    sys.exit(1)

#!/usr/bin/env python3
"""One soak sample: per node (files OUT/node<i>: "<pid> <admin url>") its RSS and open file
descriptors from /proc, and its stream gauge and counters from /metrics; Redis's RSS. Appends
one JSON line to OUT/samples.jsonl.

    soak_sample.py OUT T0 PHASE     one sample (T0: the soak's start, unix seconds)
    soak_sample.py OUT T0 zero      waits (60 s at most) until every node holds no stream
"""
import json, os, re, sys, time, urllib.request

out, t0, phase = sys.argv[1], float(sys.argv[2]), sys.argv[3]
SAMPLE = re.compile(r'^([a-z_]+)(?:\{([^}]*)\})? ([0-9.eE+-]+|NaN)$')


def proc(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
        return rss, len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration):
        return None, None


def metrics(url):
    try:
        text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    except OSError:
        return None
    m = {}
    for line in text.splitlines():
        s = SAMPLE.match(line)
        if not s or s.group(1).endswith(("_bucket", "_sum", "_count")):
            continue
        name, labels, value = s.group(1), s.group(2) or "", float(s.group(3))
        m[name] = m.get(name, 0) + value
        r = re.search(r'reason="([a-z_]+)"', labels)
        if r:
            d = m.setdefault(name + ":by_reason", {})
            d[r.group(1)] = d.get(r.group(1), 0) + value
    return m


def nodes():
    i = 0
    while os.path.exists(f"{out}/node{i}"):
        pid, url = open(f"{out}/node{i}").read().split()
        yield i, int(pid), url
        i += 1


def sample():
    row = {"t": round(time.time() - t0, 1), "phase": phase, "nodes": []}
    for i, pid, url in nodes():
        rss, fds = proc(pid)
        m = metrics(url) or {}
        row["nodes"].append({
            "i": i, "pid": pid, "rss_kb": rss, "fds": fds,
            "streams": m.get("hub_connections"),
            "opened": m.get("hub_connections_opened_total"),
            "closed": m.get("hub_connections_closed_total"),
            "closed_by": m.get("hub_connections_closed_total:by_reason", {}),
            "rejected_by": m.get("hub_connections_rejected_total:by_reason", {}),
            "dropped_by": m.get("hub_messages_dropped_total:by_reason", {}),
            "received": m.get("hub_messages_received_total"),
            "delivered": m.get("hub_messages_delivered_total"),
            "redis_up": m.get("hub_redis_up"),
            "reconnects": m.get("hub_redis_reconnects_total"),
            "history_reads": m.get("hub_history_reads_total"),
        })
    try:
        rpid = int(open(f"{out}/redis.pid").read())
        row["redis_rss_kb"] = proc(rpid)[0]
    except (OSError, ValueError):
        pass
    return row


if phase == "zero":
    deadline = time.time() + 60
    while time.time() < deadline:
        if all((metrics(url) or {}).get("hub_connections", 1) == 0 for _, _, url in nodes()):
            sys.exit(0)
        time.sleep(0.5)
    sys.exit(1)
with open(f"{out}/samples.jsonl", "a") as f:
    f.write(json.dumps(sample()) + "\n")

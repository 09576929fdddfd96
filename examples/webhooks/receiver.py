"""Starts an upstream feed when a channel gets its first reader, stops it when the last leaves.

The hub POSTs webhook batches here (HUB_WEBHOOK_URL=http://127.0.0.1:4000/hub-events); each is
checked against X-Hub-Signature (HMAC-SHA256 of the raw body with HUB_WEBHOOK_SECRET) before it
is read, and events are deduplicated by id (delivery is at least once). The "feed" publishes a
tick every half second to the channel through the hub's POST /v1/publish. Standard library only:
    HUB_WEBHOOK_SECRET=... HUB_ADMIN_URL=http://127.0.0.1:9090 PORT=4000 python3 receiver.py
"""

import collections
import hashlib
import hmac
import json
import os
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SECRET = os.environ["HUB_WEBHOOK_SECRET"].encode()
HUB = os.environ.get("HUB_ADMIN_URL", "http://127.0.0.1:9090")
PORT = int(os.environ.get("PORT", "4000"))

seen = collections.OrderedDict()  # the last 100,000 event ids (a redelivery repeats an id)
feeds = {}  # channel -> threading.Event that stops its feed
lock = threading.Lock()


def publish(channel, data):
    body = json.dumps({"channel": channel, "data": data}).encode()
    req = urllib.request.Request(f"{HUB}/v1/publish", body, {"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=5).close()


def feed(channel, stop):
    n = 0
    while not stop.wait(0.5):
        n += 1
        publish(channel, {"tick": n})


def on_event(e):
    if e["type"] == "channel_occupied" and e["channel"] not in feeds:
        feeds[e["channel"]] = stop = threading.Event()
        threading.Thread(target=feed, args=(e["channel"], stop), daemon=True).start()
        print("started feed", e["channel"], flush=True)
    elif e["type"] == "channel_vacated" and e["channel"] in feeds:
        feeds.pop(e["channel"]).set()
        print("stopped feed", e["channel"], flush=True)


class Hook(BaseHTTPRequestHandler):
    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        if length > 1_000_000:
            self.send_response(413)
            self.end_headers()
            return
        body = self.rfile.read(length)
        want = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(want, self.headers.get("X-Hub-Signature", "")):
            self.send_response(401)
            self.end_headers()
            return
        with lock:
            for e in json.loads(body)["events"]:
                if e["id"] in seen:
                    continue
                seen[e["id"]] = True
                if len(seen) > 100_000:
                    seen.popitem(last=False)
                on_event(e)
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


print("listening", PORT, flush=True)
ThreadingHTTPServer(("127.0.0.1", PORT), Hook).serve_forever()

// Starts an upstream feed when a channel gets its first reader, stops it when the last leaves.
//
// The hub POSTs webhook batches here (HUB_WEBHOOK_URL=http://127.0.0.1:4000/hub-events); each is
// checked against X-Hub-Signature (HMAC-SHA256 of the raw body with HUB_WEBHOOK_SECRET) before it
// is parsed, and events are deduplicated by id (delivery is at least once). The "feed" publishes
// a tick every half second to the channel through the hub's POST /v1/publish. Node 18+, no
// packages:
//   HUB_WEBHOOK_SECRET=... HUB_ADMIN_URL=http://127.0.0.1:9090 PORT=4000 node receiver.js
const http = require('node:http');
const crypto = require('node:crypto');

const SECRET = process.env.HUB_WEBHOOK_SECRET;
const HUB = process.env.HUB_ADMIN_URL || 'http://127.0.0.1:9090';
const PORT = Number(process.env.PORT || 4000);

const seen = new Set(); // event ids already handled (trimmed to the last 100,000)
const feeds = new Map(); // channel -> interval of its feed

function onEvent(e) {
  if (e.type === 'channel_occupied' && !feeds.has(e.channel)) {
    let n = 0;
    feeds.set(e.channel, setInterval(() => {
      n += 1;
      fetch(`${HUB}/v1/publish`, {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ channel: e.channel, data: { tick: n } }),
      }).catch((err) => console.error('publish failed', err.message));
    }, 500));
    console.log('started feed', e.channel);
  } else if (e.type === 'channel_vacated' && feeds.has(e.channel)) {
    clearInterval(feeds.get(e.channel));
    feeds.delete(e.channel);
    console.log('stopped feed', e.channel);
  }
}

http.createServer((req, res) => {
  const chunks = [];
  let size = 0;
  req.on('data', (c) => {
    size += c.length;
    if (size > 1_000_000) req.destroy();
    else chunks.push(c);
  });
  req.on('end', () => {
    const body = Buffer.concat(chunks);
    const want = Buffer.from('sha256=' + crypto.createHmac('sha256', SECRET).update(body).digest('hex'));
    const got = Buffer.from(String(req.headers['x-hub-signature'] || ''));
    if (got.length !== want.length || !crypto.timingSafeEqual(got, want)) {
      res.writeHead(401).end();
      return;
    }
    for (const e of JSON.parse(body).events) {
      if (seen.has(e.id)) continue;
      seen.add(e.id);
      if (seen.size > 100_000) seen.delete(seen.values().next().value);
      onEvent(e);
    }
    res.writeHead(204).end();
  });
}).listen(PORT, '127.0.0.1', () => console.log('listening', PORT));

//! Compression (issue 24): WebSocket `permessage-deflate` (a raw handshake checking the answer
//! and RSV1 both ways, and Python's `websockets` with compression) and gzip SSE (a raw reader
//! inflating each event as it arrives and checking the whole member's CRC at a clean end, and
//! Chromium's EventSource through a relay that sees the encoding).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use hub_tests::gzip::{read_head, read_until, GzReader};
use hub_tests::{prefix, Hub, WAIT};
use serde_json::{json, Value};
use std::io::Read;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A masked client frame (zero key: the payload is sent as it is), RSV1 set if `compressed`.
fn client_frame(payload: &[u8], compressed: bool) -> Vec<u8> {
    let mut f = vec![if compressed { 0xC1 } else { 0x81 }];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    f.extend_from_slice(&[0, 0, 0, 0]);
    f.extend_from_slice(payload);
    f
}

/// The next server frame: (first byte, payload).
async fn server_frame(io: &mut TcpStream, buf: &mut Vec<u8>) -> (u8, Vec<u8>) {
    let deadline = Instant::now() + WAIT;
    loop {
        if buf.len() >= 2 {
            let (len, at) = match buf[1] & 0x7F {
                126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
                127 if buf.len() >= 10 => (
                    u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                126 | 127 => (usize::MAX, 0),
                n => (n as usize, 2),
            };
            if len != usize::MAX && buf.len() >= at + len {
                let first = buf[0];
                let payload = buf[at..at + len].to_vec();
                buf.drain(..at + len);
                return (first, payload);
            }
        }
        buf.extend(hub_tests::gzip::next_bytes(io, deadline, || "a frame".into()).await);
    }
}

/// Raw deflate of one message without the sync tail, as a client compresses it.
fn deflate_ws(data: &[u8]) -> Vec<u8> {
    let mut c = flate2::Compress::new(flate2::Compression::default(), false);
    let mut out = Vec::with_capacity(data.len() + 64);
    c.compress_vec(data, &mut out, flate2::FlushCompress::Sync)
        .unwrap();
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

fn inflate_ws(payload: &[u8]) -> Vec<u8> {
    let mut data = payload.to_vec();
    data.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::new();
    let _ = flate2::read::DeflateDecoder::new(&data[..]).read_to_end(&mut out);
    out
}

#[tokio::test]
async fn a_websocket_that_offers_deflate_gets_large_messages_compressed_once() {
    let hub = Hub::start(&[]).await;
    let ch = prefix("wsz");
    let mut io = TcpStream::connect(hub.public).await.unwrap();
    io.write_all(
        b"GET /v1/ws HTTP/1.1\r\nHost: hub\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
          Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n",
    )
    .await
    .unwrap();
    let (head, mut buf) = read_head(&mut io).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains(
            "sec-websocket-extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        ),
        "{head}"
    );
    // A compressed subscribe (RSV1) is read.
    let sub = json!({"op": "subscribe", "channel": ch}).to_string();
    io.write_all(&client_frame(&deflate_ws(sub.as_bytes()), true))
        .await
        .unwrap();
    let (first, payload) = server_frame(&mut io, &mut buf).await;
    assert_eq!(first, 0x81, "a small reply goes uncompressed");
    let v: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(v["type"], "subscribed", "{v}");
    // Small: plain; large (2 KB of JSON): RSV1, and it inflates to the message.
    hub.publish(&ch, None, json!({"n": 1}), true).await;
    let big = json!({"rows": (0..60).map(|i| json!({"id": i, "name": "widget", "price": 10.5})).collect::<Vec<_>>()});
    hub.publish(&ch, None, big.clone(), true).await;
    let (first, payload) = server_frame(&mut io, &mut buf).await;
    assert_eq!(first, 0x81);
    assert_eq!(
        serde_json::from_slice::<Value>(&payload).unwrap()["data"],
        json!({"n": 1})
    );
    let (first, payload) = server_frame(&mut io, &mut buf).await;
    assert_eq!(first, 0xC1, "RSV1 on the large message");
    let plain = inflate_ws(&payload);
    assert!(
        payload.len() * 2 < plain.len(),
        "{} -> {}",
        payload.len(),
        plain.len()
    );
    let m: Value = serde_json::from_slice(&plain).unwrap();
    assert_eq!(
        (m["type"].clone(), m["data"].clone()),
        (json!("message"), big)
    );
    // A socket that offered nothing gets the same message uncompressed.
    let mut plain_ws = hub_tests::client::try_ws(hub.public, "", &[])
        .await
        .unwrap();
    hub_tests::client::subscribe(&mut plain_ws, &ch).await;
}

#[tokio::test]
async fn pythons_websockets_with_compression_reads_and_writes() {
    let hub = Hub::start(&[]).await;
    let ch = prefix("pyz");
    let script = r#"
import asyncio, json, sys
from websockets.asyncio.client import connect

async def main(url, ch):
    async with connect(url, compression="deflate") as ws:
        print(json.dumps({"extensions": ws.response.headers.get("Sec-WebSocket-Extensions")}), flush=True)
        await ws.send(json.dumps({"op": "subscribe", "channel": ch}))
        while True:
            m = json.loads(await ws.recv())
            if m["type"] == "subscribed":
                print(json.dumps({"ready": True}), flush=True)
            if m["type"] == "message":
                print(json.dumps({"got": m["data"]}), flush=True)
                return

asyncio.run(main(sys.argv[1], sys.argv[2]))
"#;
    let mut child = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(format!("ws://{}/v1/ws", hub.public))
        .arg(&ch)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let mut lines = tokio::io::BufReader::new(out);
    let mut line = String::new();
    use tokio::io::AsyncBufReadExt;
    let mut next = async || -> Value {
        line.clear();
        tokio::time::timeout(WAIT, lines.read_line(&mut line))
            .await
            .expect("a line from python")
            .unwrap();
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("python said {line:?}"))
    };
    let ext = next().await;
    assert!(
        ext["extensions"]
            .as_str()
            .is_some_and(|e| e.contains("permessage-deflate")),
        "{ext}"
    );
    assert_eq!(next().await, json!({"ready": true}));
    let big = json!({"text": "compressible ".repeat(200)});
    hub.publish(&ch, None, big.clone(), true).await;
    assert_eq!(next().await, json!({"got": big}));
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn a_gzip_sse_stream_delivers_each_event_when_sent_and_ends_as_a_whole_member() {
    let hub = Hub::start(&[]).await;
    let ch = prefix("gz");
    let mut io = TcpStream::connect(hub.public).await.unwrap();
    io.write_all(
        format!("GET /v1/sse?channel={ch} HTTP/1.1\r\nHost: hub\r\nAccept-Encoding: gzip, deflate\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let (head, rest) = read_head(&mut io).await;
    assert!(head.contains("content-encoding: gzip"), "{head}");
    let mut gz = GzReader::new();
    gz.feed(&rest);
    read_until(&mut io, &mut gz, "event: hub.connected").await;
    // Each event is readable as soon as it is sent (nothing waits for more data).
    for i in 0..5 {
        let data = json!({"i": i, "pad": "abcdefgh".repeat(40)});
        hub.publish(&ch, None, data.clone(), true).await;
        read_until(&mut io, &mut gz, &format!("data: {data}")).await;
    }
    // A clean end (disconnected by the backend) ends the member: the CRC checks out.
    let res = hub
        .http
        .post(hub.admin_url("/v1/disconnect"))
        .json(&json!({"channel": ch}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 202);
    let mut all = gz.raw.clone();
    tokio::time::timeout(WAIT, io.read_to_end(&mut all))
        .await
        .unwrap()
        .unwrap();
    let mut whole = String::new();
    flate2::read::GzDecoder::new(&all[..])
        .read_to_string(&mut whole)
        .expect("a whole gzip member with its CRC and length");
    assert!(whole.contains("event: hub.disconnect"), "{whole}");
    assert_eq!(whole.matches("\"pad\"").count(), 5);
    // Compressed: the five 350-byte events took far less on the wire.
    assert!(
        all.len() * 2 < whole.len(),
        "{} vs {}",
        all.len(),
        whole.len()
    );
    // Off: the same request gets plain text.
    let off = Hub::start(&[("HUB_SSE_GZIP", "false")]).await;
    let mut io = TcpStream::connect(off.public).await.unwrap();
    io.write_all(
        b"GET /v1/sse?channel=public:x HTTP/1.1\r\nHost: hub\r\nAccept-Encoding: gzip\r\n\r\n",
    )
    .await
    .unwrap();
    let (head, _) = read_head(&mut io).await;
    assert!(!head.contains("content-encoding"), "{head}");
}

/// A relay in front of the hub that keeps the first bytes of every response it passes (to see
/// what encoding the browser was sent).
async fn relay(
    hub: std::net::SocketAddr,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let h = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let h = h.clone();
            tokio::spawn(async move {
                let Ok(mut server) = TcpStream::connect(hub).await else {
                    return;
                };
                let (mut cr, mut cw) = client.split();
                let (mut sr, mut sw) = server.split();
                let up = tokio::io::copy(&mut cr, &mut sw);
                let down = async {
                    let mut first = Vec::new();
                    let mut captured = false;
                    let mut chunk = [0u8; 8192];
                    loop {
                        let n = match sr.read(&mut chunk).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if !captured {
                            first.extend_from_slice(&chunk[..n]);
                            if let Some(i) = first.windows(4).position(|w| w == b"\r\n\r\n") {
                                h.lock()
                                    .unwrap()
                                    .push(String::from_utf8_lossy(&first[..i]).to_lowercase());
                                captured = true;
                            }
                        }
                        if cw.write_all(&chunk[..n]).await.is_err() {
                            break;
                        }
                    }
                };
                tokio::select! { _ = up => {}, _ = down => {} }
            });
        }
    });
    (addr, heads)
}

/// Chromium's EventSource reads a gzip stream: every message, in order, each as it is sent.
#[tokio::test]
async fn chromiums_eventsource_reads_a_gzip_stream() {
    use hub_tests::browser::{page_server, Chromium, Reports};
    let hub = Hub::start(&[]).await;
    let (via, heads) = relay(hub.public).await;
    let ch = prefix("gzb");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", listener.local_addr().unwrap());
    let page = format!(
        r#"<!doctype html><meta charset="utf-8"><script>
const es = new EventSource("http://{via}/v1/sse?channel={ch}");
es.addEventListener("hub.connected", () => fetch("/report", {{method: "POST", body: JSON.stringify({{kind: "connected"}})}}));
es.onmessage = e => fetch("/report", {{method: "POST", body: JSON.stringify({{kind: "message", data: JSON.parse(e.data)}})}});
</script>"#
    );
    let reports: Reports = Default::default();
    tokio::spawn(page_server(listener, page, reports.clone()));
    let _browser = Chromium::open(&origin, &[]);
    let of = |kind: &str| -> Vec<Value> {
        reports
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r["kind"] == kind)
            .cloned()
            .collect()
    };
    hub_tests::wait_until("the page's stream opened", Duration::from_secs(30), || {
        let n = of("connected").len();
        async move { n >= 1 }
    })
    .await;
    // One at a time: each must reach the page before the next is sent (nothing is held back
    // waiting for more bytes to compress).
    for i in 0..5 {
        hub.publish(&ch, None, json!({"i": i, "pad": "xyz".repeat(200)}), true)
            .await;
        hub_tests::wait_until("the message reached the page", WAIT, || {
            let n = of("message").len();
            async move { n > i }
        })
        .await;
    }
    let got: Vec<i64> = of("message")
        .iter()
        .map(|m| m["data"]["i"].as_i64().unwrap())
        .collect();
    assert_eq!(got, [0, 1, 2, 3, 4]);
    let heads = heads.lock().unwrap().clone();
    assert!(
        heads
            .iter()
            .any(|h| h.contains("content-type: text/event-stream")
                && h.contains("content-encoding: gzip")),
        "{heads:?}"
    );
}

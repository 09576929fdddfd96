//! Random input at running hubs: a few hundred HTTP requests (well-formed, odd and plain junk
//! bytes), publish bodies, WebSocket frames and, in Redis mode, junk on the hub's pub/sub
//! channels and function calls. Every answer is a 4xx or a valid stream (never a 5xx, never
//! silence), the node keeps serving a normal stream, and every stream it opened is released.
//!
//! The generator is a seeded xorshift: a failure prints its seed, and `FUZZ_SEED=<n>` replays it.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use futures_util::{SinkExt, StreamExt};
use hub_tests::client::{self, token, SECRET};
use hub_tests::{prefix, wait_until, Hub, Redis, WAIT};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

/// Longest a well-formed request may take to be answered (its head).
const ANSWER: Duration = Duration::from_secs(5);

struct Rng(u64);

impl Rng {
    fn seeded() -> Rng {
        let seed = std::env::var("FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("FUZZ_SEED={seed}");
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn pick<T: Clone>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())].clone()
    }

    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max + 1);
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// Printable ASCII and a few awkward characters, as text.
    fn text(&mut self, max: usize) -> String {
        const ODD: [char; 10] = ['é', '💥', '\u{0}', '\n', '\r', '"', '\\', '%', '&', '='];
        let n = self.below(max + 1);
        (0..n)
            .map(|_| {
                if self.chance(10) {
                    self.pick(&ODD)
                } else {
                    (b' ' + self.below(95) as u8) as char
                }
            })
            .collect()
    }

    fn percent_encoded(&mut self, max: usize) -> String {
        let raw = if self.chance(30) {
            self.bytes(max)
        } else {
            self.text(max).into_bytes()
        };
        raw.iter().map(|b| format!("%{b:02X}")).collect()
    }
}

/// Channel names, valid or not, public or protected.
fn channel(rng: &mut Rng, public: &str) -> String {
    match rng.below(12) {
        0..=4 => format!("{public}{}", rng.below(4)),
        5 => "room:1".into(),
        6 => "user:u1".into(),
        7 => "x".repeat(120 + rng.below(20)),
        8 => rng
            .pick(&["", "a b", "_x", "x*", "public:", "public:a/b", ".", "a..b"])
            .into(),
        _ => rng.percent_encoded(20),
    }
}

/// `Last-Event-ID` in its forms: positions, far ones, cursors, junk.
fn last_event_id(rng: &mut Rng) -> String {
    match rng.below(8) {
        0 => "0-0".into(),
        1 => format!("{}-{}", rng.next() % 2_000_000_000_000, rng.below(5)),
        2 => "18446744073709551615-18446744073709551615".into(),
        3 => "99999999999999-0".into(),
        4 => format!("{:x}.{:x}", rng.next(), rng.next()),
        5 => "-".into(),
        6 => "9".repeat(rng.below(300)),
        _ => rng.text(40).replace(['\r', '\n', '\u{0}'], ""),
    }
}

fn a_token(rng: &mut Rng) -> String {
    match rng.below(5) {
        0 => token("u1", &["room:*"], 600),
        1 => token("u1", &["room:*"], -10),
        2 => client::hs256(
            json!({"sub": "u1", "exp": client::now() + 600, "nbf": client::now() + 600}),
        ),
        3 => format!("{:x}.{:x}.{:x}", rng.next(), rng.next(), rng.next()),
        _ => rng.text(50).replace(['\r', '\n', '\u{0}'], ""),
    }
}

fn sse_query(rng: &mut Rng, public: &str) -> String {
    let mut q = Vec::new();
    for _ in 0..rng.below(6) {
        q.push(match rng.below(7) {
            0..=2 => format!("channel={}", channel(rng, public)),
            3 => format!(
                "envelope={}",
                rng.pick(&["true", "false", "1", "0", "", "maybe"])
            ),
            4 => format!(
                "{}={}",
                rng.pick(&["lastEventId", "last_event_id"]),
                last_event_id(rng).replace(['&', '#', ' '], "")
            ),
            5 => format!("token={}", a_token(rng).replace(['&', '#', ' '], "")),
            _ => format!("{}={}", rng.percent_encoded(6), rng.percent_encoded(10)),
        });
    }
    q.join("&")
}

/// One HTTP/1.1 request: a method, a target, headers (some odd) and a body that matches its
/// Content-Length. `None`: raw junk bytes instead.
fn request(rng: &mut Rng, public: &str) -> Vec<u8> {
    let method = rng.pick(&[
        "GET", "GET", "GET", "POST", "OPTIONS", "HEAD", "PUT", "DELETE", "BREW",
    ]);
    let path = rng.pick(&[
        "/v1/sse",
        "/v1/sse",
        "/v1/sse",
        "/v1/ws",
        "/v1/publish",
        "/healthz",
        "/readyz",
        "/metrics",
        "/v1/stats",
        "/",
        "/v1/sse/../../etc/passwd",
        "/%FF%00",
    ]);
    let target = match rng.below(4) {
        0 => path.to_string(),
        _ => format!("{path}?{}", sse_query(rng, public)),
    };
    let mut head = format!(
        "{method} {target} {}\r\n",
        rng.pick(&["HTTP/1.1", "HTTP/1.1", "HTTP/1.0"])
    );
    if rng.chance(90) {
        head.push_str("Host: hub\r\n");
    }
    if rng.chance(30) {
        let id = last_event_id(rng);
        head.push_str(&format!("Last-Event-ID: {id}\r\n"));
    }
    if rng.chance(20) {
        head.push_str(&format!("Authorization: Bearer {}\r\n", a_token(rng)));
    }
    if rng.chance(15) {
        let origin = rng.pick(&["https://app.example", "null", "http://evil", ""]);
        head.push_str(&format!("Origin: {origin}\r\n"));
    }
    if rng.chance(15) {
        head.push_str("Connection: Upgrade\r\nUpgrade: websocket\r\n");
        if rng.chance(70) {
            head.push_str("Sec-WebSocket-Version: 13\r\n");
        }
        if rng.chance(70) {
            head.push_str("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n");
        }
    }
    if rng.chance(5) {
        head.push_str(&format!("X-Long: {}\r\n", "a".repeat(rng.below(20_000))));
    }
    if rng.chance(5) {
        for i in 0..rng.below(200) {
            head.push_str(&format!("X-{i}: {i}\r\n"));
        }
    }
    let body = if method == "POST" || rng.chance(10) {
        publish_body(rng, public).into_bytes()
    } else {
        Vec::new()
    };
    if !body.is_empty() {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        if rng.chance(50) {
            head.push_str("Content-Type: application/json\r\n");
        }
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend(body);
    out
}

/// A stream request a client library could send: valid public channels, with resume ids in
/// their forms and odd extras.
fn stream_request(rng: &mut Rng, public: &str) -> Vec<u8> {
    let mut q: Vec<String> = (0..rng.below(3) + 1)
        .map(|_| format!("channel={public}{}", rng.below(4)))
        .collect();
    if rng.chance(40) {
        q.push(format!(
            "lastEventId={}",
            last_event_id(rng).replace(['&', '#', ' '], "")
        ));
    }
    if rng.chance(30) {
        q.push(format!("envelope={}", rng.pick(&["true", "false"])));
    }
    if rng.chance(30) {
        q.push(format!(
            "token={}",
            a_token(rng).replace(['&', '#', ' '], "")
        ));
    }
    let mut head = format!(
        "GET /v1/sse?{} HTTP/1.1\r\nHost: hub\r\nAccept: text/event-stream\r\n",
        q.join("&")
    );
    if rng.chance(40) {
        head.push_str(&format!("Last-Event-ID: {}\r\n", last_event_id(rng)));
    }
    head.push_str("\r\n");
    head.into_bytes()
}

/// A publish body: a JSON object with odd fields, or not JSON at all.
fn publish_body(rng: &mut Rng, public: &str) -> String {
    if rng.chance(15) {
        return rng.text(200);
    }
    let mut o = serde_json::Map::new();
    if rng.chance(90) {
        o.insert("channel".into(), json!(channel(rng, public)));
    }
    if rng.chance(90) {
        let data = match rng.below(6) {
            0 => json!(rng.text(50)),
            1 => json!(rng.next()),
            2 => json!({"nested": [1, 2, {"x": rng.text(10)}]}),
            3 => json!("x".repeat(rng.below(3000))),
            4 => Value::Null,
            _ => json!([rng.text(5), rng.chance(50)]),
        };
        o.insert("data".into(), data);
    }
    if rng.chance(40) {
        let ev = match rng.below(4) {
            0 => json!(rng.text(20)),
            1 => json!("hub.reset"),
            2 => json!("line\nbreak"),
            _ => json!(5),
        };
        o.insert("event".into(), ev);
    }
    if rng.chance(40) {
        o.insert(
            "durable".into(),
            rng.pick(&[json!(true), json!(false), json!("yes")]),
        );
    }
    Value::Object(o).to_string()
}

/// What a connection answered: a status, or nothing before it closed.
#[derive(Debug)]
enum Answer {
    Status(u16, String),
    Closed,
}

/// Sends `bytes` on a new connection and reads the response head (bounded: 64 KB, [`ANSWER`]).
/// With `end`, the write side is shut after sending (junk that may never form a request).
async fn exchange(addr: SocketAddr, bytes: &[u8], end: bool) -> Result<Answer, String> {
    let mut c = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    // The peer may close while we write (junk): that is an answer too.
    if c.write_all(bytes).await.is_err() {
        return Ok(Answer::Closed);
    }
    if end {
        let _ = c.shutdown().await;
    }
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    let read = tokio::time::timeout(ANSWER, async {
        loop {
            match c.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
            if head.windows(4).any(|w| w == b"\r\n\r\n") || head.len() > 65_536 {
                return;
            }
        }
    })
    .await;
    if read.is_err() && head.is_empty() {
        return Err("no answer in time".into());
    }
    if head.is_empty() {
        return Ok(Answer::Closed);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let status = text
        .get(9..12)
        .filter(|_| text.starts_with("HTTP/1."))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {text:?}"))?;
    Ok(Answer::Status(status, text))
}

/// Checks one answer: never a 5xx; a 200 on `/v1/sse` is an event stream, a 101 a WebSocket.
fn check(answer: &Answer, request: &[u8], tally: &mut BTreeMap<String, usize>) {
    let req = String::from_utf8_lossy(&request[..request.len().min(300)]).into_owned();
    match answer {
        Answer::Closed => *tally.entry("closed".into()).or_default() += 1,
        Answer::Status(status, head) => {
            assert!(*status < 500, "{status} for {req:?}:\n{head}");
            let lower = head.to_ascii_lowercase();
            if *status == 200 && req.starts_with("GET /v1/sse") && !req.contains("/..") {
                assert!(
                    lower.contains("content-type: text/event-stream"),
                    "a 200 stream that is not an event stream: {head}"
                );
                *tally.entry("stream".into()).or_default() += 1;
            } else if *status == 101 {
                assert!(lower.contains("upgrade: websocket"), "{head}");
                *tally.entry("websocket".into()).or_default() += 1;
            } else {
                *tally.entry(format!("{}xx", status / 100)).or_default() += 1;
            }
        }
    }
}

async fn http_storm(hub: &Hub, rng: &mut Rng, public: &str, rounds: usize) {
    let mut tally = BTreeMap::new();
    let mut held = Vec::new();
    for i in 0..rounds {
        let addr = if rng.chance(25) {
            hub.admin
        } else {
            hub.public
        };
        let (bytes, end) = match rng.below(10) {
            0 => (rng.bytes(3000), true),
            1 => {
                // A request cut short, or two in one write.
                let mut r = request(rng, public);
                if rng.chance(50) {
                    let cut = rng.below(r.len());
                    r.truncate(cut);
                } else {
                    r.extend(request(rng, public));
                }
                (r, true)
            }
            2..=4 => (stream_request(rng, public), false),
            _ => (request(rng, public), false),
        };
        let answer = exchange(addr, &bytes, end).await.unwrap_or_else(|e| {
            panic!(
                "request {i} ({}): {e}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
            )
        });
        if !end {
            assert!(
                !matches!(answer, Answer::Closed),
                "a whole request got no answer: {:?}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
            );
        }
        check(&answer, &bytes, &mut tally);
        // Keep a few streams open while the storm goes on; the rest close at once.
        if i % 7 == 0 {
            held.push(
                hub_tests::raw_get(
                    hub.public,
                    &format!("/v1/sse?channel={public}{}", i % 4),
                    &[],
                    None,
                )
                .await,
            );
        }
    }
    eprintln!("http: {tally:?}");
    assert!(
        tally.get("stream").copied().unwrap_or(0) >= rounds / 40,
        "too few valid streams to mean anything: {tally:?}"
    );
    assert!(
        tally.get("4xx").copied().unwrap_or(0) >= rounds / 5,
        "too few refusals to mean anything: {tally:?}"
    );
}

async fn publish_storm(hub: &Hub, rng: &mut Rng, public: &str, rounds: usize) {
    let mut tally = BTreeMap::<u16, usize>::new();
    for _ in 0..rounds {
        let body = publish_body(rng, public);
        let res = hub
            .http
            .post(hub.admin_url("/v1/publish"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        let text = res.text().await.unwrap();
        assert!(
            status == 202 || (400..500).contains(&status),
            "{status} for {body}: {text}"
        );
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
        if status == 202 {
            assert!(v["id"].is_string(), "{text}");
        } else {
            assert!(v["error"].is_string() && v["message"].is_string(), "{text}");
        }
        *tally.entry(status).or_default() += 1;
    }
    eprintln!("publish: {tally:?}");
    assert!(
        tally.get(&202).copied().unwrap_or(0) >= rounds / 10,
        "{tally:?}"
    );
}

fn ws_frame(rng: &mut Rng, public: &str) -> (Message, bool) {
    match rng.below(40) {
        0..=19 => {
            let mut o = serde_json::Map::new();
            o.insert(
                "op".into(),
                json!(rng.pick(&["subscribe", "subscribe", "unsubscribe", "publish", ""])),
            );
            if rng.chance(90) {
                o.insert("channel".into(), json!(channel(rng, public)));
            }
            if rng.chance(30) {
                o.insert("since".into(), json!(last_event_id(rng)));
            }
            (Message::text(Value::Object(o).to_string()), false)
        }
        20..=27 => (Message::text(rng.text(100)), false),
        28..=31 => (Message::binary(rng.bytes(100)), false),
        32..=35 => (Message::Ping(rng.bytes(100).into()), false),
        36..=38 => (
            Message::text(json!({"op": "subscribe", "channel": 7}).to_string()),
            false,
        ),
        // Over the 4 KB frame limit: refused with 413 and the socket closed.
        _ => (Message::text("x".repeat(5000 + rng.below(5000))), true),
    }
}

async fn ws_storm(hub: &Hub, rng: &mut Rng, public: &str, sockets: usize, frames: usize) {
    let mut tally = BTreeMap::<String, usize>::new();
    let mut kept = Vec::new();
    for s in 0..sockets {
        let query = if rng.chance(50) {
            format!("?token={}", token("u1", &["room:*"], 600))
        } else {
            String::new()
        };
        let mut ws = client::try_ws(hub.public, &query, &[]).await.unwrap();
        let mut oversize = false;
        for _ in 0..rng.below(frames) + 1 {
            let (m, big) = ws_frame(rng, public);
            oversize |= big;
            if ws.send(m).await.is_err() || big {
                break;
            }
        }
        // Whatever came before, the socket answers a valid subscribe, unless it was closed
        // for an oversize frame.
        let marker = format!("{public}alive");
        let sent = ws
            .send(Message::text(
                json!({"op": "subscribe", "channel": marker}).to_string(),
            ))
            .await
            .is_ok();
        let outcome = tokio::time::timeout(WAIT, async {
            while let Some(m) = ws.next().await {
                match m {
                    Ok(Message::Text(t)) => {
                        let v: Value = serde_json::from_str(&t).expect("JSON frame");
                        match v["type"].as_str() {
                            Some("error") => {
                                let code = v["code"].as_u64().unwrap();
                                assert!((400..500).contains(&code), "{v}");
                                *tally.entry(format!("error {code}")).or_default() += 1;
                            }
                            Some("subscribed") if v["channel"] == marker.as_str() => {
                                return "alive"
                            }
                            Some("subscribed" | "unsubscribed" | "reset") => {
                                *tally.entry(v["type"].as_str().unwrap().into()).or_default() += 1
                            }
                            _ => {
                                assert!(v["channel"].is_string(), "an odd frame: {v}");
                            }
                        }
                    }
                    Ok(Message::Close(_)) | Err(_) => return "closed",
                    Ok(_) => {}
                }
            }
            "closed"
        })
        .await
        .unwrap_or_else(|_| panic!("socket {s}: neither an answer nor a close"));
        if outcome == "closed" || !sent {
            assert!(oversize, "socket {s} closed without an oversize frame");
        }
        *tally.entry(outcome.into()).or_default() += 1;
        if s % 3 == 0 && outcome == "alive" {
            kept.push(ws);
        }
    }
    eprintln!("ws: {tally:?}");
    assert!(
        tally.get("alive").copied().unwrap_or(0) >= sockets / 3,
        "{tally:?}"
    );
}

/// Every stream and socket the storms opened is released once their clients are gone, and a
/// normal stream still gets a message.
async fn still_serving(hub: &mut Hub, public: &str) {
    wait_until("every stream released", WAIT, || async {
        hub.metric(r#"hub_connections{transport="sse"}"#).await == 0.0
            && hub.metric(r#"hub_connections{transport="ws"}"#).await == 0.0
    })
    .await;
    let ch = format!("{public}final");
    let (mut s, _) = hub.connect(&format!("channel={ch}"), &[]).await;
    hub.publish(&ch, None, json!("still here"), true).await;
    assert_eq!(s.next_message(WAIT).await.unwrap().data, "still here");
    assert!(
        hub.http
            .get(hub.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status()
            == 200
    );
    let log = hub.log();
    assert!(!log.contains("panicked"), "{log}");
    assert!(hub.try_status().is_none(), "the hub exited: {}", hub.log());
}

#[tokio::test]
async fn random_input_embedded() {
    let mut rng = Rng::seeded();
    let mut hub = Hub::start(&[
        ("HUB_JWT_SECRET", SECRET),
        ("HUB_MAX_MESSAGE_BYTES", "2048"),
        ("HUB_ALLOWED_ORIGINS", "https://app.example"),
    ])
    .await;
    let public = format!("{}.", prefix("fuzz"));
    http_storm(&hub, &mut rng, &public, 500).await;
    publish_storm(&hub, &mut rng, &public, 200).await;
    ws_storm(&hub, &mut rng, &public, 40, 20).await;
    still_serving(&mut hub, &public).await;
}

#[tokio::test]
async fn random_input_redis_and_junk_on_its_channels() {
    let mut rng = Rng::seeded();
    let redis = Redis::start();
    let url = redis.url();
    let mut hub = Hub::start(&[
        ("HUB_REDIS_URL", url.as_str()),
        ("HUB_JWT_SECRET", SECRET),
        ("HUB_MAX_MESSAGE_BYTES", "2048"),
    ])
    .await;
    hub.wait_ready(WAIT).await;
    let public = format!("{}.", prefix("fuzzr"));
    // Some history, so resumes read something.
    for i in 0..4 {
        let ch = format!("{public}{i}");
        let data: Vec<String> = (0..20).map(|n| n.to_string()).collect();
        hub.publish_many(&ch, &data).await;
    }
    http_storm(&hub, &mut rng, &public, 400).await;
    ws_storm(&hub, &mut rng, &public, 30, 20).await;

    // Junk where the hub listens on Redis, and odd calls of its functions, while a stream
    // reads: the stream gets the next real message, and the junk is counted.
    let ch = format!("{public}junk");
    let (mut s, _) = hub.connect(&format!("channel={ch}"), &[]).await;
    let mut conn = redis.conn().await;
    let dropped_before = hub
        .metric(r#"hub_messages_dropped_total{reason="malformed"}"#)
        .await;
    for _ in 0..200 {
        let key = rng.pick(&["hub:ch:", "hub:dur:"]);
        let mut payload = rng.bytes(80);
        if rng.chance(30) {
            // Looks like a durable notification.
            let mut p =
                format!("{}-{} ", rng.next() % 4_000_000_000_000, rng.below(3)).into_bytes();
            p.extend(payload);
            payload = p;
        }
        let _: i64 = redis::cmd("PUBLISH")
            .arg(format!("{key}{ch}"))
            .arg(payload)
            .query_async(&mut conn)
            .await
            .unwrap();
        let args: Vec<Vec<u8>> = (0..rng.below(5)).map(|_| rng.bytes(20)).collect();
        let _: redis::RedisResult<redis::Value> = redis::cmd("FCALL")
            .arg(rng.pick(&["hub_publish", "hub_read", "hub_recover"]))
            .arg(if rng.chance(50) { 1 } else { 0 })
            .arg(if rng.chance(50) {
                ch.clone()
            } else {
                rng.text(10)
            })
            .arg(args)
            .query_async(&mut conn)
            .await;
    }
    let id = hub.publish(&ch, None, json!("real"), true).await;
    let got = tokio::time::timeout(WAIT, async {
        loop {
            let m = s.next_message(WAIT).await.expect("a message");
            if m.data == "real" {
                return m;
            }
        }
    })
    .await
    .expect("the real message after the junk");
    assert_eq!(got.id.as_deref(), Some(id.as_str()));
    assert!(
        hub.metric(r#"hub_messages_dropped_total{reason="malformed"}"#)
            .await
            > dropped_before,
        "junk is counted"
    );
    drop(s);
    still_serving(&mut hub, &public).await;
}

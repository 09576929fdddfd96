//! Where the fan-out runs: on the node's fan-out lanes, not on the publisher. Every stream gets
//! each channel's messages in order and exactly once under a mix of direct writes (a parked
//! WebSocket written by the fan-out) and queued ones (a socket whose reader pauses, an SSE
//! stream), beside a socket reset mid-fan-out and one that reads nothing until the end; over
//! the embedded broker and over Redis. And a publish is answered while a large channel's
//! fan-out waits on sockets that do not read.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use futures_util::StreamExt;
use hub_tests::client::{subscribe, try_ws, Ws};
use hub_tests::redis_server::Redis;
use hub_tests::{prefix, Hub, SseStream, WAIT};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// Messages per channel.
const N: usize = 600;

/// Reads frames until `want` messages of `channels` arrived; pauses `pause` after every `every`
/// frames (0: never). Returns each channel's data in arrival order, and the socket (still open).
async fn read_ws(
    mut ws: Ws,
    want: usize,
    every: usize,
    pause: Duration,
) -> (HashMap<String, Vec<String>>, Ws) {
    let mut got: HashMap<String, Vec<String>> = HashMap::new();
    let mut n = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while n < want {
        let left = deadline.saturating_duration_since(Instant::now());
        let frame = tokio::time::timeout(left, ws.next())
            .await
            .expect("every message within 60 s")
            .expect("socket open")
            .expect("frame");
        let Message::Text(t) = frame else { continue };
        let v: Value = serde_json::from_str(&t).unwrap();
        if v["type"] != "message" {
            continue;
        }
        let ch = v["channel"].as_str().unwrap().to_string();
        got.entry(ch)
            .or_default()
            .push(v["data"].as_str().unwrap().to_string());
        n += 1;
        if every > 0 && n % every == 0 {
            tokio::time::sleep(pause).await;
        }
    }
    (got, ws)
}

async fn read_sse(mut s: SseStream, want: usize) -> (HashMap<String, Vec<String>>, SseStream) {
    let mut got: HashMap<String, Vec<String>> = HashMap::new();
    for _ in 0..want {
        let e = s
            .next_message(Duration::from_secs(60))
            .await
            .expect("every message within 60 s");
        let ch = e.data.split('/').next().unwrap().to_string();
        got.entry(ch).or_default().push(e.data.clone());
    }
    (got, s)
}

fn want(ch: &str) -> Vec<String> {
    (0..N).map(|i| format!("{ch}/{i:04}")).collect()
}

/// WebSocket frames carry `data` as published; SSE's `data` line is the JSON string's text.
fn check(got: &HashMap<String, Vec<String>>, a: &str, b: &str, who: &str) {
    assert_eq!(got.get(a).map(Vec::len), Some(N), "{who}: {a}");
    assert_eq!(got[a], want(a), "{who}: {a} in order, exactly once");
    assert_eq!(got[b], want(b), "{who}: {b} in order, exactly once");
}

async fn ws_on(hub: &Hub, a: &str, b: &str) -> Ws {
    let mut ws = try_ws(hub.public, "", &[]).await.unwrap();
    subscribe(&mut ws, a).await;
    subscribe(&mut ws, b).await;
    ws
}

async fn every_stream_gets_each_channel_in_order_exactly_once(hub: &Hub, publish: &Hub) {
    let p = prefix("order");
    let (a, b) = (format!("{p}.a"), format!("{p}.b"));
    let mut readers = Vec::new();
    // Fast readers (the fan-out writes them directly while parked), readers that pause (their
    // messages queue and go out in batches), SSE readers (always queued).
    for i in 0..24 {
        let ws = ws_on(hub, &a, &b).await;
        let (every, pause) = if i % 2 == 0 {
            (0, Duration::ZERO)
        } else {
            (50 + i, Duration::from_millis(20))
        };
        readers.push(tokio::spawn(read_ws(ws, 2 * N, every, pause)));
    }
    let q = format!("channel={a}&channel={b}");
    let mut sse = Vec::new();
    for _ in 0..8 {
        let (s, _) = hub.connect(&q, &[]).await;
        sse.push(tokio::spawn(read_sse(s, 2 * N)));
    }
    // One reads nothing until everything is published (its socket fills; it falls behind and
    // reads the rest from history); one is reset while the messages go out.
    let sleeping = ws_on(hub, &a, &b).await;
    let reset = ws_on(hub, &a, &b).await;
    let streams = hub.stats().await["connections"]["total"].as_u64().unwrap();
    assert_eq!(streams, 24 + 8 + 2);
    let publish_channel = |ch: String| async move {
        for i in 0..N {
            publish
                .publish(&ch, None, json!(format!("{ch}/{i:04}")), true)
                .await;
        }
    };
    let resetting = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let MaybeTls::Plain(tcp) = reset.get_ref() else {
            unreachable!()
        };
        socket2::SockRef::from(tcp)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(reset);
    };
    tokio::join!(
        publish_channel(a.clone()),
        publish_channel(b.clone()),
        resetting
    );
    let mut open = Vec::new();
    for (i, r) in readers.into_iter().enumerate() {
        let (got, ws) = r.await.unwrap();
        check(&got, &a, &b, &format!("ws reader {i}"));
        open.push(ws);
    }
    let mut open_sse = Vec::new();
    for (i, r) in sse.into_iter().enumerate() {
        let (got, s) = r.await.unwrap();
        check(&got, &a, &b, &format!("sse reader {i}"));
        open_sse.push(s);
    }
    let (late, _slept) = read_ws(sleeping, 2 * N, 0, Duration::ZERO).await;
    check(&late, &a, &b, "the reader that slept");
    // The reset socket is gone; the others are all still open.
    hub_tests::wait_until("the reset socket is closed", WAIT, || async {
        hub.stats().await["connections"]["total"] == streams - 1
    })
    .await;
}

use tokio_tungstenite::MaybeTlsStream as MaybeTls;

#[tokio::test]
async fn every_stream_gets_each_channel_in_order_exactly_once_embedded() {
    let hub = Hub::start(&[("HUB_OUTBOX_LEN", "64")]).await;
    every_stream_gets_each_channel_in_order_exactly_once(&hub, &hub).await;
}

#[tokio::test]
async fn every_stream_gets_each_channel_in_order_exactly_once_over_redis() {
    let redis = Redis::start();
    let url = redis.url();
    let env = [("HUB_REDIS_URL", url.as_str()), ("HUB_OUTBOX_LEN", "64")];
    let (hub, publisher) = tokio::join!(Hub::start(&env), Hub::start(&env));
    hub.wait_ready(WAIT).await;
    publisher.wait_ready(WAIT).await;
    // Published on another node: the messages reach this one through its Redis subscriber.
    every_stream_gets_each_channel_in_order_exactly_once(&hub, &publisher).await;
}

#[tokio::test]
async fn a_publish_is_answered_while_a_large_channel_waits_on_sockets_that_do_not_read() {
    let hub = Hub::start(&[]).await;
    let p = prefix("big");
    let (big, small) = (format!("{p}.big"), format!("{p}.small"));
    // 600 sockets that never read (more than a lane offers at once: the fan-out goes in parts):
    // each message of 60 KB fills their buffers quickly, so every
    // fan-out of `big` meets full sockets.
    let mut stuck = Vec::new();
    for _ in 0..600 {
        let mut ws = try_ws(hub.public, "", &[]).await.unwrap();
        subscribe(&mut ws, &big).await;
        stuck.push(ws);
    }
    let mut reader = try_ws(hub.public, "", &[]).await.unwrap();
    subscribe(&mut reader, &small).await;
    let blob = "b".repeat(60_000);
    let started = Instant::now();
    for _ in 0..40 {
        hub.publish(&big, None, json!(blob), false).await;
    }
    let forty = started.elapsed();
    hub.publish(&small, None, json!("small"), false).await;
    let v = hub_tests::client::next(&mut reader).await;
    assert_eq!(v["data"], "small");
    // Every publish was answered, the small channel's reader served, the stuck sockets cut
    // off as slow or behind (their buffers bounded), and the node is still there.
    assert!(forty < Duration::from_secs(20), "{forty:?}");
    assert!(hub.is_ready().await);
    drop(stuck);
}

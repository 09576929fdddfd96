//! Several real hub processes on one real redis-server behave as one service: every
//! subscriber on every node gets every message once and in order, channels are subscribed at
//! Redis only while a node has streams for them, a stream resumes on another node, and
//! malformed envelopes published straight to Redis are dropped and counted.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use hub_tests::{prefix, Hub, Redis, SseStream, WAIT};
use protocol::{publish, Envelope};
use serde_json::json;
use std::time::Duration;

async fn redis_hubs(redis: &Redis, n: usize, extra: &[(&str, &str)]) -> Vec<Hub> {
    let url = redis.url();
    let mut hubs = Vec::new();
    for i in 0..n {
        let node = format!("node-{i}");
        let mut env = vec![
            ("HUB_REDIS_URL", url.as_str()),
            ("HUB_NODE_ID", node.as_str()),
        ];
        env.extend_from_slice(extra);
        let hub = Hub::start(&env).await;
        hub.wait_ready(WAIT).await;
        hubs.push(hub);
    }
    hubs
}

fn env(data: serde_json::Value) -> Envelope {
    Envelope { event: None, data }
}

async fn datas(s: &mut SseStream, n: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        out.push(s.next_message(WAIT).await.expect("stream ended").data);
    }
    out
}

#[tokio::test]
async fn every_subscriber_on_every_node_gets_every_message_once_in_order() {
    let redis = Redis::start();
    let hubs = redis_hubs(&redis, 3, &[]).await;
    let p = prefix("fanout");
    let (ch, other) = (format!("{p}.main"), format!("{p}.other"));
    let mut streams = Vec::new();
    for hub in &hubs {
        streams.push(hub.connect(&format!("channel={ch}"), &[]).await.0);
        streams.push(
            hub.connect(&format!("channel={ch}&channel={other}"), &[])
                .await
                .0,
        );
        streams.push(hub.connect(&format!("channel={ch}"), &[]).await.0);
    }
    let mut conn = redis.conn().await;
    let mut expected = Vec::new();
    for i in 0..120 {
        let data = format!("m{i}");
        match i % 4 {
            // Over Redis with the Rust helper, and over HTTP on a rotating node.
            0 | 1 => {
                publish::publish_durable(&mut conn, &ch, &env(json!(data)))
                    .await
                    .unwrap();
            }
            2 => {
                hubs[i % 3].publish(&ch, None, json!(data), true).await;
            }
            _ => {
                publish::publish_ephemeral(&mut conn, &ch, &env(json!(data)), false)
                    .await
                    .unwrap();
            }
        }
        expected.push(data);
    }
    for s in &mut streams {
        assert_eq!(datas(s, expected.len()).await, expected);
    }
    // Nothing more (no duplicate) before the next one.
    publish::publish_durable(&mut conn, &ch, &env(json!("end")))
        .await
        .unwrap();
    for s in &mut streams {
        assert_eq!(s.next_message(WAIT).await.unwrap().data, "end");
    }
    for hub in &hubs {
        assert!(
            hub.metric(r#"hub_messages_received_total{source="redis"}"#)
                .await
                >= 121.0
        );
    }
}

#[tokio::test]
async fn a_thousand_channels_subscribed_only_while_needed() {
    let redis = Redis::start();
    let hubs = redis_hubs(
        &redis,
        2,
        &[("HUB_HEARTBEAT_SECS", "1"), ("HUB_STALE_AFTER_SECS", "5")],
    )
    .await;
    let p = prefix("many");
    let name = |c: usize| format!("{p}.{c}");
    // 150 streams of 20 channels: every channel has exactly 3 subscribers, two on node 0 and
    // one on node 1.
    let mut streams = Vec::new();
    for j in 0..150 {
        let group = j % 50;
        let q: Vec<String> = (0..20)
            .map(|k| format!("channel={}", name(group * 20 + k)))
            .collect();
        streams.push(hubs[(j / 50) % 2].connect(&q.join("&"), &[]).await.0);
    }
    let pattern = format!("hub:ch:{p}.*");
    let count = redis.cli(&["PUBSUB", "CHANNELS", &pattern]).lines().count();
    assert_eq!(
        count, 1000,
        "one subscription per channel, no pattern subscription"
    );
    assert_eq!(redis.cli(&["PUBSUB", "NUMPAT"]), "0");
    let numsub = redis.cli(&["PUBSUB", "NUMSUB", &format!("hub:ch:{}", name(7))]);
    assert_eq!(
        numsub.lines().nth(1),
        Some("2"),
        "each node subscribes once, whatever its stream count"
    );
    for hub in &hubs {
        assert_eq!(hub.metric("hub_channels").await, 1000.0);
    }
    let mut conn = redis.conn().await;
    let mut pipe = redis::pipe();
    for c in 0..1000 {
        let env = env(json!(format!("to {c}"))).to_bytes();
        pipe.cmd("FCALL")
            .arg("hub_publish")
            .arg(1)
            .arg(name(c))
            .arg(env);
    }
    let ids: Vec<String> = pipe.query_async(&mut conn).await.unwrap();
    assert_eq!(ids.len(), 1000);
    for (j, s) in streams.iter_mut().enumerate() {
        let group = j % 50;
        let mut got = datas(s, 20).await;
        got.sort();
        let mut want: Vec<String> = (0..20).map(|k| format!("to {}", group * 20 + k)).collect();
        want.sort();
        assert_eq!(got, want, "stream {j}");
    }
    drop(streams);
    hub_tests::wait_until(
        "every channel unsubscribed",
        Duration::from_secs(10),
        || async { redis.cli(&["PUBSUB", "CHANNELS", &pattern]).is_empty() },
    )
    .await;
    for hub in &hubs {
        hub.wait_metric("hub_channels", 0.0, WAIT).await;
    }
}

#[tokio::test]
async fn a_stream_resumes_on_another_node() {
    let redis = Redis::start();
    let hubs = redis_hubs(&redis, 2, &[]).await;
    let p = prefix("move");
    let (a, b) = (format!("{p}.a"), format!("{p}.b"));
    let mut conn = redis.conn().await;
    // One channel.
    let (mut s, _) = hubs[0].connect(&format!("channel={a}"), &[]).await;
    for i in 0..3 {
        publish::publish_durable(&mut conn, &a, &env(json!(format!("a{i}"))))
            .await
            .unwrap();
    }
    let got = datas(&mut s, 3).await;
    assert_eq!(got, ["a0", "a1", "a2"]);
    drop(s);
    // A stream opened now starts at a2's position: its hub.connected id says so.
    let (_s, first) = hubs[0].connect(&format!("channel={a}"), &[]).await;
    let last = first.id.unwrap();
    for i in 3..8 {
        publish::publish_durable(&mut conn, &a, &env(json!(format!("a{i}"))))
            .await
            .unwrap();
    }
    let (mut r, _) = hubs[1]
        .connect(&format!("channel={a}"), &[("Last-Event-ID", last.as_str())])
        .await;
    assert_eq!(datas(&mut r, 5).await, ["a3", "a4", "a5", "a6", "a7"]);
    publish::publish_durable(&mut conn, &a, &env(json!("live")))
        .await
        .unwrap();
    assert_eq!(r.next_message(WAIT).await.unwrap().data, "live");

    // Two channels: the cursor from node 1 resumes both on node 0.
    let q = format!("channel={a}&channel={b}");
    let (mut s, _) = hubs[1].connect(&q, &[]).await;
    publish::publish_durable(&mut conn, &b, &env(json!("b0")))
        .await
        .unwrap();
    let cursor = s.next_message(WAIT).await.unwrap().id.unwrap();
    drop(s);
    publish::publish_durable(&mut conn, &a, &env(json!("a-after")))
        .await
        .unwrap();
    publish::publish_durable(&mut conn, &b, &env(json!("b-after")))
        .await
        .unwrap();
    let (mut r, _) = hubs[0]
        .connect(&q, &[("Last-Event-ID", cursor.as_str())])
        .await;
    let mut got = datas(&mut r, 2).await;
    got.sort();
    assert_eq!(got, ["a-after", "b-after"]);
}

#[tokio::test]
async fn resume_beyond_the_history_is_a_reset_on_any_node() {
    let redis = Redis::start();
    let hubs = redis_hubs(&redis, 2, &[("HUB_HISTORY_LEN", "3")]).await;
    let ch = prefix("trim");
    let mut conn = redis.conn().await;
    let (mut s, _) = hubs[0].connect(&format!("channel={ch}"), &[]).await;
    publish::publish_durable(&mut conn, &ch, &env(json!("x")))
        .await
        .unwrap();
    let last = s.next_message(WAIT).await.unwrap().id.unwrap();
    drop(s);
    for i in 0..5 {
        publish::publish_durable(&mut conn, &ch, &env(json!(i)))
            .await
            .unwrap();
    }
    let (mut r, _) = hubs[1]
        .connect(
            &format!("channel={ch}"),
            &[("Last-Event-ID", last.as_str())],
        )
        .await;
    let ev = r.next_message(WAIT).await.unwrap();
    assert_eq!(ev.event, "hub.reset");
    assert_eq!(ev.json(), json!({"channels": [ch]}));
    assert_eq!(
        redis.cli(&["XLEN", &format!("hub:hist:{{{ch}}}")]),
        "3",
        "exactly HUB_HISTORY_LEN kept"
    );
    let ttl: i64 = redis
        .cli(&["PTTL", &format!("hub:hist:{{{ch}}}")])
        .parse()
        .unwrap();
    assert!(
        ttl > 3_500_000 && ttl <= 3_600_000,
        "history expires after HUB_HISTORY_TTL_SECS: {ttl}"
    );
}

#[tokio::test]
async fn malformed_envelopes_on_redis_are_dropped_and_counted() {
    let redis = Redis::start();
    let hubs = redis_hubs(&redis, 1, &[("HUB_MAX_MESSAGE_BYTES", "200")]).await;
    let hub = &hubs[0];
    let ch = prefix("junk");
    let (mut s, _) = hub.connect(&format!("channel={ch}"), &[]).await;
    let live = format!("hub:ch:{ch}");
    let durable = format!("hub:dur:{ch}");
    let big = json!({"data": "x".repeat(300)}).to_string();
    for (on, junk) in [
        (&live, "not json"),
        (&live, "[1,2]"),
        (&live, r#"{"event":"x"}"#),
        (&live, r#"{"event":"hub.reset","data":1}"#),
        (&durable, "123-0 not json"),
        (&live, "12x {\"data\":1}"),
        (&live, big.as_str()),
    ] {
        redis.cli(&["PUBLISH", on, junk]);
    }
    hub.wait_metric(
        r#"hub_messages_dropped_total{reason="malformed"}"#,
        6.0,
        WAIT,
    )
    .await;
    hub.wait_metric(
        r#"hub_messages_dropped_total{reason="too_large"}"#,
        1.0,
        WAIT,
    )
    .await;
    // FCALL refuses bad input with an error the publisher sees; nothing is stored.
    for (chan, junk) in [
        (ch.as_str(), "nope"),
        (ch.as_str(), big.as_str()),
        ("bad name", r#"{"data":1}"#),
    ] {
        let out = redis.cli(&["FCALL", "hub_publish", "1", chan, junk]);
        assert!(out.starts_with("ERR"), "{junk}: {out}");
    }
    let mut conn = redis.conn().await;
    let id = publish::publish_durable(&mut conn, &ch, &env(json!("good")))
        .await
        .unwrap();
    let m = s.next_message(WAIT).await.unwrap();
    assert_eq!(
        (m.id.as_deref(), m.data.as_str()),
        (Some(id.as_str()), "good")
    );
    assert!(hub.log().contains("dropped a message from Redis"));
}

//! Rewind: a fresh stream (`rewind=N` on SSE, `"rewind": N` on a WebSocket subscribe) gets the
//! last N durable messages of each channel, then live, exactly once; fewer when history holds
//! fewer, never a `hub.reset` for that; ignored with a resume id; N above `HUB_HISTORY_LEN` is
//! 400. Embedded broker and Redis alike.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use hub_tests::client::{next, send, try_ws};
use hub_tests::{prefix, Hub, Redis, SseStream, WAIT};
use serde_json::json;

/// The data of the next `n` events (hub events included, so a reset would show).
async fn take(s: &mut SseStream, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    while out.len() < n {
        let m = s.next_message(WAIT).await.expect("stream ended early");
        if m.event == "message" {
            out.push(m.data);
        } else {
            out.push(format!("{}:{}", m.event, m.data));
        }
    }
    out
}

fn data(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("d{i}")).collect()
}

/// Every case of the feature against one node (`env` picks the broker).
async fn rewinds(env: &[(&str, &str)]) {
    let mut env = env.to_vec();
    env.push(("HUB_HISTORY_LEN", "8"));
    let hub = Hub::start(&env).await;
    hub.wait_ready(WAIT).await;
    let ch = prefix("rewind");
    // A publish answers once its message is queued for the fan-out, so a stream opened just
    // after it may still get it live. Watchers on every lane (a stream's lane is its sequence
    // number modulo the cores; these take consecutive ones) show when the fan-out of the
    // ephemeral message is over: the streams below open after it.
    let lanes = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut watchers = Vec::new();
    for _ in 0..2 * lanes {
        watchers.push(hub.connect(&format!("channel={ch}"), &[]).await.0);
    }
    // 10 durable messages: history (8) keeps d2..d9; an ephemeral one is never replayed.
    let ids = hub.publish_many(&ch, &data(0..10)).await;
    hub.publish(&ch, None, json!("ephemeral"), false).await;
    for w in &mut watchers {
        while w.next_message(WAIT).await.expect("watcher ended").data != "ephemeral" {}
    }

    // SSE: the last 3, then live, nothing twice.
    let (mut s, _) = hub.connect(&format!("channel={ch}&rewind=3"), &[]).await;
    assert_eq!(take(&mut s, 3).await, data(7..10));
    hub.publish(&ch, None, json!("live-1"), true).await;
    assert_eq!(take(&mut s, 1).await, vec!["live-1"]);

    // rewind=0 is a plain fresh stream.
    let (mut z, _) = hub.connect(&format!("channel={ch}&rewind=0"), &[]).await;
    // All history holds (8: d3..live-1), no reset, when asked for all of it.
    let (mut all, _) = hub.connect(&format!("channel={ch}&rewind=8"), &[]).await;
    let mut want = data(3..10);
    want.push("live-1".into());
    assert_eq!(take(&mut all, 8).await, want);
    hub.publish(&ch, None, json!("live-2"), true).await;
    assert_eq!(take(&mut z, 1).await, vec!["live-2"]);
    assert_eq!(take(&mut all, 1).await, vec!["live-2"]);
    assert_eq!(take(&mut s, 1).await, vec!["live-2"]);

    // A channel with fewer messages than asked: all of them, no reset.
    let few = format!("{ch}.few");
    hub.publish_many(&few, &data(0..2)).await;
    let (mut f, _) = hub
        .connect(&format!("channel={few}&channel={ch}&rewind=2"), &[])
        .await;
    let mut got = take(&mut f, 4).await;
    got.sort();
    assert_eq!(got, vec!["d0", "d1", "live-1", "live-2"]);

    // With a resume id, rewind is ignored: what follows the id, exactly.
    let (mut r, _) = hub
        .connect(
            &format!("channel={ch}&rewind=5&last_event_id={}", ids[8]),
            &[],
        )
        .await;
    assert_eq!(take(&mut r, 3).await, vec!["d9", "live-1", "live-2"]);

    // Out of range or not a number: 400, before anything is opened.
    for bad in ["9", "-1", "x", "1.5"] {
        let mut b = hub.sse(&format!("channel={ch}&rewind={bad}"), &[]).await;
        assert_eq!(b.status, 400, "rewind={bad}");
        assert!(b.error_body().await.contains("rewind"), "rewind={bad}");
    }

    // WebSocket: the same on subscribe; a bad rewind is an error frame and the socket stays.
    let mut ws = try_ws(hub.public, "", &[]).await.unwrap();
    send(
        &mut ws,
        json!({"op": "subscribe", "channel": ch, "rewind": 9}),
    )
    .await;
    let e = next(&mut ws).await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_u64()),
        (Some("error"), Some(400)),
        "{e}"
    );
    send(
        &mut ws,
        json!({"op": "subscribe", "channel": ch, "rewind": 2}),
    )
    .await;
    assert_eq!(
        next(&mut ws).await,
        json!({"type": "subscribed", "channel": ch})
    );
    for want in ["live-1", "live-2"] {
        let m = next(&mut ws).await;
        assert_eq!(
            (m["type"].as_str(), m["data"].as_str()),
            (Some("message"), Some(want)),
            "{m}"
        );
    }
    hub.publish(&ch, None, json!("live-3"), true).await;
    let m = next(&mut ws).await;
    assert_eq!(m["data"], "live-3", "{m}");
    // `since` wins over rewind.
    let mut w2 = try_ws(hub.public, "", &[]).await.unwrap();
    send(
        &mut w2,
        json!({"op": "subscribe", "channel": ch, "rewind": 5, "since": ids[9]}),
    )
    .await;
    assert_eq!(
        next(&mut w2).await,
        json!({"type": "subscribed", "channel": ch})
    );
    for want in ["live-1", "live-2", "live-3"] {
        assert_eq!(next(&mut w2).await["data"], want);
    }
    assert!(hub.metric("hub_history_replayed_total").await >= 20.0);
}

#[tokio::test]
async fn rewind_with_the_embedded_broker() {
    rewinds(&[]).await;
}

#[tokio::test]
async fn rewind_with_redis() {
    let redis = Redis::start();
    let url = redis.url();
    rewinds(&[("HUB_REDIS_URL", url.as_str())]).await;
}

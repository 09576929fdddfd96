//! `GET /v1/sse` as the contract describes it: headers, the first frame, message frames,
//! envelope mode, ephemeral messages, heartbeats and CORS, against a real hub process.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use hub_tests::{prefix, Hub, WAIT};
use serde_json::json;
use std::time::Duration;

#[tokio::test]
async fn headers_and_connected_frame() {
    let hub = Hub::start(&[("HUB_HEARTBEAT_SECS", "7"), ("HUB_RETRY_MS", "1500")]).await;
    let p = prefix("hdr");
    let (a, b) = (format!("{p}.b"), format!("{p}.a"));
    let (s, first) = hub
        .connect(&format!("channel={a}&channel={b}&channel={a}"), &[])
        .await;
    assert_eq!(s.header("content-type"), Some("text/event-stream"));
    assert_eq!(s.header("cache-control"), Some("no-cache"));
    assert_eq!(s.header("x-accel-buffering"), Some("no"));
    assert_eq!(first.retry, Some(1500));
    assert!(
        first.id.is_some(),
        "the first frame carries the starting cursor"
    );
    let v = first.json();
    assert!(uuid_like(v["connection_id"].as_str().unwrap()), "{v}");
    assert_eq!(v["node"], hub.node.as_str());
    assert_eq!(v["heartbeat_secs"], 7);
    // Sorted and deduplicated.
    assert_eq!(v["channels"], json!([b, a]));
}

fn uuid_like(s: &str) -> bool {
    s.len() == 36 && s.chars().filter(|c| *c == '-').count() == 4
}

#[tokio::test]
async fn durable_messages_arrive_with_their_id_and_split_data() {
    let hub = Hub::start(&[]).await;
    let ch = prefix("durable");
    let (mut s, _) = hub.connect(&format!("channel={ch}"), &[]).await;
    let id1 = hub
        .publish(&ch, Some("chat"), json!({"text": "hi", "n": [1, 2]}), true)
        .await;
    let id2 = hub
        .publish(&ch, None, json!("line1\nline2\r\nline3"), true)
        .await;
    let id3 = hub.publish(&ch, Some("message"), json!(42), true).await;

    let m = s.next_message(WAIT).await.unwrap();
    assert_eq!(
        (m.id.as_deref(), m.event.as_str()),
        (Some(id1.as_str()), "chat")
    );
    assert_eq!(m.data, r#"{"text":"hi","n":[1,2]}"#, "compact JSON");
    let m = s.next_message(WAIT).await.unwrap();
    assert_eq!(
        (m.id.as_deref(), m.event.as_str()),
        (Some(id2.as_str()), "message")
    );
    assert_eq!(
        m.data, "line1\nline2\nline3",
        "a string is sent raw, split into data lines"
    );
    let m = s.next_message(WAIT).await.unwrap();
    assert_eq!(
        (m.id.as_deref(), m.data.as_str()),
        (Some(id3.as_str()), "42")
    );
    assert!(
        id1 < id2 || id1.len() < id2.len(),
        "ids increase: {id1} {id2}"
    );
}

#[tokio::test]
async fn envelope_mode_says_which_channel() {
    let hub = Hub::start(&[]).await;
    let p = prefix("env");
    let (a, b) = (format!("{p}.a"), format!("{p}.b"));
    let (mut s, _) = hub
        .connect(&format!("channel={a}&channel={b}&envelope=true"), &[])
        .await;
    let id = hub.publish(&b, Some("upd"), json!({"k": "v"}), true).await;
    let m = s.next_message(WAIT).await.unwrap();
    assert_eq!(m.event, "upd");
    assert_eq!(
        m.json(),
        json!({"channel": b, "id": id, "event": "upd", "data": {"k": "v"}})
    );
    // Several channels: the SSE id is an opaque cursor, not the message id.
    assert_ne!(m.id.as_deref(), Some(id.as_str()));
}

#[tokio::test]
async fn ephemeral_messages_reach_current_readers_without_an_id() {
    let hub = Hub::start(&[]).await;
    let ch = prefix("eph");
    let (mut s, first) = hub.connect(&format!("channel={ch}"), &[]).await;
    hub.publish(&ch, Some("ping"), json!("now"), false).await;
    let m = s.next_message(WAIT).await.unwrap();
    assert_eq!(
        (m.event.as_str(), m.data.as_str(), m.id),
        ("ping", "now", None)
    );
    // Not kept: a resume from before it replays nothing.
    let (mut r, _) = hub
        .connect(
            &format!("channel={ch}"),
            &[("Last-Event-ID", first.id.as_deref().unwrap())],
        )
        .await;
    let marker = hub.publish(&ch, None, json!("marker"), true).await;
    let m = r.next_message(WAIT).await.unwrap();
    assert_eq!(
        m.id.as_deref(),
        Some(marker.as_str()),
        "the ephemeral message was not replayed"
    );
}

#[tokio::test]
async fn heartbeats_are_comments_every_interval() {
    let hub = Hub::start(&[("HUB_HEARTBEAT_SECS", "1"), ("HUB_STALE_AFTER_SECS", "5")]).await;
    let ch = prefix("hb");
    let (mut s, _) = hub.connect(&format!("channel={ch}"), &[]).await;
    let start = std::time::Instant::now();
    for _ in 0..3 {
        let ev = s.next_event(Duration::from_secs(3)).await.unwrap();
        assert!(ev.comment, "expected a heartbeat comment, got {ev:?}");
    }
    // Three heartbeats at one per second take at least two seconds.
    assert!(
        start.elapsed() >= Duration::from_millis(1900),
        "{:?}",
        start.elapsed()
    );
    assert!(hub.metric("hub_heartbeats_sent_total").await >= 3.0);
}

#[tokio::test]
async fn cors_follows_allowed_origins() {
    let hub = Hub::start(&[(
        "HUB_ALLOWED_ORIGINS",
        "https://app.example, http://localhost:3000",
    )])
    .await;
    let ch = prefix("cors");
    let (s, _) = hub
        .connect(
            &format!("channel={ch}"),
            &[("Origin", "https://app.example")],
        )
        .await;
    assert_eq!(
        s.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    drop(s);
    // No Origin (a server-side client): allowed, no CORS headers.
    let (s, _) = hub.connect(&format!("channel={ch}"), &[]).await;
    assert_eq!(s.header("access-control-allow-origin"), None);
    drop(s);
    let mut s = hub
        .sse(
            &format!("channel={ch}"),
            &[("Origin", "https://evil.example")],
        )
        .await;
    assert_eq!(s.status, 403);
    let body: serde_json::Value = serde_json::from_str(&s.error_body().await).unwrap();
    assert_eq!(body["error"], "forbidden");
    // Preflight.
    let res = hub
        .http
        .request(reqwest::Method::OPTIONS, hub.url("/v1/sse"))
        .header("Origin", "http://localhost:3000")
        .header("Access-Control-Request-Method", "GET")
        .header("Access-Control-Request-Headers", "last-event-id")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    assert_eq!(
        res.headers()["access-control-allow-origin"],
        "http://localhost:3000"
    );
    assert!(res.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .contains("Last-Event-ID"));
    let res = hub
        .http
        .request(reqwest::Method::OPTIONS, hub.url("/v1/sse"))
        .header("Origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    assert!(
        hub.metric(r#"hub_connections_rejected_total{reason="forbidden"}"#)
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn wildcard_origin_answers_star() {
    let hub = Hub::start(&[]).await;
    let (s, _) = hub
        .connect(
            &format!("channel={}", prefix("star")),
            &[("Origin", "https://any.example")],
        )
        .await;
    assert_eq!(s.header("access-control-allow-origin"), Some("*"));
}

#[tokio::test]
async fn stream_requests_of_any_head_size_are_served_and_junk_after_them_is_cut_off() {
    use hub_tests::{raw_get, wait_until, SseStream};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let hub = Hub::start(&[]).await;
    let ch = format!("{}.a", prefix("front"));
    let path = format!("/v1/sse?channel={ch}");
    // A head the public port's front reads itself: the body ends with the connection.
    let mut small = SseStream::raw(hub.public, &path, &[], 65_536).await;
    assert_eq!(small.status, 200);
    assert_eq!(small.header("connection"), Some("close"));
    assert_eq!(small.header("transfer-encoding"), None);
    // A head over the front's 8 KiB (long cookies) goes to actix-http: the same stream.
    let cookie = format!("c={}", "x".repeat(12_000));
    let mut big = SseStream::raw(hub.public, &path, &[("Cookie", &cookie)], 65_536).await;
    assert_eq!(big.status, 200);
    assert_eq!(big.header("content-type"), Some("text/event-stream"));
    for s in [&mut small, &mut big] {
        let first = s.next_event(WAIT).await.unwrap();
        assert_eq!(first.event, "hub.connected");
    }
    let id = hub.publish(&ch, None, json!("hello"), true).await;
    for s in [&mut small, &mut big] {
        let m = s.next_message(WAIT).await.unwrap();
        assert_eq!(
            (m.id.as_deref(), m.data.as_str()),
            (Some(id.as_str()), "hello")
        );
    }
    // A client that writes after its request: what it sends is read and dropped, up to
    // 64 KiB; past that its stream is closed and released.
    let mut chatty = raw_get(hub.public, &path, &[], None).await;
    wait_until("three streams", WAIT, || async {
        hub.stats().await["connections"]["sse"] == 3
    })
    .await;
    chatty.write_all(&[b'x'; 16 * 1024]).await.unwrap();
    let id2 = hub.publish(&ch, None, json!("still here"), true).await;
    let mut seen = Vec::new();
    tokio::time::timeout(WAIT, async {
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains(&format!("id: {id2}")) {
            let n = chatty.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "closed after 16 KiB: {}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("the stream goes on after 16 KiB of client bytes");
    let _ = chatty.write_all(&vec![b'x'; 70 * 1024]).await;
    wait_until("the chatty stream is released", WAIT, || async {
        hub.stats().await["connections"]["sse"] == 2
    })
    .await;
}

//! Limits that protect the node, and counts that stay exact however streams end: the
//! connection cap, clients that leave, a reader that stops reading (left to history, not
//! closed), and a stream that accepts no writes (stale).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use hub_tests::{prefix, Hub, WAIT};
use serde_json::json;
use std::time::Duration;

const SSE: &str = r#"hub_connections{transport="sse"}"#;

#[tokio::test]
async fn the_node_limit_answers_503_with_retry_after() {
    let hub = Hub::start(&[
        ("HUB_MAX_CONNECTIONS", "3"),
        ("HUB_HEARTBEAT_SECS", "1"),
        ("HUB_STALE_AFTER_SECS", "5"),
    ])
    .await;
    let ch = prefix("cap");
    let q = format!("channel={ch}");
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(hub.connect(&q, &[]).await.0);
    }
    let mut refused = hub.sse(&q, &[]).await;
    assert_eq!(refused.status, 503);
    let retry: u64 = refused
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!(retry >= 1);
    let body: serde_json::Value = serde_json::from_str(&refused.error_body().await).unwrap();
    assert_eq!(body["error"], "capacity");
    assert_eq!(
        hub.metric(r#"hub_connections_rejected_total{reason="capacity"}"#)
            .await,
        1.0
    );
    assert_eq!(hub.metric("hub_connections_max").await, 3.0);
    // When one leaves, a place frees up (by the second heartbeat at the latest).
    open.pop();
    hub.wait_metric(SSE, 2.0, Duration::from_secs(5)).await;
    let (_again, _) = hub.connect(&q, &[]).await;
}

#[tokio::test]
async fn counts_return_to_zero_after_200_streams_open_and_close() {
    let hub = Hub::start(&[("HUB_HEARTBEAT_SECS", "1"), ("HUB_STALE_AFTER_SECS", "5")]).await;
    let p = prefix("count");
    let mut streams = Vec::new();
    for i in 0..200 {
        let q = format!("channel={p}.{}&channel={p}.all", i % 20);
        streams.push(hub.connect(&q, &[]).await.0);
    }
    hub.wait_metric(SSE, 200.0, WAIT).await;
    assert_eq!(hub.metric("hub_channels").await, 21.0);
    let stats = hub.stats().await;
    assert_eq!(stats["connections"]["sse"], 200);
    // Half leave abruptly, half after reading a message.
    hub.publish(&format!("{p}.all"), None, json!("bye"), true)
        .await;
    for (i, mut s) in streams.into_iter().enumerate() {
        if i % 2 == 0 {
            assert_eq!(s.next_message(WAIT).await.unwrap().data, "bye");
        }
        drop(s);
    }
    // Released by the second heartbeat after the client left, at the latest.
    hub.wait_metric(SSE, 0.0, Duration::from_secs(5)).await;
    assert_eq!(hub.metric("hub_channels").await, 0.0);
    assert_eq!(
        hub.metric(r#"hub_connections_opened_total{transport="sse"}"#)
            .await,
        200.0
    );
    assert_eq!(
        hub.metric(r#"hub_connections_closed_total{transport="sse",reason="client"}"#)
            .await,
        200.0
    );
    let stats = hub.stats().await;
    assert_eq!(
        (
            stats["connections"]["total"].as_u64(),
            stats["channels"].as_u64()
        ),
        (Some(0), Some(0))
    );
}

/// A client that sends the request and then never reads, with a small receive buffer.
async fn non_reader(hub: &Hub, ch: &str) -> tokio::net::TcpStream {
    let path = format!("/v1/sse?channel={ch}");
    hub_tests::raw_get(
        hub.public,
        &path,
        &[("Accept", "text/event-stream")],
        Some(4096),
    )
    .await
}

#[tokio::test]
async fn a_reader_that_stops_costs_the_others_nothing_and_is_not_closed() {
    let hub = Hub::start(&[("HUB_OUTBOX_LEN", "16")]).await;
    let ch = prefix("slow");
    let (mut fast, _) = hub.connect(&format!("channel={ch}"), &[]).await;
    let _stuck = non_reader(&hub, &ch).await;
    hub.wait_metric(SSE, 2.0, WAIT).await;
    let payload = "y".repeat(60_000);
    let total = 250;
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        while got.len() < total {
            let m = fast
                .next_message(WAIT)
                .await
                .expect("fast reader's stream ended");
            got.push(m.id.unwrap());
        }
        (got, fast)
    });
    let mut ids = Vec::new();
    for _ in 0..total {
        ids.push(hub.publish(&ch, None, json!(payload), true).await);
    }
    let (got, _fast) = reader.await.unwrap();
    assert_eq!(got, ids, "the fast reader got every message, in order");
    // The stuck one fell behind; it is left to history, not closed.
    assert_eq!(hub.metric(SSE).await, 2.0);
    assert_eq!(
        hub.metric(r#"hub_connections_closed_total{transport="sse",reason="slow"}"#)
            .await,
        0.0
    );
    assert_eq!(
        hub.metric(r#"hub_messages_dropped_total{reason="slow"}"#)
            .await,
        0.0
    );
}

#[tokio::test]
async fn a_stream_that_accepts_no_writes_is_swept_as_stale() {
    let hub = Hub::start(&[
        ("HUB_OUTBOX_LEN", "65536"),
        ("HUB_HEARTBEAT_SECS", "1"),
        ("HUB_STALE_AFTER_SECS", "3"),
        ("HUB_SWEEP_SECS", "1"),
    ])
    .await;
    let ch = prefix("stale");
    let (mut reading, _) = hub.connect(&format!("channel={ch}"), &[]).await;
    let _stuck = non_reader(&hub, &ch).await;
    hub.wait_metric(SSE, 2.0, WAIT).await;
    let payload = "z".repeat(60_000);
    let reader = tokio::spawn(async move {
        for _ in 0..150 {
            reading
                .next_message(WAIT)
                .await
                .expect("reader's stream ended");
        }
        reading
    });
    for _ in 0..150 {
        hub.publish(&ch, None, json!(payload), true).await;
    }
    let mut reading = reader.await.unwrap();
    // The stuck one's buffers are full, so it accepts nothing and is swept within
    // stale-after + one sweep.
    hub.wait_metric("hub_stale_closed_total", 1.0, Duration::from_secs(10))
        .await;
    assert_eq!(
        hub.metric(r#"hub_connections_closed_total{transport="sse",reason="stale"}"#)
            .await,
        1.0
    );
    // The reading stream is written every heartbeat and stays open.
    assert_eq!(hub.metric(SSE).await, 1.0);
    hub.publish(&ch, None, json!("after"), true).await;
    assert_eq!(reading.next_message(WAIT).await.unwrap().data, "after");
}

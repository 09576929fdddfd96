//! Bad input gets a clear JSON error and never disturbs other clients: invalid channels, too
//! many or no channels, malformed and oversize publish bodies, wrong keys, unknown paths and
//! methods, and bytes that are not HTTP at all.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use hub_tests::{prefix, Hub, WAIT};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn error_of(hub: &Hub, query: &str) -> (u16, Value) {
    let mut s = hub.sse(query, &[]).await;
    let status = s.status;
    let body = s.error_body().await;
    (
        status,
        serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON: {body:?}")),
    )
}

#[tokio::test]
async fn stream_requests_with_bad_channels_are_400() {
    let hub = Hub::start(&[("HUB_MAX_CHANNELS_PER_CONN", "3")]).await;
    let too_long = "a".repeat(129);
    for q in [
        "".to_string(),
        "channel=".to_string(),
        "channel=bad%20name".to_string(),
        "channel=_leading".to_string(),
        "channel=a%0Ab".to_string(),
        "channel=star*".to_string(),
        format!("channel={too_long}"),
        "channel=public:a&channel=public:b&channel=public:c&channel=public:d".to_string(),
        "channel=public:a&envelope=perhaps".to_string(),
        // A bad name is refused before the missing token is looked at.
        "channel=room:1&channel=bad%20name".to_string(),
    ] {
        let (status, body) = error_of(&hub, &q).await;
        assert_eq!(status, 400, "query {q:?}: {body}");
        assert_eq!(body["error"], "bad_request", "{q:?}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    assert_eq!(
        hub.metric(r#"hub_connections_rejected_total{reason="bad_request"}"#)
            .await,
        10.0
    );
    // Duplicates count once: three distinct channels are fine.
    let (_s, _) = hub
        .connect(
            "channel=public:a&channel=public:b&channel=public:c&channel=public:a",
            &[],
        )
        .await;
}

#[tokio::test]
async fn protected_channels_without_a_key_are_401() {
    let hub = Hub::start(&[]).await;
    let (status, body) = error_of(&hub, "channel=public:ok&channel=room:7").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("unauthorized"))
    );
    let (status, _) = error_of(&hub, "channel=user:42&token=abc").await;
    assert_eq!(status, 401);
    assert!(!hub.log().contains("abc"), "tokens never appear in logs");
    assert_eq!(
        hub.metric(r#"hub_connections_rejected_total{reason="unauthorized"}"#)
            .await,
        2.0
    );
}

#[tokio::test]
async fn unknown_paths_and_methods_answer_json() {
    let hub = Hub::start(&[]).await;
    for (url, method, status) in [
        (hub.url("/nope"), "GET", 404),
        (hub.url("/metrics"), "GET", 404),
        (hub.url("/v1/publish"), "POST", 404),
        (hub.url("/v1/stats"), "GET", 404),
        (hub.url("/v1/sse"), "POST", 405),
        (hub.url("/healthz"), "DELETE", 405),
        (hub.admin_url("/v1/publish"), "GET", 405),
        (hub.admin_url("/v1/sse"), "GET", 404),
        (hub.admin_url("/x"), "PUT", 404),
    ] {
        let res = hub
            .http
            .request(method.parse().unwrap(), &url)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), status, "{method} {url}");
        let body: Value = res.json().await.unwrap();
        assert!(
            body["error"].is_string() && body["message"].is_string(),
            "{body}"
        );
    }
}

async fn post(hub: &Hub, body: impl Into<reqwest::Body>, key: Option<&str>) -> (u16, Value) {
    let mut req = hub.http.post(hub.admin_url("/v1/publish")).body(body);
    if let Some(k) = key {
        req = req.header("Authorization", format!("Bearer {k}"));
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn malformed_and_oversize_publishes_are_refused_and_counted() {
    let hub = Hub::start(&[("HUB_MAX_MESSAGE_BYTES", "1000")]).await;
    let ch = prefix("badpub");
    let (mut s, _) = hub.connect(&format!("channel={ch}"), &[]).await;
    for bad in [
        "".to_string(),
        "{".to_string(),
        "[]".to_string(),
        json!({"channel": ch}).to_string(),
        json!({"data": 1}).to_string(),
        json!({"channel": "bad name", "data": 1}).to_string(),
        json!({"channel": ch, "data": 1, "event": "hub.connected"}).to_string(),
        json!({"channel": ch, "data": 1, "event": "a\nb"}).to_string(),
        json!({"channel": ch, "data": 1, "durable": "yes"}).to_string(),
    ] {
        let (status, body) = post(&hub, bad.clone(), None).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["error"], "bad_request");
    }
    let big = json!({"channel": ch, "data": "x".repeat(1000)}).to_string();
    let (status, body) = post(&hub, big, None).await;
    assert_eq!((status, body["error"].as_str()), (413, Some("too_large")));
    // A body far over the limit is refused without being read whole.
    let (status, _) = post(&hub, vec![b'x'; 4 << 20], None).await;
    assert_eq!(status, 413);
    assert_eq!(
        hub.metric(r#"hub_messages_dropped_total{reason="malformed"}"#)
            .await,
        9.0
    );
    assert_eq!(
        hub.metric(r#"hub_messages_dropped_total{reason="too_large"}"#)
            .await,
        2.0
    );
    // None of it reached the stream; the next good one does.
    let id = hub.publish(&ch, None, json!("good"), true).await;
    let m = s.next_message(WAIT).await.unwrap();
    assert_eq!(
        (m.id.as_deref(), m.data.as_str()),
        (Some(id.as_str()), "good")
    );
}

#[tokio::test]
async fn publish_key_is_required_when_set() {
    let hub = Hub::start(&[("HUB_PUBLISH_KEY", "s3cret")]).await;
    let body = json!({"channel": prefix("key"), "data": 1}).to_string();
    assert_eq!(post(&hub, body.clone(), None).await.0, 401);
    assert_eq!(post(&hub, body.clone(), Some("wrong")).await.0, 401);
    assert_eq!(post(&hub, body.clone(), Some("s3cret2")).await.0, 401);
    let (status, v) = post(&hub, body, Some("s3cret")).await;
    assert_eq!(status, 202);
    assert!(v["id"].is_string());
}

#[tokio::test]
async fn junk_bytes_do_not_hurt_the_node() {
    let hub = Hub::start(&[]).await;
    let ch = prefix("junk");
    let (mut s, _) = hub.connect(&format!("channel={ch}"), &[]).await;
    for junk in [
        &b"\x00\x01\x02garbage\r\n\r\n"[..],
        b"GET /v1/sse?channel=public:x HTTP/9.9\r\n\r\n",
        b"GET /v1/sse?channel=public:x HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n",
        &[b'A'; 100_000][..],
    ] {
        for addr in [hub.public, hub.admin] {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            let _ = c.write_all(junk).await;
            let _ = c.shutdown().await;
            let mut sink = Vec::new();
            let _ = tokio::time::timeout(WAIT, c.read_to_end(&mut sink)).await;
        }
    }
    assert_eq!(
        hub.http
            .get(hub.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    hub.publish(&ch, None, json!("still here"), true).await;
    assert_eq!(s.next_message(WAIT).await.unwrap().data, "still here");
}

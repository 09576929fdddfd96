//! Idempotent publishing: a durable publish with a key (`Idempotency-Key` on `POST /v1/publish`,
//! the 4th argument of `FCALL hub_publish`) already used on that channel within
//! `HUB_IDEMPOTENCY_SECS` returns the first id and publishes nothing, even when the retries race;
//! keys are per channel, expire, and bad ones are refused. Embedded broker and Redis alike.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use hub_tests::{prefix, wait_until, Hub, Redis, SseStream, WAIT};
use protocol::{publish, Envelope};
use serde_json::{json, Value};
use std::time::Duration;

/// `POST /v1/publish` with an `Idempotency-Key`: (status, body).
async fn post(hub: &Hub, channel: &str, data: &str, key: &str, durable: bool) -> (u16, Value) {
    let res = hub
        .http
        .post(hub.admin_url("/v1/publish"))
        .header("Idempotency-Key", key)
        .json(&json!({"channel": channel, "data": data, "durable": durable}))
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

async fn id_of(hub: &Hub, channel: &str, data: &str, key: &str) -> String {
    let (status, body) = post(hub, channel, data, key, true).await;
    assert_eq!(status, 202, "{body}");
    body["id"].as_str().unwrap().to_string()
}

/// The data of every message the stream gets until `last` arrives.
async fn until(s: &mut SseStream, last: &str) -> Vec<String> {
    let mut out = Vec::new();
    loop {
        let m = s.next_message(WAIT).await.expect("stream open");
        out.push(m.data.clone());
        if m.data == last {
            return out;
        }
    }
}

async fn over_http(env: &[(&str, &str)]) {
    let mut env = env.to_vec();
    env.push(("HUB_IDEMPOTENCY_SECS", "2"));
    let hub = Hub::start(&env).await;
    hub.wait_ready(WAIT).await;
    let ch = prefix("idem");
    let other = format!("{ch}.other");
    let (mut s, _) = hub.connect(&format!("channel={ch}"), &[]).await;

    let first = id_of(&hub, &ch, "one", "order-42").await;
    // A retry, with the same or even another body: the first id, nothing published.
    assert_eq!(id_of(&hub, &ch, "one", "order-42").await, first);
    assert_eq!(id_of(&hub, &ch, "one again", "order-42").await, first);
    // Keys are per channel.
    let elsewhere = id_of(&hub, &other, "one", "order-42").await;
    assert_ne!(elsewhere, first);
    // Retries that race: one publish, one id.
    let racing: Vec<String> =
        futures_util::future::join_all((0..20).map(|_| id_of(&hub, &ch, "two", "order-43"))).await;
    assert!(racing.iter().all(|id| id == &racing[0]), "{racing:?}");
    hub.publish(&ch, None, json!("end"), true).await;
    assert_eq!(until(&mut s, "end").await, ["one", "two", "end"]);
    // History holds each once.
    let (mut r, _) = hub.connect(&format!("channel={ch}&rewind=10"), &[]).await;
    assert_eq!(until(&mut r, "end").await, ["one", "two", "end"]);

    // Bad keys, and keys on ephemeral messages: 400, nothing published.
    for bad in [String::new(), "k".repeat(129), "tab\there".to_string()] {
        let (status, body) = post(&hub, &ch, "bad", &bad, true).await;
        assert_eq!(status, 400, "{bad:?}: {body}");
    }
    let (status, body) = post(&hub, &ch, "bad", "eph-1", false).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("durable"),
        "{body}"
    );

    // After HUB_IDEMPOTENCY_SECS the key is free again.
    wait_until("the key expires", Duration::from_secs(10), || async {
        id_of(&hub, &ch, "three", "order-42").await != first
    })
    .await;
    hub.publish(&ch, None, json!("end2"), true).await;
    assert_eq!(until(&mut s, "end2").await, ["three", "end2"]);
}

#[tokio::test]
async fn idempotent_http_publish_with_the_embedded_broker() {
    over_http(&[]).await;
}

#[tokio::test]
async fn idempotent_http_publish_with_redis() {
    let redis = Redis::start();
    let url = redis.url();
    over_http(&[("HUB_REDIS_URL", url.as_str())]).await;
}

#[tokio::test]
async fn the_function_takes_a_key_and_keeps_it_for_the_window() {
    let redis = Redis::start();
    let url = redis.url();
    let hub = Hub::start(&[("HUB_REDIS_URL", url.as_str())]).await;
    hub.wait_ready(WAIT).await;
    let ch = prefix("fcall");
    let (mut s, _) = hub.connect(&format!("channel={ch}"), &[]).await;
    let env = |d: &str| Envelope {
        event: None,
        data: json!(d),
    };
    let mut conn = redis.conn().await;
    let a = publish::publish_durable_once(&mut conn, &ch, &env("a"), "k-1")
        .await
        .unwrap();
    let again = publish::publish_durable_once(&mut conn, &ch, &env("a"), "k-1")
        .await
        .unwrap();
    assert_eq!(a, again);
    // The same through redis-cli, as any language would call it.
    let cli = redis.cli(&["FCALL", "hub_publish", "1", &ch, r#"{"data":"a"}"#, "k-1"]);
    assert_eq!(cli.trim(), a);
    // The key lives as long as the window (default 300 s), in the channel's slot.
    let ttl: i64 = redis
        .cli(&["PTTL", &format!("hub:idem:{{{ch}}}:k-1")])
        .trim()
        .parse()
        .unwrap();
    assert!((290_000..=300_000).contains(&ttl), "PTTL {ttl}");
    let bad = redis.cli(&["FCALL", "hub_publish", "1", &ch, r#"{"data":"x"}"#, ""]);
    assert!(bad.contains("idempotency key"), "{bad}");
    assert!(publish::publish_durable_once(&mut conn, &ch, &env("x"), "")
        .await
        .is_err());
    // Without a key, every call publishes, as before.
    let b = publish::publish_durable(&mut conn, &ch, &env("b"))
        .await
        .unwrap();
    assert_ne!(a, b);
    assert_eq!(until(&mut s, "b").await, ["a", "b"]);
}

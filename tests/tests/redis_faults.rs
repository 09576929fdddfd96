//! Redis faults while durable messages are being published: the pub/sub connection killed,
//! Redis restarted, Redis frozen. Connected streams stay open and end with every acknowledged
//! message exactly once, in order; readiness goes down and comes back.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use hub_tests::{prefix, Hub, Redis, SseStream, WAIT};
use protocol::{publish, Envelope};
use serde_json::json;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

async fn redis_hub(redis: &Redis) -> Hub {
    let url = redis.url();
    let hub = Hub::start(&[
        ("HUB_REDIS_URL", url.as_str()),
        ("HUB_HEARTBEAT_SECS", "1"),
        ("HUB_STALE_AFTER_SECS", "30"),
    ])
    .await;
    hub.wait_ready(WAIT).await;
    hub
}

/// What a publisher that retries through faults got acknowledged, in order. Every attempt has
/// its own payload, so an attempt whose answer was lost can show up at most once and never
/// as a duplicate of an acknowledged one.
struct Published {
    acked: Vec<String>,
    attempts: HashSet<String>,
}

/// Publishes `n` durable messages one after another, reconnecting and retrying on errors.
fn spawn_publisher(
    url: String,
    ch: String,
    n: usize,
    pause: Duration,
) -> tokio::task::JoinHandle<Published> {
    tokio::spawn(async move {
        let client = redis::Client::open(url).unwrap();
        let mut conn = None;
        let mut out = Published {
            acked: Vec::new(),
            attempts: HashSet::new(),
        };
        let mut attempt = 0;
        for i in 0..n {
            loop {
                attempt += 1;
                let data = format!("m{i}.a{attempt}");
                out.attempts.insert(data.clone());
                if conn.is_none() {
                    conn = client.get_multiplexed_async_connection().await.ok();
                }
                let res = match conn.as_mut() {
                    Some(c) => {
                        let env = Envelope {
                            event: None,
                            data: json!(data),
                        };
                        tokio::time::timeout(
                            Duration::from_secs(2),
                            publish::publish_durable(c, &ch, &env),
                        )
                        .await
                    }
                    None => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                match res {
                    Ok(Ok(_id)) => {
                        out.acked.push(data);
                        break;
                    }
                    _ => {
                        conn = None;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            tokio::time::sleep(pause).await;
        }
        out
    })
}

/// Reads the stream until every acknowledged message arrived; checks order and uniqueness.
async fn check_exactly_once(s: &mut SseStream, published: &Published) {
    let want: HashSet<&String> = published.acked.iter().collect();
    let mut seen_acked = Vec::new();
    let mut seen_all = HashSet::new();
    while seen_acked.len() < published.acked.len() {
        let m = s
            .next_message(Duration::from_secs(20))
            .await
            .expect("stream ended");
        assert_ne!(m.event, "hub.connected", "the stream was reopened");
        assert_ne!(m.event, "hub.reset", "nothing was lost, no reset expected");
        assert!(
            published.attempts.contains(&m.data),
            "unknown message {:?}",
            m.data
        );
        assert!(
            seen_all.insert(m.data.clone()),
            "{} delivered twice",
            m.data
        );
        if want.contains(&m.data) {
            seen_acked.push(m.data);
        }
    }
    assert_eq!(
        seen_acked, published.acked,
        "every acknowledged message, in publish order"
    );
}

#[tokio::test]
async fn killing_the_pubsub_connection_loses_nothing() {
    let redis = Redis::start();
    let hub = redis_hub(&redis).await;
    let ch = prefix("kill");
    let (mut s, _) = hub.connect(&format!("channel={ch}"), &[]).await;
    let publisher = spawn_publisher(redis.url(), ch.clone(), 300, Duration::from_millis(5));
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let killed = redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
        assert_ne!(killed, "0", "a pub/sub connection was killed");
    }
    let published = publisher.await.unwrap();
    check_exactly_once(&mut s, &published).await;
    assert!(hub.metric("hub_redis_reconnects_total").await >= 3.0);
    // Messages published while the subscriber reconnected came from history.
    assert!(
        hub.metric("hub_history_replayed_total").await > 0.0,
        "the backfill ran"
    );
    hub.wait_ready(WAIT).await;
    assert_eq!(hub.metric("hub_redis_up").await, 1.0);
}

#[tokio::test]
async fn a_full_redis_restart_loses_nothing_and_readiness_follows() {
    let redis = Arc::new(Mutex::new(Redis::start()));
    let url = redis.lock().await.url();
    let hub = redis_hub(&*redis.lock().await).await;
    let ch = prefix("restart");
    let (mut s, _) = hub.connect(&format!("channel={ch}"), &[]).await;
    let publisher = spawn_publisher(url, ch.clone(), 200, Duration::from_millis(10));
    tokio::time::sleep(Duration::from_millis(500)).await;
    {
        let mut r = redis.lock().await;
        r.stop();
        // While Redis is away the node is not ready, and says so in its metrics.
        hub_tests::wait_until("readyz 503 while Redis is down", WAIT, || async {
            !hub.is_ready().await
        })
        .await;
        assert_eq!(hub.metric("hub_redis_up").await, 0.0);
        r.restart();
    }
    hub.wait_ready(Duration::from_secs(20)).await;
    let published = publisher.await.unwrap();
    assert!(
        published.attempts.len() > published.acked.len(),
        "the restart hit the publisher mid-way"
    );
    check_exactly_once(&mut s, &published).await;
    assert!(hub.metric("hub_redis_reconnects_total").await >= 1.0);
    assert_eq!(
        hub.metric(r#"hub_connections{transport="sse"}"#).await,
        1.0,
        "the stream stayed open"
    );
}

#[tokio::test]
async fn a_frozen_redis_is_noticed_through_pubsub_and_recovered() {
    let redis = Redis::start();
    let hub = redis_hub(&redis).await;
    let ch = prefix("frozen");
    let (mut s, _) = hub.connect(&format!("channel={ch}"), &[]).await;
    let pid = redis.pid().unwrap();
    // SIGSTOP keeps every connection open but nothing answers: only the self-ping notices.
    hub_tests::signal(pid, "STOP");
    hub_tests::wait_until(
        "readyz 503 while Redis is frozen",
        Duration::from_secs(12),
        || async { !hub.is_ready().await },
    )
    .await;
    hub_tests::signal(pid, "CONT");
    hub.wait_ready(Duration::from_secs(20)).await;
    let mut conn = redis.conn().await;
    let env = Envelope {
        event: None,
        data: json!("after the freeze"),
    };
    publish::publish_durable(&mut conn, &ch, &env)
        .await
        .unwrap();
    let m = s.next_message(WAIT).await.unwrap();
    assert_eq!(m.data, "after the freeze");
}

#[tokio::test]
async fn a_node_starts_without_redis_and_becomes_ready_when_it_answers() {
    let mut redis = Redis::start();
    redis.stop();
    let url = redis.url();
    let hub = Hub::start(&[("HUB_REDIS_URL", url.as_str())]).await;
    // Alive, not ready, refusing streams (with Retry-After), and saying why in its log.
    let health = hub.http.get(hub.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    assert!(!hub.is_ready().await);
    let ch = prefix("late");
    let mut refused = hub.sse(&format!("channel={ch}"), &[]).await;
    assert_eq!(refused.status, 503);
    assert!(refused.header("retry-after").is_some());
    let body: serde_json::Value = serde_json::from_str(&refused.error_body().await).unwrap();
    assert_eq!(body["error"], "broker_unavailable");
    assert_eq!(
        hub.metric(r#"hub_connections_rejected_total{reason="unavailable"}"#)
            .await,
        1.0
    );
    // Redis comes: the node loads its functions, subscribes, and turns ready by itself.
    redis.restart();
    hub.wait_ready(Duration::from_secs(15)).await;
    let (mut s, _) = hub.connect(&format!("channel={ch}"), &[]).await;
    let id = hub.publish(&ch, None, json!("hello"), true).await;
    let m = s.next_message(WAIT).await.unwrap();
    assert_eq!(
        (m.id.as_deref(), m.data.as_str()),
        (Some(id.as_str()), "hello")
    );
    assert_eq!(
        hub.metric("hub_redis_reconnects_total").await,
        0.0,
        "the first connection is not a reconnection"
    );
}

#[tokio::test]
async fn a_channel_whose_history_cannot_be_read_is_reset_without_holding_up_others() {
    let redis = Redis::start();
    let hub = redis_hub(&redis).await;
    let p = prefix("unreadable");
    let (bad, good) = (format!("{p}.bad"), format!("{p}.good"));
    let mut conn = redis.conn().await;
    let mut first = Vec::new();
    for ch in [&bad, &good] {
        let env = |d: &str| Envelope {
            event: None,
            data: json!(d),
        };
        first.push(
            publish::publish_durable(&mut conn, ch, &env("one"))
                .await
                .unwrap(),
        );
        publish::publish_durable(&mut conn, ch, &env("two"))
            .await
            .unwrap();
    }
    // Someone overwrites one channel's history with a key of another type.
    redis.cli(&["DEL", &format!("hub:hist:{{{bad}}}")]);
    redis.cli(&["SET", &format!("hub:hist:{{{bad}}}"), "not a stream"]);
    let (mut b, _) = hub
        .connect(
            &format!("channel={bad}"),
            &[("Last-Event-ID", first[0].as_str())],
        )
        .await;
    let (mut g, _) = hub
        .connect(
            &format!("channel={good}"),
            &[("Last-Event-ID", first[1].as_str())],
        )
        .await;
    // The good channel's reader is served at once; the bad one's gets hub.reset, then live.
    assert_eq!(g.next_message(WAIT).await.unwrap().data, "two");
    let ev = b.next_message(WAIT).await.unwrap();
    assert_eq!(ev.event, "hub.reset", "{ev:?}");
    redis.cli(&[
        "PUBLISH",
        &format!("hub:ch:{bad}"),
        r#"{"data":"still live"}"#,
    ]);
    assert_eq!(b.next_message(WAIT).await.unwrap().data, "still live");
    assert_eq!(hub.metric("hub_history_unreadable_total").await, 1.0);
}

//! Webhooks (`HUB_WEBHOOK_URL`) against a receiver this test runs: `channel_occupied`,
//! `member_added`, `member_removed` and `channel_vacated` once per change over every node, in
//! order per channel, signed, in batches of at most 100, sent again with the same ids after a
//! 500, held back a heartbeat (at the default heartbeat too), not sent for a namespace with
//! `webhooks = false`, bounded, and sent by another node when the sending node dies.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use hmac::{Hmac, Mac};
use hub_tests::client::{token, SECRET};
use hub_tests::receiver::{Receiver, Request};
use hub_tests::{prefix, signal, wait_until, Hub, Redis, SseStream, WAIT};
use serde_json::Value;
use std::collections::HashSet;
use std::time::{Duration, Instant};

const KEY: &str = "webhook-secret";

/// Every event of the requests answered 2xx, in the order sent, each id once; checks every
/// request on the way (signature, content type, at most 100 events, unique ids in a batch).
fn delivered(r: &Receiver) -> Vec<Value> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for req in r.requests() {
        assert_eq!(
            req.header("content-type").as_deref(),
            Some("application/json")
        );
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(KEY.as_bytes()).unwrap();
        mac.update(&req.body);
        let want: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            req.header("x-hub-signature"),
            Some(format!("sha256={want}")),
            "signature"
        );
        let v: Value = serde_json::from_slice(&req.body).unwrap();
        let events = v["events"].as_array().unwrap();
        assert!(
            !events.is_empty() && events.len() <= 100,
            "{}",
            events.len()
        );
        if !(200..300).contains(&req.status) {
            continue;
        }
        for e in events {
            if seen.insert(e["id"].as_str().unwrap().to_string()) {
                out.push(e.clone());
            }
        }
    }
    out
}

/// `type` of the events of `channel`, with `:sub` for member events, in order.
fn of(events: &[Value], channel: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["channel"] == channel)
        .map(|e| match e["sub"].as_str() {
            Some(s) => format!("{}:{s}", e["type"].as_str().unwrap()),
            None => e["type"].as_str().unwrap().to_string(),
        })
        .collect()
}

async fn stream(hub: &Hub, ch: &str, sub: Option<&str>) -> SseStream {
    let q = match sub {
        Some(s) => format!("channel={ch}&token={}", token(s, &["*"], 3600)),
        None => format!("channel={ch}"),
    };
    hub.connect(&q, &[]).await.0
}

async fn wait_for(r: &Receiver, what: &str, timeout: Duration, cond: impl Fn(&[Value]) -> bool) {
    wait_until(what, timeout, || {
        let ok = cond(&delivered(r));
        async move { ok }
    })
    .await;
}

fn config_file(text: &str) -> String {
    let dir = std::env::temp_dir().join(format!("hub-wh-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("hub.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// Two ready nodes on `redis` sending webhooks to `r` (heartbeat 2 s).
async fn two_nodes(redis: &Redis, r: &Receiver) -> [Hub; 2] {
    let url = redis.url();
    let env = [
        ("HUB_REDIS_URL", url.as_str()),
        ("HUB_WEBHOOK_URL", r.url.as_str()),
        ("HUB_WEBHOOK_SECRET", KEY),
        ("HUB_JWT_SECRET", SECRET),
        ("HUB_HEARTBEAT_SECS", "2"),
    ];
    let hubs = [Hub::start(&env).await, Hub::start(&env).await];
    for h in &hubs {
        h.wait_ready(WAIT).await;
    }
    hubs
}

/// Embedded broker, default heartbeat (30 s): the events of a channel in order, a reconnect
/// within the heartbeat makes none, the leave and the vacancy come one heartbeat after the
/// last stream closed, and a namespace with `webhooks = false` sends nothing.
#[tokio::test]
async fn embedded_events_in_order_signed_and_held_back_a_heartbeat_at_the_default() {
    let r = Receiver::start(200).await;
    let path = config_file("[[namespace]]\nprefix = \"quiet:\"\nwebhooks = false\n");
    let hub = Hub::start(&[
        ("HUB_WEBHOOK_URL", &r.url),
        ("HUB_WEBHOOK_SECRET", KEY),
        ("HUB_JWT_SECRET", SECRET),
        ("HUB_CONFIG", &path),
    ])
    .await;
    let alice = stream(&hub, "room:1", Some("alice")).await;
    let anon = stream(&hub, "public:news", None).await;
    let quiet = stream(&hub, "quiet:1", Some("alice")).await;
    wait_for(&r, "occupied and added", WAIT, |e| {
        of(e, "room:1") == ["channel_occupied", "member_added:alice"]
            && of(e, "public:news") == ["channel_occupied"]
    })
    .await;
    let e = delivered(&r);
    let first = &e[0];
    assert!(first["id"].as_str().is_some_and(|s| !s.is_empty()));
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let t = first["time_ms"].as_u64().unwrap();
    assert!(t <= now_ms && now_ms - t < 60_000, "{t} vs {now_ms}");
    // A reconnect within the heartbeat: nothing.
    drop(alice);
    tokio::time::sleep(Duration::from_millis(1500)).await; // the reconnect's delay, not a wait for a condition
    let alice = stream(&hub, "room:1", Some("alice")).await;
    let closed = Instant::now();
    drop(alice);
    drop(anon);
    drop(quiet);
    wait_for(&r, "removed and vacated", Duration::from_secs(45), |e| {
        of(e, "room:1").len() == 4 && of(e, "public:news").len() == 2
    })
    .await;
    let took = closed.elapsed();
    assert!(
        took >= Duration::from_secs(25),
        "held back a heartbeat: {took:?}"
    );
    let e = delivered(&r);
    assert_eq!(
        of(&e, "room:1"),
        [
            "channel_occupied",
            "member_added:alice",
            "member_removed:alice",
            "channel_vacated"
        ]
    );
    assert_eq!(
        of(&e, "public:news"),
        ["channel_occupied", "channel_vacated"]
    );
    assert!(of(&e, "quiet:1").is_empty(), "webhooks = false");
    assert_eq!(
        hub.metric("hub_webhook_events_total{result=\"sent\"}")
            .await,
        6.0
    );
}

/// Two nodes on one Redis: each change once over both (the channel occupied once though both
/// have streams), sent again with the same ids after 500s (counted retried), vacated once when
/// the last stream anywhere closed.
#[tokio::test]
async fn two_nodes_send_each_change_once_and_retry_with_the_same_ids() {
    let redis = Redis::start();
    let r = Receiver::start(200).await;
    r.fail_next(2);
    let p = prefix("wh2");
    let [a, b] = two_nodes(&redis, &r).await;
    let ch = format!("{p}room");
    let alice = stream(&a, &ch, Some("alice")).await;
    let bob = stream(&b, &ch, Some("bob")).await;
    let alice2 = stream(&b, &ch, Some("alice")).await;
    wait_for(&r, "occupied, alice and bob added", WAIT, |e| {
        of(e, &ch).len() == 3
    })
    .await;
    let e = of(&delivered(&r), &ch);
    assert_eq!(e[0], "channel_occupied");
    let mut added = e[1..].to_vec();
    added.sort();
    assert_eq!(added, ["member_added:alice", "member_added:bob"]);
    // The failed requests' events came again, with the same ids.
    let reqs = r.requests();
    assert!(reqs.len() >= 3 && reqs[0].status == 500 && reqs[1].status == 500);
    let ids = |body: &[u8]| -> Vec<String> {
        let v: Value = serde_json::from_slice(body).unwrap();
        v["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_string())
            .collect()
    };
    let sent_ids: HashSet<String> = reqs
        .iter()
        .filter(|q| q.status == 200)
        .flat_map(|q| ids(&q.body))
        .collect();
    assert!(ids(&reqs[0].body).iter().all(|i| sent_ids.contains(i)));
    let retried = a
        .metric("hub_webhook_events_total{result=\"retried\"}")
        .await
        + b.metric("hub_webhook_events_total{result=\"retried\"}")
            .await;
    assert!(retried >= 2.0, "{retried}");
    // One of alice's two streams closes: nothing; then all.
    drop(alice);
    drop(bob);
    wait_for(&r, "bob removed", WAIT, |e| of(e, &ch).len() == 4).await;
    drop(alice2);
    wait_for(&r, "alice removed, vacated", WAIT, |e| {
        of(e, &ch).len() == 6
    })
    .await;
    let e = of(&delivered(&r), &ch);
    assert_eq!(
        e[3..],
        [
            "member_removed:bob",
            "member_removed:alice",
            "channel_vacated"
        ]
    );
    let sent = a.metric("hub_webhook_events_total{result=\"sent\"}").await
        + b.metric("hub_webhook_events_total{result=\"sent\"}").await;
    assert_eq!(sent, 6.0);
}

/// The receiver is down and the node sending dies: the other node takes over its batch (same
/// ids) and also sends the dead node's `member_removed` once its lease runs out.
#[tokio::test]
async fn a_dead_senders_events_are_sent_by_the_other_node() {
    let redis = Redis::start();
    let r = Receiver::start(503).await;
    let p = prefix("whk");
    let mut hubs = Vec::from(two_nodes(&redis, &r).await);
    let ch = format!("{p}room");
    let _a = stream(&hubs[0], &ch, Some("alice")).await;
    let _b = stream(&hubs[1], &ch, Some("bob")).await;
    // Whichever node sends is retrying the batch.
    let mut sender = None;
    let deadline = Instant::now() + WAIT;
    while sender.is_none() && Instant::now() < deadline {
        for (i, h) in hubs.iter().enumerate() {
            if h.metric("hub_webhook_events_total{result=\"retried\"}")
                .await
                > 0.0
            {
                sender = Some(i);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let i = sender.expect("a node retries the batch");
    let failed: Vec<Request> = r.requests();
    assert!(!failed.is_empty());
    let dead_user = if i == 0 { "alice" } else { "bob" };
    signal(hubs[i].pid(), "KILL");
    hubs[i].wait_exit(WAIT).await;
    let survivor = hubs.remove(1 - i);
    r.set_status(200);
    wait_for(
        &r,
        "every event, the dead node's leave too",
        Duration::from_secs(30),
        |e| of(e, &ch).len() == 4,
    )
    .await;
    let e = of(&delivered(&r), &ch);
    assert_eq!(e[0], "channel_occupied");
    let mut added = e[1..3].to_vec();
    added.sort();
    assert_eq!(added, ["member_added:alice", "member_added:bob"]);
    assert_eq!(e[3], format!("member_removed:{dead_user}"));
    // The batch that failed went out again with the same ids, from the survivor.
    let sent: HashSet<String> = delivered(&r)
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    let first: Value = serde_json::from_slice(&failed[0].body).unwrap();
    for ev in first["events"].as_array().unwrap() {
        assert!(sent.contains(ev["id"].as_str().unwrap()));
    }
    assert!(
        survivor
            .metric("hub_webhook_events_total{result=\"sent\"}")
            .await
            >= 4.0
    );
}

/// Bounded: beyond `HUB_WEBHOOK_MAX_PENDING` the oldest events are dropped and counted (Redis
/// mode: trimmed by the presence functions), and a batch that fails for
/// `HUB_WEBHOOK_RETRY_SECS` is dropped and counted.
#[tokio::test]
async fn the_backlog_is_bounded_and_a_batch_is_given_up_after_the_retry_time() {
    let redis = Redis::start();
    let r = Receiver::start(503).await;
    let p = prefix("whb");
    let hub = Hub::start(&[
        ("HUB_REDIS_URL", &redis.url()),
        ("HUB_WEBHOOK_URL", &r.url),
        ("HUB_WEBHOOK_SECRET", KEY),
        ("HUB_WEBHOOK_MAX_PENDING", "3"),
        ("HUB_WEBHOOK_RETRY_SECS", "2"),
        ("HUB_HEARTBEAT_SECS", "2"),
    ])
    .await;
    hub.wait_ready(WAIT).await;
    let mut streams = Vec::new();
    for i in 0..8 {
        streams.push(stream(&hub, &format!("public:{p}{i}"), None).await);
    }
    let dropped = "hub_webhook_events_total{result=\"dropped\"}";
    // 8 occupied events, at most 3 kept: 5 dropped by the bound (the batch being retried
    // may be among them), the rest given up; each counted once.
    hub.wait_metric(dropped, 8.0, Duration::from_secs(20)).await;
    hub.wait_metric("hub_webhook_pending", 0.0, Duration::from_secs(5))
        .await;
    assert!(delivered(&r).is_empty());
    let retried = hub
        .metric("hub_webhook_events_total{result=\"retried\"}")
        .await;
    assert!(retried >= 1.0, "{retried}");
    // A receiver that is back gets what comes next.
    r.set_status(200);
    drop(streams);
    wait_for(&r, "vacated", Duration::from_secs(20), |e| {
        e.iter().filter(|e| e["type"] == "channel_vacated").count() >= 3
    })
    .await;
}

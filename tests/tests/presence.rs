//! Presence: `GET /v1/presence` counts users (streams per `sub`) and anonymous streams over every
//! node; streams that ask (`presence=true`, `"presence": true`) get `join` when a user's first
//! stream on the channel opens and `leave` when its last closes, anywhere; a user who reconnects
//! within a heartbeat makes neither; a node killed with SIGKILL stops counting within two
//! heartbeats and the survivors send its users' `leave`s; a Redis that restarts empty gets the
//! counts again.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use hub_tests::client::{next, send, token, try_ws, Ws, SECRET};
use hub_tests::{prefix, wait_until, Hub, Redis, SseStream, WAIT};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// The next hub.join / hub.leave / message of a stream, as "join:<sub>", "leave:<sub>" or the data.
async fn event(s: &mut SseStream) -> String {
    let e = s.next_message(WAIT).await.expect("stream open");
    match e.event.as_str() {
        "hub.join" | "hub.leave" => {
            let v = e.json();
            format!("{}:{}", &e.event[4..], v["sub"].as_str().unwrap())
        }
        "hub.presence" => {
            let v = e.json();
            let users: Vec<&str> = v["users"]
                .as_array()
                .unwrap()
                .iter()
                .map(|u| u.as_str().unwrap())
                .collect();
            format!("present:{}", users.join(","))
        }
        _ => e.data,
    }
}

/// A watcher's first events on a channel nobody else is on: the list, then its own join, or
/// the list with it if its join was reported before the list was taken.
async fn starts_alone(watcher: &mut SseStream) {
    match event(watcher).await.as_str() {
        "present:watcher" => {}
        "present:" => assert_eq!(event(watcher).await, "join:watcher"),
        other => panic!("{other}"),
    }
}

/// An SSE stream of `sub` on `ch` with `presence=true`, opened.
async fn watch(hub: &Hub, ch: &str, sub: &str) -> SseStream {
    let q = format!("{}&presence=true", with_token(ch, sub));
    hub.connect(&q, &[]).await.0
}

/// A WebSocket of `sub` subscribed to `ch` with `"presence": true`, past its `subscribed`.
async fn ws_watch(hub: &Hub, ch: &str, sub: &str) -> Ws {
    let q = format!("?token={}", token(sub, &["*"], 3600));
    let mut ws = try_ws(hub.public, &q, &[]).await.unwrap();
    send(
        &mut ws,
        json!({"op": "subscribe", "channel": ch, "presence": true}),
    )
    .await;
    assert_eq!(next(&mut ws).await["type"], "subscribed");
    ws
}

/// Follows a watcher's presence from its start (the list comes first) until it is `want`.
async fn follow(watcher: &mut SseStream, want: &[&str]) {
    let first = watcher.next_message(WAIT).await.expect("stream open");
    assert_eq!(first.event, "hub.presence", "the list comes first");
    let mut list = first.json()["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap().to_string())
        .collect();
    watcher.follow_presence(&mut list, want).await;
}

/// A node on `url` named `name` with a 2 s heartbeat (and `extra` settings), ready.
async fn node(url: &str, name: &str, extra: &[(&str, &str)]) -> Hub {
    let mut env = vec![
        ("HUB_REDIS_URL", url),
        ("HUB_NODE_ID", name),
        ("HUB_JWT_SECRET", SECRET),
        ("HUB_HEARTBEAT_SECS", "2"),
    ];
    env.extend_from_slice(extra);
    let hub = Hub::start(&env).await;
    hub.wait_ready(WAIT).await;
    hub
}

/// Waits until the admin endpoint shows `want` as the channel's users and anonymous count.
async fn wait_presence(hub: &Hub, ch: &str, users: Value, anonymous: u64) {
    let ch2 = ch.to_string();
    wait_until(
        &format!("presence of {ch} = {users} + {anonymous}"),
        WAIT,
        || {
            let (users, ch2) = (users.clone(), ch2.clone());
            async move {
                let p = hub.presence(&ch2).await;
                p["users"] == users && p["anonymous"] == anonymous
            }
        },
    )
    .await;
}

fn with_token(ch: &str, sub: &str) -> String {
    format!("channel={ch}&token={}", token(sub, &["*"], 3600))
}

#[tokio::test]
async fn one_node_counts_users_and_tells_joins_and_leaves() {
    let hub = Hub::start(&[
        ("HUB_JWT_SECRET", SECRET),
        ("HUB_HEARTBEAT_SECS", "2"),
        ("HUB_STALE_AFTER_SECS", "30"),
    ])
    .await;
    let ch = format!("public:{}", prefix("presence"));
    let mut watcher = watch(&hub, &ch, "watcher").await;
    starts_alone(&mut watcher).await;
    let mut ws = ws_watch(&hub, &ch, "w2").await;
    let present = next(&mut ws).await;
    assert_eq!(
        present,
        json!({"type": "presence", "channel": ch, "users": ["watcher"]})
    );
    assert_eq!(event(&mut watcher).await, "join:w2");

    let (a, _) = hub.connect(&with_token(&ch, "u1"), &[]).await;
    assert_eq!(event(&mut watcher).await, "join:u1");
    let mut frames = Vec::new();
    while frames.len() < 2 {
        let f = next(&mut ws).await;
        frames.push(format!(
            "{}:{}",
            f["type"].as_str().unwrap(),
            f["sub"].as_str().unwrap()
        ));
    }
    assert_eq!(frames, ["join:w2", "join:u1"]);
    let (b, _) = hub.connect(&with_token(&ch, "u1"), &[]).await;
    let (_anon, _) = hub.connect(&format!("channel={ch}"), &[]).await;
    wait_presence(&hub, &ch, json!({"watcher": 1, "w2": 1, "u1": 2}), 1).await;
    assert_eq!(hub.metric("hub_presence_users").await, 3.0);
    assert_eq!(hub.metric("hub_presence_anonymous").await, 1.0);

    // One of two streams closes: a count, no event. The last closes and the user comes back at
    // once (a reconnect): no leave, no join.
    drop(a);
    wait_presence(&hub, &ch, json!({"watcher": 1, "w2": 1, "u1": 1}), 1).await;
    drop(b);
    let (back, _) = hub.connect(&with_token(&ch, "u1"), &[]).await;
    // More than the grace (one heartbeat) later, still nothing: the next event is a message.
    let t = Instant::now();
    wait_until("the grace has passed", WAIT, || async {
        t.elapsed() > Duration::from_secs(3)
    })
    .await;
    hub.publish(&ch, None, json!("still one"), false).await;
    assert_eq!(event(&mut watcher).await, "still one");
    // Gone for good: leave, after the grace.
    drop(back);
    assert_eq!(event(&mut watcher).await, "leave:u1");
    wait_presence(&hub, &ch, json!({"watcher": 1, "w2": 1}), 1).await;
    let f = next(&mut ws).await;
    assert_eq!(
        (f["type"].as_str(), f["sub"].as_str()),
        (Some("message"), None),
        "{f}"
    );
    let f = next(&mut ws).await;
    assert_eq!(
        (f["type"].as_str(), f["sub"].as_str()),
        (Some("leave"), Some("u1")),
        "{f}"
    );

    // Bad requests.
    for q in ["", "?channel=a%20b"] {
        let r = hub
            .http
            .get(hub.admin_url(&format!("/v1/presence{q}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{q}");
    }
    assert_eq!(
        hub.sse(&format!("channel={ch}&presence=maybe"), &[])
            .await
            .status,
        400
    );
}

#[tokio::test]
async fn a_killed_node_stops_counting_within_two_heartbeats() {
    let redis = Redis::start();
    let url = redis.url();
    let start = |name: &'static str| {
        let url = url.clone();
        async move {
            let hub = Hub::start(&[
                ("HUB_REDIS_URL", url.as_str()),
                ("HUB_NODE_ID", name),
                ("HUB_JWT_SECRET", SECRET),
                ("HUB_HEARTBEAT_SECS", "3"),
                ("HUB_STALE_AFTER_SECS", "20"),
            ])
            .await;
            hub.wait_ready(WAIT).await;
            hub
        }
    };
    let a = start("node-a").await;
    let mut b = start("node-b").await;
    let ch = format!("public:{}", prefix("killed"));
    let mut watcher = watch(&a, &ch, "watcher").await;
    starts_alone(&mut watcher).await;
    // Users on the other node: their joins come through Redis.
    let (_u1, _) = b.connect(&with_token(&ch, "u1"), &[]).await;
    let (_u2, _) = b.connect(&with_token(&ch, "u2"), &[]).await;
    let (_anon, _) = b.connect(&format!("channel={ch}"), &[]).await;
    let mut joins = vec![event(&mut watcher).await, event(&mut watcher).await];
    joins.sort();
    assert_eq!(joins, ["join:u1", "join:u2"]);
    // u2 is also on node a: it must stay when b dies.
    let (_u2a, _) = a.connect(&with_token(&ch, "u2"), &[]).await;
    wait_presence(&a, &ch, json!({"watcher": 1, "u1": 1, "u2": 2}), 1).await;
    wait_presence(&b, &ch, json!({"watcher": 1, "u1": 1, "u2": 2}), 1).await;

    // SIGKILL: b closes nothing. Within two heartbeats (6 s) a stops counting b's streams and
    // tells u1's leave (u2 is still on a).
    hub_tests::signal(b.pid(), "KILL");
    let killed = Instant::now();
    b.wait_exit(WAIT).await;
    assert_eq!(event(&mut watcher).await, "leave:u1");
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(6), "leave after {took:?}");
    wait_presence(&a, &ch, json!({"watcher": 1, "u2": 1}), 0).await;
    assert!(
        killed.elapsed() < Duration::from_secs(6),
        "counted until {:?}",
        killed.elapsed()
    );
    // Logged once the lease call that sent the leave returns (and the log is read).
    wait_until("a logs the lease that ran out", WAIT, || async {
        a.log().contains("lease ran out")
    })
    .await;
}

#[tokio::test]
async fn counts_come_back_after_redis_restarts_empty() {
    // No persistence: a restart loses every key.
    let mut redis = Redis::start_with(&["--appendonly", "no"]);
    let url = redis.url();
    let hub = Hub::start(&[
        ("HUB_REDIS_URL", url.as_str()),
        ("HUB_JWT_SECRET", SECRET),
        ("HUB_HEARTBEAT_SECS", "3"),
        ("HUB_STALE_AFTER_SECS", "20"),
    ])
    .await;
    hub.wait_ready(WAIT).await;
    let ch = format!("public:{}", prefix("restart"));
    let (_u1, _) = hub.connect(&with_token(&ch, "u1"), &[]).await;
    let (u2, _) = hub.connect(&with_token(&ch, "u2"), &[]).await;
    wait_presence(&hub, &ch, json!({"u1": 1, "u2": 1}), 0).await;
    let mut watcher = watch(&hub, &ch, "watcher").await;
    follow(&mut watcher, &["u1", "u2", "watcher"]).await;
    // Redis goes away; meanwhile u2 leaves (nowhere to publish that), then Redis comes back
    // without its data (no persistence here): the node reports its counts again once its
    // subscription is back, and reads the channel's users again, so the watcher gets u2's
    // leave that nobody could publish.
    redis.stop();
    drop(u2);
    wait_until("u2 gone from the node", WAIT, || async {
        hub.metric("hub_presence_users").await == 2.0
    })
    .await;
    redis.restart();
    hub.wait_ready(WAIT).await;
    wait_presence(&hub, &ch, json!({"u1": 1, "watcher": 1}), 0).await;
    assert_eq!(event(&mut watcher).await, "leave:u2");
    hub.publish(&ch, None, json!("nothing else"), false).await;
    assert_eq!(event(&mut watcher).await, "nothing else");
}

/// A storm: 600 users open streams on two nodes within a second or two, then all close. An
/// observer whose queue holds 4 items (`HUB_OUTBOX_LEN`) reads every join and every leave
/// exactly once, because changes beyond its queue wait in the channel's presence log, not in
/// the queue; and what it reads adds up to what `GET /v1/presence` says.
#[tokio::test]
async fn a_storm_reaches_an_observer_with_a_tiny_queue_whole() {
    let redis = Redis::start();
    let url = redis.url();
    let tiny = [("HUB_OUTBOX_LEN", "4"), ("HUB_MAX_CONNECTIONS", "2000")];
    let a = node(&url, "storm-a", &tiny).await;
    let b = node(&url, "storm-b", &tiny).await;
    let ch = format!("public:{}", prefix("storm"));
    let mut watcher = watch(&a, &ch, "watcher").await;
    starts_alone(&mut watcher).await;
    const USERS: usize = 600;
    let opens = (0..USERS).map(|i| {
        let hub = if i % 2 == 0 { &a } else { &b };
        let q = with_token(&ch, &format!("u{i}"));
        async move { hub.connect(&q, &[]).await.0 }
    });
    let users = futures_util::future::join_all(opens).await;
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < USERS {
        let e = event(&mut watcher).await;
        let sub = e.strip_prefix("join:").unwrap_or_else(|| panic!("{e}"));
        assert!(seen.insert(sub.to_string()), "a second join of {sub}");
    }
    let mut expected: serde_json::Map<String, Value> =
        seen.iter().map(|s| (s.clone(), json!(1))).collect();
    expected.insert("watcher".into(), json!(1));
    wait_presence(&a, &ch, Value::Object(expected), 0).await;

    drop(users);
    while !seen.is_empty() {
        let e = event(&mut watcher).await;
        let sub = e.strip_prefix("leave:").unwrap_or_else(|| panic!("{e}"));
        assert!(seen.remove(sub), "a leave of {sub} unseen or twice");
    }
    wait_presence(&a, &ch, json!({"watcher": 1}), 0).await;
    // Nothing more comes: the next event is a message published now.
    a.publish(&ch, None, json!("after the storm"), false).await;
    assert_eq!(event(&mut watcher).await, "after the storm");
}

/// An observer starts from who is there (`hub.presence`), over every node: a client that
/// sleeps and reconnects, to the same node or another, gets the list as it is then, so the
/// users that left while it was away are not kept as ghosts.
#[tokio::test]
async fn an_observer_starts_from_who_is_there_and_a_reconnect_keeps_no_ghost() {
    let redis = Redis::start();
    let url = redis.url();
    let a = node(&url, "seed-a", &[]).await;
    let b = node(&url, "seed-b", &[]).await;
    let ch = format!("public:{}", prefix("seed"));
    let (u1, _) = b.connect(&with_token(&ch, "u1"), &[]).await;
    let (_u2, _) = b.connect(&with_token(&ch, "u2"), &[]).await;
    wait_presence(&a, &ch, json!({"u1": 1, "u2": 1}), 0).await;
    // Node a has no reader of the channel yet: it reads the users from Redis.
    let mut watcher = watch(&a, &ch, "watcher").await;
    let first = event(&mut watcher).await;
    if first != "present:u1,u2,watcher" {
        assert_eq!(first, "present:u1,u2");
        assert_eq!(event(&mut watcher).await, "join:watcher");
    }

    // The watcher's laptop sleeps; meanwhile u1 leaves and u3 comes.
    drop(watcher);
    drop(u1);
    let (_u3, _) = b.connect(&with_token(&ch, "u3"), &[]).await;
    wait_presence(&a, &ch, json!({"u2": 1, "u3": 1}), 0).await;
    // A Rust backend reads the same straight from Redis.
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let here = protocol::presence::read(&mut conn, &ch).await.unwrap();
    assert_eq!(
        here.users,
        [("u2".to_string(), 1), ("u3".to_string(), 1)].into()
    );
    assert_eq!(here.anonymous, 0);
    // Back, on either node: the list as it is now.
    for hub in [&a, &b] {
        let mut watcher = watch(hub, &ch, "watcher").await;
        let first = event(&mut watcher).await;
        if first != "present:u2,u3,watcher" {
            assert_eq!(first, "present:u2,u3");
            assert_eq!(event(&mut watcher).await, "join:watcher");
        }
        drop(watcher);
        wait_presence(&a, &ch, json!({"u2": 1, "u3": 1}), 0).await;
    }
    // A WebSocket subscribe gets the same list as a frame.
    let mut ws = ws_watch(&a, &ch, "w").await;
    assert_eq!(
        next(&mut ws).await,
        json!({"type": "presence", "channel": ch, "users": ["u2", "u3"]})
    );
}

/// The same on the embedded broker: a user whose last stream closed less than a heartbeat ago
/// is still there (it may be reconnecting), and its leave follows the list.
#[tokio::test]
async fn an_embedded_observer_starts_from_who_is_there() {
    let hub = Hub::start(&[("HUB_JWT_SECRET", SECRET), ("HUB_HEARTBEAT_SECS", "2")]).await;
    let ch = format!("public:{}", prefix("seed1"));
    let (_u1, _) = hub.connect(&with_token(&ch, "u1"), &[]).await;
    let (u2, _) = hub.connect(&with_token(&ch, "u2"), &[]).await;
    wait_presence(&hub, &ch, json!({"u1": 1, "u2": 1}), 0).await;
    drop(u2);
    let mut watcher = watch(&hub, &ch, "watcher").await;
    // u2 may be within its grace (a heartbeat): then it is listed and its leave follows.
    // Whatever the timing, each event is a change to the list and they add up to the truth.
    follow(&mut watcher, &["u1", "watcher"]).await;
    wait_presence(&hub, &ch, json!({"u1": 1, "watcher": 1}), 0).await;
}

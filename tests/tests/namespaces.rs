//! Namespaces from a `HUB_CONFIG` file (first step of issue 23): top-level settings (a
//! variable wins), the longest prefix, anonymous namespaces (and `public:` closed by the file),
//! presence turned off, `GET /v1/namespaces`, and bad files refused at start with one line
//! naming the file, the key and why.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use hub_tests::client::{token, SECRET};
use hub_tests::{binary, Hub, WAIT};
use serde_json::{json, Value};
use std::process::Command;

/// Writes a file of its own (tests run at once; two never share one) and returns its path.
fn write(name: &str, text: &str) -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("hub-ns-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

const FILE: &str = r#"
heartbeat_secs = 7
history_len = 50

[[namespace]]
prefix = "public:"
anonymous = false

[[namespace]]
prefix = "feed:"
anonymous = true

[[namespace]]
prefix = "ticker:"
history_len = 10
history_ttl_secs = 60
presence = false

[[namespace]]
prefix = "ticker:fx:"
anonymous = true
"#;

#[tokio::test]
async fn a_file_sets_options_per_prefix() {
    options_per_prefix(None).await;
}

#[tokio::test]
async fn a_file_sets_options_per_prefix_over_redis() {
    let redis = hub_tests::Redis::start();
    options_per_prefix(Some(&redis.url())).await;
}

/// The file's options on the embedded broker, or over Redis (`redis`: its URL).
async fn options_per_prefix(redis: Option<&str>) {
    let path = write("hub.toml", FILE);
    let mut env = vec![("HUB_CONFIG", path.as_str()), ("HUB_JWT_SECRET", SECRET)];
    env.extend(redis.map(|u| ("HUB_REDIS_URL", u)));
    let hub = Hub::start(&env).await;
    hub.wait_ready(WAIT).await;
    let (s, connected) = hub.connect("channel=feed:news", &[]).await;
    drop(s);
    assert_eq!(connected.json()["heartbeat_secs"], 7, "the file's setting");
    // The longest prefix wins; the file closed public:; other channels need a token.
    for (q, want) in [
        ("channel=feed:news", 200),
        ("channel=ticker:fx:eur", 200),
        ("channel=ticker:btc", 401),
        ("channel=public:x", 401),
        ("channel=room:1", 401),
    ] {
        assert_eq!(hub.sse(q, &[]).await.status, want, "{q}");
    }
    // Presence off in ticker: (not in ticker:fx:, its own namespace with the defaults).
    let t = token("1", &["*"], 600);
    assert_eq!(
        hub.sse(&format!("channel=ticker:btc&presence=true&token={t}"), &[])
            .await
            .status,
        403
    );
    let (s, _) = hub
        .connect(&format!("channel=ticker:btc&token={t}"), &[])
        .await;
    drop(s);
    let (s, _) = hub
        .connect("channel=ticker:fx:eur&presence=true", &[])
        .await;
    drop(s);

    let v = hub.namespaces().await;
    let prefixes: Vec<&str> = v["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["prefix"].as_str().unwrap())
        .collect();
    assert_eq!(prefixes, ["ticker:fx:", "public:", "ticker:", "feed:", ""]);
    let ticker = &v["namespaces"][2];
    assert_eq!(
        (
            ticker["history_len"].clone(),
            ticker["history_ttl_secs"].clone(),
            ticker["presence"].clone()
        ),
        (json!(10), json!(60), json!(false))
    );
    assert_eq!(
        v["namespaces"][4]["history_len"], 50,
        "the file's top-level setting"
    );
    assert_eq!(v["namespaces"][4]["history_ttl_secs"], 3600, "the default");

    // A variable wins over the file's key.
    env.push(("HUB_HEARTBEAT_SECS", "9"));
    let env_wins = Hub::start(&env).await;
    env_wins.wait_ready(WAIT).await;
    let (s, connected) = env_wins.connect("channel=feed:x", &[]).await;
    drop(s);
    assert_eq!(connected.json()["heartbeat_secs"], 9);
}

#[tokio::test]
async fn without_a_file_public_is_the_only_anonymous_namespace() {
    let hub = Hub::start(&[]).await;
    let (s, _) = hub.connect("channel=public:x", &[]).await;
    drop(s);
    assert_eq!(hub.sse("channel=feed:x", &[]).await.status, 401);
    let v = hub.namespaces().await;
    assert_eq!(v["namespaces"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(v["namespaces"][0]["prefix"], "public:");
    assert_eq!(v["namespaces"][0]["anonymous"], true);
}

#[test]
fn bad_files_stop_the_hub_with_one_line_naming_the_file_and_key() {
    for (name, text, words) in [
        (
            "unknown-ns-key.toml",
            "[[namespace]]\nprefix = \"a:\"\nhistroy_len = 5\n",
            vec!["histroy_len"],
        ),
        (
            "duplicate.toml",
            "[[namespace]]\nprefix = \"a:\"\n[[namespace]]\nprefix = \"a:\"\n",
            vec!["prefix", "\"a:\""],
        ),
        ("unknown-key.toml", "heartbeat = 5\n", vec!["heartbeat"]),
        (
            "bad-value.toml",
            "heartbeat_secs = \"soon\"\n",
            vec!["heartbeat-secs"],
        ),
        (
            "bad-type.toml",
            "[[namespace]]\nprefix = \"a:\"\nanonymous = \"yes\"\n",
            vec!["anonymous"],
        ),
        ("not-toml.toml", "[[namespace\n", vec!["line 1"]),
        (
            "bad-ttl.toml",
            "[[namespace]]\nprefix = \"a:\"\nhistory_ttl_secs = 0\n",
            vec!["history_ttl_secs"],
        ),
    ] {
        let path = write(name, text);
        let out = Command::new(binary("hub"))
            .env_clear()
            .env("HUB_BIND", "127.0.0.1:0")
            .env("HUB_ADMIN_BIND", "127.0.0.1:0")
            .env("HUB_CONFIG", &path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{name}: {err}");
        assert!(err.contains(&path), "{name} names the file: {err}");
        for w in words {
            assert!(err.contains(w), "{name} names {w}: {err}");
        }
    }
    let out = Command::new(binary("hub"))
        .env_clear()
        .env("HUB_CONFIG", "/nonexistent/hub.toml")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// `publish_rate`: HTTP publishes per second per channel and node, a burst of the rate, then
/// 429 with `Retry-After`; other channels are not held back.
#[tokio::test]
async fn publish_rate_limits_http_publishes_per_channel() {
    publish_rate_limits(None).await;
}

#[tokio::test]
async fn publish_rate_limits_http_publishes_per_channel_over_redis() {
    let redis = hub_tests::Redis::start();
    publish_rate_limits(Some(&redis.url())).await;
}

async fn publish_rate_limits(redis: Option<&str>) {
    let path = write(
        "rate.toml",
        "[[namespace]]\nprefix = \"public:limited:\"\npublish_rate = 2\n",
    );
    let mut env = vec![("HUB_CONFIG", path.as_str())];
    env.extend(redis.map(|u| ("HUB_REDIS_URL", u)));
    let hub = Hub::start(&env).await;
    hub.wait_ready(WAIT).await;
    let publish = |channel: &'static str| {
        let hub = &hub;
        async move {
            hub.http
                .post(hub.admin_url("/v1/publish"))
                .json(&json!({"channel": channel, "data": "x"}))
                .send()
                .await
                .unwrap()
        }
    };
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(publish("public:limited:a").await.status().as_u16());
    }
    assert_eq!(statuses, [202, 202, 429]);
    let refused = publish("public:limited:a").await;
    assert_eq!(refused.status().as_u16(), 429);
    assert_eq!(
        refused
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited");
    assert_eq!(
        publish("public:limited:b").await.status().as_u16(),
        202,
        "per channel"
    );
    assert_eq!(
        publish("public:other").await.status().as_u16(),
        202,
        "other namespaces"
    );
    hub_tests::wait_until(
        "a token is back",
        std::time::Duration::from_secs(3),
        || async { publish("public:limited:a").await.status().as_u16() == 202 },
    )
    .await;
}

/// `max_readers`: streams per channel on one node; beyond, 429 `channel_limit` (an EventSource
/// is told to come back), a WebSocket subscribe gets an error frame 429; a place freed is taken.
#[tokio::test]
async fn max_readers_bounds_a_channels_streams_on_a_node() {
    max_readers_bound(None).await;
}

#[tokio::test]
async fn max_readers_bounds_a_channels_streams_on_a_node_over_redis() {
    let redis = hub_tests::Redis::start();
    max_readers_bound(Some(&redis.url())).await;
}

async fn max_readers_bound(redis: Option<&str>) {
    use hub_tests::client::{next, send, try_ws};
    let path = write(
        "readers.toml",
        "[[namespace]]\nprefix = \"public:few:\"\nanonymous = true\nmax_readers = 2\n",
    );
    let mut env = vec![("HUB_CONFIG", path.as_str())];
    env.extend(redis.map(|u| ("HUB_REDIS_URL", u)));
    let hub = Hub::start(&env).await;
    hub.wait_ready(WAIT).await;
    let (one, _) = hub.connect("channel=public:few:a", &[]).await;
    let (_two, _) = hub.connect("channel=public:few:a", &[]).await;
    let mut third = hub.sse("channel=public:few:a", &[]).await;
    assert_eq!(third.status, 429);
    assert_eq!(third.header("retry-after"), Some("5"));
    assert!(third.error_body().await.contains("channel_limit"));
    // Other channels of the namespace are counted apart; a request naming a full channel
    // among others is refused whole.
    let (_b, _) = hub.connect("channel=public:few:b", &[]).await;
    assert_eq!(
        hub.sse("channel=public:few:b&channel=public:few:a", &[])
            .await
            .status,
        429
    );
    let mut es = hub
        .sse("channel=public:few:a", &[("accept", "text/event-stream")])
        .await;
    assert_eq!(es.status, 200);
    let e = es.next_message(hub_tests::WAIT).await.unwrap();
    assert_eq!(
        (e.event.as_str(), e.json()["reason"].clone()),
        ("hub.reconnect", json!("channel_limit"))
    );
    let mut ws = try_ws(hub.public, "", &[]).await.unwrap();
    send(
        &mut ws,
        json!({"op": "subscribe", "channel": "public:few:a"}),
    )
    .await;
    let frame = next(&mut ws).await;
    assert_eq!(
        (frame["code"].clone(), frame["channel"].clone()),
        (json!(429), json!("public:few:a")),
        "{frame}"
    );
    assert_eq!(
        hub.metric("hub_connections_rejected_total{reason=\"channel_limit\"}")
            .await,
        3.0
    );
    drop(one);
    hub_tests::wait_until("the freed place is taken", hub_tests::WAIT, || async {
        hub.sse("channel=public:few:a", &[]).await.status == 200
    })
    .await;
}

/// History per namespace (embedded broker): a namespace's `history_len` bounds what rewind
/// and resume can replay, and rewind itself; `history_len = 0` keeps nothing but still gives
/// durable publishes their ids; other channels keep `HUB_HISTORY_LEN`.
#[tokio::test]
async fn history_length_per_namespace_on_the_embedded_broker() {
    let path = write(
        "history.toml",
        "[[namespace]]\nprefix = \"public:short:\"\nanonymous = true\nhistory_len = 3\n\n\
         [[namespace]]\nprefix = \"public:none:\"\nanonymous = true\nhistory_len = 0\n",
    );
    let hub = Hub::start(&[("HUB_CONFIG", &path)]).await;
    let data: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    let short = hub.publish_many("public:short:a", &data).await;
    hub.publish_many("public:long:a", &data).await;
    let ids = hub.publish_many("public:none:a", &data[..2]).await;
    assert_eq!(ids.len(), 2, "durable publishes get ids without history");

    assert_eq!(
        hub.sse("channel=public:short:a&rewind=4", &[]).await.status,
        400
    );
    assert_eq!(
        hub.sse("channel=public:none:a&rewind=1", &[]).await.status,
        400
    );
    let replayed = |q: &'static str, n: usize| {
        let hub = &hub;
        async move {
            let (mut s, _) = hub.connect(q, &[]).await;
            let mut got = Vec::new();
            for _ in 0..n {
                got.push(s.next_message(hub_tests::WAIT).await.unwrap().data);
            }
            got
        }
    };
    assert_eq!(
        replayed("channel=public:short:a&rewind=3", 3).await,
        ["m7", "m8", "m9"]
    );
    assert_eq!(replayed("channel=public:long:a&rewind=10", 10).await, data);
    // A resume from before the short window: hub.reset, then what the window holds is gone
    // past; nothing older is replayed.
    let (mut s, _) = hub
        .connect(
            "channel=public:short:a",
            &[("last-event-id", short[0].as_str())],
        )
        .await;
    let e = s.next_message(hub_tests::WAIT).await.unwrap();
    assert_eq!(e.event, "hub.reset", "{e:?}");
}

const CONFLATE: &str = r#"
[[namespace]]
prefix = "tick:"
anonymous = true
conflate_ms = 300
"#;

/// A fast publisher on a conflated channel: the reader gets at most one message every 300 ms,
/// in order, ending with the newest; each one it skipped counted `conflated`; a resume from
/// its first message replays only the newest; live goes on after it.
async fn conflation_under_a_fast_publisher(hub: &Hub, ch: &str) {
    let (mut s, _) = hub.connect(&format!("channel={ch}"), &[]).await;
    let started = std::time::Instant::now();
    let mut ids = Vec::new();
    for i in 0..40 {
        ids.push(hub.publish(ch, None, json!(i), true).await);
        tokio::time::sleep(std::time::Duration::from_millis(25)).await; // the publisher's pace
    }
    let mut got: Vec<(String, i64)> = Vec::new();
    while got.last().map(|g| g.1) != Some(39) {
        let m = s.next_message(WAIT).await.expect("stream open");
        got.push((m.id.clone().unwrap(), m.json().as_i64().unwrap()));
    }
    let took = started.elapsed().as_millis() as usize;
    let values: Vec<i64> = got.iter().map(|g| g.1).collect();
    assert!(values.windows(2).all(|w| w[0] < w[1]), "{values:?}");
    assert!(
        values.len() >= 2 && values.len() <= took / 300 + 2,
        "{} messages in {took} ms: {values:?}",
        values.len()
    );
    assert_eq!(got.last().unwrap().0, ids[39], "the newest, with its id");
    let conflated = r#"hub_messages_dropped_total{reason="conflated"}"#;
    hub.wait_metric(conflated, (40 - values.len()) as f64, WAIT)
        .await;
    drop(s);
    // A resume from the first message it got: only the newest, then live.
    let (mut r, _) = hub
        .connect(&format!("channel={ch}"), &[("Last-Event-ID", &got[0].0)])
        .await;
    let m = r.next_message(WAIT).await.unwrap();
    assert_eq!(
        (m.id.as_deref(), m.json()),
        (Some(ids[39].as_str()), json!(39))
    );
    hub.publish(ch, None, json!("after"), true).await;
    let m = r.next_message(WAIT).await.unwrap();
    assert_eq!(m.data, "after", "nothing else replayed");
}

#[tokio::test]
async fn conflation_on_the_embedded_broker() {
    let path = write("conflate.toml", CONFLATE);
    let hub = Hub::start(&[("HUB_CONFIG", &path)]).await;
    conflation_under_a_fast_publisher(&hub, "tick:btc").await;
}

#[tokio::test]
async fn conflation_over_redis() {
    let redis = hub_tests::Redis::start();
    let path = write("conflate-redis.toml", CONFLATE);
    let hub = Hub::start(&[("HUB_CONFIG", &path), ("HUB_REDIS_URL", &redis.url())]).await;
    hub.wait_ready(WAIT).await;
    conflation_under_a_fast_publisher(&hub, "tick:eth").await;
}

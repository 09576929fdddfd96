//! Redis as nodes of several versions and settings share it: an ephemeral publish can never pass
//! for a durable one (whatever it carries), a durable id from the future is dropped and counted;
//! the function library is never replaced by an older one, a newer one is kept, and settings are
//! not overwritten by whichever node starts last; the form nodes of version 1 read is still sent.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use futures_util::StreamExt;
use hub_tests::{prefix, wait_until, Hub, Redis, WAIT};
use protocol::{publish, Envelope};
use serde_json::json;

fn env(data: &str) -> Envelope {
    Envelope {
        event: None,
        data: json!(data),
    }
}

async fn redis_hub(redis: &Redis, extra: &[(&str, &str)]) -> Hub {
    let url = redis.url();
    let mut all = vec![("HUB_REDIS_URL", url.as_str())];
    all.extend_from_slice(extra);
    let hub = Hub::start(&all).await;
    hub.wait_ready(WAIT).await;
    hub
}

#[tokio::test]
async fn an_ephemeral_publish_cannot_pass_for_a_durable_one() {
    let redis = Redis::start();
    let hub = redis_hub(&redis, &[]).await;
    let ch = prefix("m2");
    let (mut s, _) = hub.connect(&format!("channel={ch}"), &[]).await;
    let mut conn = redis.conn().await;
    let first = publish::publish_durable(&mut conn, &ch, &env("first"))
        .await
        .unwrap();
    // The forgery from the issue, on the live channel; and a far-future id on the durable one.
    redis.cli(&[
        "PUBLISH",
        &format!("hub:ch:{ch}"),
        r#"99999999999999-0 {"data":"forged"}"#,
    ]);
    redis.cli(&[
        "PUBLISH",
        &format!("hub:dur:{ch}"),
        r#"99999999999999-0 {"data":"from the future"}"#,
    ]);
    redis.cli(&[
        "PUBLISH",
        &format!("hub:ch:{ch}"),
        r#"{"data":"ephemeral"}"#,
    ]);
    let second = publish::publish_durable(&mut conn, &ch, &env("second"))
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < 3 {
        let m = s.next_message(WAIT).await.unwrap();
        got.push((m.id, m.data));
    }
    assert_eq!(
        got,
        [
            (Some(first), "first".to_string()),
            (None, "ephemeral".to_string()),
            (Some(second), "second".to_string())
        ]
    );
    assert_eq!(
        hub.metric(r#"hub_messages_dropped_total{reason="malformed"}"#)
            .await,
        1.0,
        "the id from the future"
    );
}

/// `FCALL_RO hub_version 0`: [version, history length, TTL ms, max bytes, idempotency ms,
/// namespaces hash, webhook events kept at most].
fn version(redis: &Redis) -> Vec<i64> {
    redis
        .cli(&["FCALL_RO", "hub_version", "0"])
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect()
}

#[tokio::test]
async fn an_older_library_is_upgraded_and_a_newer_one_is_kept() {
    let redis = Redis::start();
    // What a node of version 1 loads: no hub_version.
    let v1 =
        "#!lua name=hub\nredis.register_function('hub_publish', function(k, a) return 'v1' end)";
    redis.cli(&["FUNCTION", "LOAD", "REPLACE", v1]);
    let hub = redis_hub(&redis, &[]).await;
    assert_eq!(version(&redis)[0], 7, "upgraded");
    drop(hub);
    // A library of a later version than this build: kept as it is.
    let v99 = "#!lua name=hub\nredis.register_function{function_name='hub_version', \
               callback=function() return {99, 1, 1, 1} end, flags={'no-writes'}}";
    redis.cli(&["FUNCTION", "LOAD", "REPLACE", v99]);
    let hub = redis_hub(&redis, &[]).await;
    assert_eq!(version(&redis), [99, 1, 1, 1]);
    assert!(hub.log().contains("a newer hub library is loaded"));
}

#[tokio::test]
async fn the_first_nodes_settings_are_not_overwritten_by_the_last() {
    let redis = Redis::start();
    let a = redis_hub(&redis, &[("HUB_HISTORY_LEN", "50")]).await;
    let b = redis_hub(&redis, &[("HUB_HISTORY_LEN", "7")]).await;
    assert_eq!(version(&redis)[..5], [7, 50, 3_600_000, 65_536, 300_000]);
    wait_until("node b says so", WAIT, || async {
        b.log().contains("other settings than this node")
    })
    .await;
    let ch = prefix("len");
    for i in 0..60 {
        b.publish(&ch, None, json!(i), true).await;
    }
    assert_eq!(redis.cli(&["XLEN", &format!("hub:hist:{{{ch}}}")]), "50");
    drop(a);
}

#[tokio::test]
async fn durable_messages_are_also_sent_in_the_form_version_1_nodes_read() {
    let redis = Redis::start();
    let hub = redis_hub(&redis, &[]).await;
    let ch = prefix("legacy");
    let client = redis::Client::open(redis.url()).unwrap();
    let mut sub = client.get_async_pubsub().await.unwrap();
    sub.subscribe(format!("hub:ch:{ch}")).await.unwrap();
    let id = hub.publish(&ch, None, json!("for old nodes"), true).await;
    let msg = tokio::time::timeout(WAIT, sub.on_message().next())
        .await
        .unwrap()
        .unwrap();
    let payload: String = msg.get_payload().unwrap();
    assert_eq!(payload, format!(r#"{id} {{"data":"for old nodes"}}"#));
}

/// Namespaces in Redis: `FCALL hub_publish` from a plain client keeps each channel's history by
/// its namespace (the library's); a node whose namespaces differ says so loudly and on
/// `GET /v1/namespaces`, and the first node's stay in force.
#[tokio::test]
async fn fcall_publishes_keep_history_by_namespace_and_a_node_with_other_namespaces_says_so() {
    let dir = std::env::temp_dir().join(format!("hub-rl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let short = file(
        "short.toml",
        "[[namespace]]\nprefix = \"public:short:\"\nanonymous = true\nhistory_len = 3\n",
    );
    let other = file(
        "other.toml",
        "[[namespace]]\nprefix = \"public:short:\"\nanonymous = true\nhistory_len = 4\n",
    );
    let redis = Redis::start();
    let a = redis_hub(&redis, &[("HUB_CONFIG", &short)]).await;
    let ch = format!("public:short:{}", std::process::id());
    let long = prefix("long");
    for i in 0..10 {
        let env = format!("{{\"data\":{i}}}");
        redis.cli(&["FCALL", "hub_publish", "1", &ch, &env]);
        redis.cli(&["FCALL", "hub_publish", "1", &long, &env]);
    }
    assert_eq!(redis.cli(&["XLEN", &format!("hub:hist:{{{ch}}}")]), "3");
    assert_eq!(redis.cli(&["XLEN", &format!("hub:hist:{{{long}}}")]), "10");
    let (mut s, _) = a.connect(&format!("channel={ch}&rewind=3"), &[]).await;
    for want in ["7", "8", "9"] {
        assert_eq!(s.next_message(WAIT).await.unwrap().data, want);
    }
    assert_eq!(a.namespaces().await["redis_differs"], false);
    let b = redis_hub(&redis, &[("HUB_CONFIG", &other)]).await;
    wait_until("node b says its namespaces differ", WAIT, || async {
        b.log().contains("namespaces in Redis")
    })
    .await;
    assert_eq!(b.namespaces().await["redis_differs"], true);
    redis.cli(&["FCALL", "hub_publish", "1", &ch, "{\"data\":10}"]);
    assert_eq!(
        redis.cli(&["XLEN", &format!("hub:hist:{{{ch}}}")]),
        "3",
        "the first node's namespaces"
    );
}

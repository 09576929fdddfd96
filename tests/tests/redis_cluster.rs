//! Redis Cluster mode against a real 3-master cluster on loopback: sharded pub/sub and
//! hash-tagged keys, so that a channel's history and its live messages live on one shard.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use hub_tests::{prefix, Cluster, Hub, WAIT};
use protocol::{publish, Envelope};
use serde_json::json;
use std::collections::HashSet;

fn env(data: &str) -> Envelope {
    Envelope {
        event: None,
        data: json!(data),
    }
}

#[tokio::test]
async fn two_nodes_on_a_three_master_cluster() {
    let cluster = Cluster::start();
    let url = cluster.url();
    let mut hubs = Vec::new();
    for node in ["c0", "c1"] {
        let hub = Hub::start(&[("HUB_REDIS_URL", url.as_str()), ("HUB_NODE_ID", node)]).await;
        hub.wait_ready(WAIT).await;
        hubs.push(hub);
    }
    // Enough channels that every shard owns some.
    let p = prefix("cl");
    let channels: Vec<String> = (0..12).map(|i| format!("{p}.{i}")).collect();
    let slots: HashSet<String> = channels
        .iter()
        .map(|c| cluster.nodes[0].cli(&["CLUSTER", "KEYSLOT", &format!("hub:hist:{{{c}}}")]))
        .collect();
    assert!(slots.len() > 3, "channels spread over slots");
    let q: Vec<String> = channels.iter().map(|c| format!("channel={c}")).collect();
    let q = q.join("&");
    let (mut s0, _) = hubs[0].connect(&q, &[]).await;
    let (mut s1, _) = hubs[1].connect(&q, &[]).await;

    let mut conn = cluster.conn().await;
    let mut want = Vec::new();
    for (i, c) in channels.iter().enumerate() {
        let d = format!("durable {i}");
        publish::publish_durable(&mut conn, c, &env(&d))
            .await
            .unwrap();
        want.push(d);
        let e = format!("ephemeral {i}");
        publish::publish_ephemeral(&mut conn, c, &env(&e), true)
            .await
            .unwrap();
        want.push(e);
    }
    // Over HTTP as well.
    hubs[1]
        .publish(&channels[5], None, json!("http"), true)
        .await;
    want.push("http".into());
    // Order is per channel (channels on different shards arrive over different connections).
    let per_channel = |list: &[String]| {
        let mut by: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for d in list {
            let key = d.rsplit(' ').next().unwrap_or_default().to_string();
            by.entry(key).or_default().push(d.clone());
        }
        by
    };
    for s in [&mut s0, &mut s1] {
        let mut got = Vec::new();
        while got.len() < want.len() {
            got.push(s.next_message(WAIT).await.unwrap().data);
        }
        assert_eq!(
            per_channel(&got),
            per_channel(&want),
            "each once, in publish order per channel"
        );
    }
    // Each channel's history lives on the shard that owns its slot.
    for c in &channels {
        let key = format!("hub:hist:{{{c}}}");
        let owners = cluster
            .nodes
            .iter()
            .filter(|n| n.cli(&["EXISTS", &key]) == "1")
            .count();
        assert_eq!(owners, 1, "{key}");
    }
    // Resume on the other node from the first stream's cursor.
    let cursor = {
        publish::publish_durable(&mut conn, &channels[0], &env("mark"))
            .await
            .unwrap();
        s0.next_message(WAIT).await.unwrap().id.unwrap()
    };
    drop(s0);
    publish::publish_durable(&mut conn, &channels[3], &env("missed 3"))
        .await
        .unwrap();
    publish::publish_durable(&mut conn, &channels[9], &env("missed 9"))
        .await
        .unwrap();
    let (mut r, _) = hubs[1]
        .connect(&q, &[("Last-Event-ID", cursor.as_str())])
        .await;
    let mut got = vec![
        r.next_message(WAIT).await.unwrap().data,
        r.next_message(WAIT).await.unwrap().data,
    ];
    got.sort();
    assert_eq!(got, ["missed 3", "missed 9"]);

    // The status page's JSON: each node lists both (their snapshots share one slot).
    for hub in &hubs {
        hub_tests::wait_until("both nodes in /v1/status", WAIT, || async {
            let status: serde_json::Value =
                match hub.http.get(hub.admin_url("/v1/status")).send().await {
                    Ok(r) => r.json().await.unwrap_or_default(),
                    Err(_) => return false,
                };
            let mut names: Vec<&str> = status["nodes"]
                .as_array()
                .map(|a| a.iter().filter_map(|n| n["node"].as_str()).collect())
                .unwrap_or_default();
            names.sort_unstable();
            status["error"].is_null() && names == ["c0", "c1"]
        })
        .await;
    }
}

/// A slot migration drops the shard subscriptions of the slot's channels on the old owner
/// (Redis sends SUNSUBSCRIBE; the client library discards it). The node notices the new slot
/// map, subscribes on the new owner and reads from history what it missed: a reader gets every
/// durable message published before and after the move, once, in order, within seconds.
#[tokio::test]
async fn a_slot_migration_is_followed_and_backfilled() {
    let cluster = Cluster::start();
    let url = cluster.url();
    let hub = Hub::start(&[("HUB_REDIS_URL", url.as_str())]).await;
    hub.wait_ready(WAIT).await;
    let ch = prefix("mig");
    let slot: u16 = cluster.nodes[0]
        .cli(&["CLUSTER", "KEYSLOT", &format!("hub:hist:{{{ch}}}")])
        .trim()
        .parse()
        .unwrap();
    let (mut s, _) = hub.connect(&format!("channel={ch}"), &[]).await;
    // Another channel on another slot keeps flowing meanwhile.
    let other = (0..50)
        .map(|i| format!("{ch}.o{i}"))
        .find(|c| {
            cluster.nodes[0]
                .cli(&["CLUSTER", "KEYSLOT", &format!("hub:hist:{{{c}}}")])
                .trim()
                != slot.to_string()
        })
        .unwrap();
    let (mut o, _) = hub.connect(&format!("channel={other}"), &[]).await;

    let mut conn = cluster.conn().await;
    let mut want = Vec::new();
    for i in 0..20 {
        let d = format!("before {i}");
        publish::publish_durable(&mut conn, &ch, &env(&d))
            .await
            .unwrap();
        want.push(d);
    }
    for w in &want {
        assert_eq!(&s.next_message(WAIT).await.unwrap().data, w);
    }
    let to = (cluster.owner_of(slot) + 1) % 3;
    cluster.migrate_slot(slot, to);
    let mut after = Vec::new();
    for i in 0..20 {
        let d = format!("after {i}");
        publish::publish_durable(&mut conn, &ch, &env(&d))
            .await
            .unwrap();
        after.push(d);
        publish::publish_durable(&mut conn, &other, &env(&format!("other {i}")))
            .await
            .unwrap();
    }
    for w in &after {
        assert_eq!(
            &s.next_message(WAIT).await.unwrap().data,
            w,
            "every message once, in order"
        );
    }
    for i in 0..20 {
        assert_eq!(
            o.next_message(WAIT).await.unwrap().data,
            format!("other {i}")
        );
    }
    // Live again: the next message comes without waiting for a period.
    let t = std::time::Instant::now();
    publish::publish_durable(&mut conn, &ch, &env("live"))
        .await
        .unwrap();
    assert_eq!(s.next_message(WAIT).await.unwrap().data, "live");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(1),
        "{:?}",
        t.elapsed()
    );
}

/// Presence on a cluster: each channel's presence keys and events live on the shard of its
/// slot (channels spread over all three masters); an observer on one node starts from the
/// users on the other, then gets their joins and leaves; the admin counts agree.
#[tokio::test]
async fn presence_over_a_three_master_cluster() {
    use hub_tests::client::{token, SECRET};
    let cluster = Cluster::start();
    let url = cluster.url();
    let mut hubs = Vec::new();
    for node in ["p0", "p1"] {
        let hub = Hub::start(&[
            ("HUB_REDIS_URL", url.as_str()),
            ("HUB_NODE_ID", node),
            ("HUB_JWT_SECRET", SECRET),
            ("HUB_HEARTBEAT_SECS", "2"),
        ])
        .await;
        hub.wait_ready(WAIT).await;
        hubs.push(hub);
    }
    let p = prefix("clp");
    let channels: Vec<String> = (0..6).map(|i| format!("public:{p}.{i}")).collect();
    let owners: HashSet<usize> = channels
        .iter()
        .map(|c| {
            let slot =
                cluster.nodes[0].cli(&["CLUSTER", "KEYSLOT", &format!("hub:present:{{{c}}}")]);
            cluster.owner_of(slot.trim().parse().unwrap())
        })
        .collect();
    assert!(owners.len() > 1, "channels on more than one master");
    let q = |sub: &str, extra: &str| {
        let list: Vec<String> = channels.iter().map(|c| format!("channel={c}")).collect();
        format!(
            "{}&token={}{extra}",
            list.join("&"),
            token(sub, &["*"], 3600)
        )
    };
    let (_u1, _) = hubs[1].connect(&q("u1", ""), &[]).await;
    for c in &channels {
        let c = c.clone();
        hub_tests::wait_until("u1 counted", WAIT, || {
            let c = c.clone();
            let hub = &hubs[0];
            async move { hub.presence(&c).await["users"] == json!({"u1": 1}) }
        })
        .await;
    }
    let (mut watcher, _) = hubs[0].connect(&q("watcher", "&presence=true"), &[]).await;
    // Per channel: the list (u1, maybe the watcher), then the watcher's join unless listed.
    let mut lists = 0;
    let mut joins = HashSet::new();
    while lists < channels.len() || joins.len() < channels.len() {
        let e = watcher.next_message(WAIT).await.unwrap();
        let v = e.json();
        let ch = v["channel"].as_str().unwrap().to_string();
        match e.event.as_str() {
            "hub.presence" => {
                let users = v["users"].as_array().unwrap();
                assert!(users.contains(&json!("u1")), "{v}");
                if users.contains(&json!("watcher")) {
                    joins.insert(ch.clone());
                }
                lists += 1;
            }
            "hub.join" if v["sub"] == "watcher" => assert!(joins.insert(ch)),
            other => panic!("{other}: {v}"),
        }
    }
    let (u2, _) = hubs[1].connect(&q("u2", ""), &[]).await;
    let mut seen = HashSet::new();
    while seen.len() < channels.len() {
        let e = watcher.next_message(WAIT).await.unwrap();
        assert_eq!(e.event, "hub.join");
        assert_eq!(e.json()["sub"], "u2");
        assert!(seen.insert(e.json()["channel"].as_str().unwrap().to_string()));
    }
    drop(u2);
    let mut seen = HashSet::new();
    while seen.len() < channels.len() {
        let e = watcher.next_message(WAIT).await.unwrap();
        assert_eq!(e.event, "hub.leave");
        assert_eq!(e.json()["sub"], "u2");
        assert!(seen.insert(e.json()["channel"].as_str().unwrap().to_string()));
    }
    for c in &channels {
        assert_eq!(
            hubs[1].presence(c).await["users"],
            json!({"u1": 1, "watcher": 1})
        );
    }
}

/// Control from the backend on a cluster: the control channel is a shard channel every node
/// subscribes to, the revocations one hash on its own slot. A disconnect sent to one node ends
/// the stream on the other; a revocation is refused on both and read by a node that starts
/// later.
#[tokio::test]
async fn disconnect_and_revoke_over_a_three_master_cluster() {
    use hub_tests::client::{hs256, now, SECRET};
    let cluster = Cluster::start();
    let url = cluster.url();
    let start = || async {
        let hub = Hub::start(&[("HUB_REDIS_URL", url.as_str()), ("HUB_JWT_SECRET", SECRET)]).await;
        hub.wait_ready(WAIT).await;
        hub
    };
    let (a, b) = (start().await, start().await);
    let exp = now() + 600;
    let t = hs256(json!({"sub": "k1", "exp": exp, "jti": "cl-1", "channels": ["room:*"]}));
    let q = format!("channel=room:cl&token={t}");
    let (mut s, _) = b.connect(&q, &[]).await;
    let post = |hub: &Hub, path: &str, body: serde_json::Value| {
        hub.http.post(hub.admin_url(path)).json(&body).send()
    };
    // The answer is 202 and the stream on the other node ends within 1 s saying `reason`.
    async fn ends_saying(res: reqwest::Response, s: &mut hub_tests::SseStream, reason: &str) {
        assert_eq!(res.status().as_u16(), 202);
        let e = s
            .next_message(std::time::Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(
            (e.event.as_str(), e.json()),
            ("hub.disconnect", json!({ "reason": reason }))
        );
    }
    let res = post(&a, "/v1/disconnect", json!({"sub": "k1"}))
        .await
        .unwrap();
    ends_saying(res, &mut s, "disconnected").await;

    let (mut s, _) = a.connect(&q, &[]).await;
    let res = post(&b, "/v1/revoke", json!({"jti": "cl-1", "exp": exp}))
        .await
        .unwrap();
    ends_saying(res, &mut s, "revoked").await;
    let c = start().await;
    for hub in [&a, &b, &c] {
        assert_eq!(hub.sse(&q, &[]).await.status, 401);
    }
}

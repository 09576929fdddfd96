//! Control from the backend, through real hub processes: `POST /v1/disconnect` by `sub`,
//! `connection_id` and `channel`, `POST /v1/revoke` by `jti` and by `sub` + `before` (new
//! streams 401 on every node, streams holding such a token closed within a second, kept over
//! a node restart in Redis mode), `DELETE /v1/revoke` lifting it, bad bodies, and the metrics.
//! Two nodes on one Redis, and the embedded broker.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use futures_util::StreamExt;
use hub_tests::client::{hs256, next, now, send, subscribe, token, try_ws, SECRET};
use hub_tests::{wait_until, Hub, Redis, SseStream, WAIT};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

/// What the contract allows between the answer and the end of every matching stream.
const WITHIN: Duration = Duration::from_secs(1);

async fn call(hub: &Hub, method: reqwest::Method, path: &str, body: &str) -> (u16, Value) {
    let res = hub
        .http
        .request(method, hub.admin_url(path))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    let text = res.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text:?}")),
    )
}

async fn post(hub: &Hub, path: &str, body: Value) -> (u16, Value) {
    call(hub, reqwest::Method::POST, path, &body.to_string()).await
}

async fn delete(hub: &Hub, path: &str, body: Value) -> (u16, Value) {
    call(hub, reqwest::Method::DELETE, path, &body.to_string()).await
}

/// Asserts the stream gets `hub.disconnect` with `reason` within [`WITHIN`] and then ends
/// (messages published before the disconnect may come first).
async fn ends_with(s: &mut SseStream, reason: &str) {
    let started = Instant::now();
    let e = loop {
        let e = s
            .next_message(WITHIN)
            .await
            .expect("hub.disconnect before the end");
        if e.event != "message" {
            break e;
        }
    };
    assert_eq!(e.event, "hub.disconnect", "{e:?}");
    assert_eq!(e.json(), json!({ "reason": reason }));
    assert!(
        s.next_event(WITHIN).await.is_none(),
        "the stream ends after hub.disconnect"
    );
    assert!(started.elapsed() <= WITHIN * 2, "{:?}", started.elapsed());
}

/// Asserts the socket gets an error frame 4000 with `reason`, then a close 4000, within
/// [`WITHIN`] each.
async fn ws_ends_with(ws: &mut hub_tests::client::Ws, reason: &str) {
    let frame = tokio::time::timeout(WITHIN, next(ws)).await.unwrap();
    assert_eq!(
        frame,
        json!({"type": "error", "code": 4000, "message": reason})
    );
    match tokio::time::timeout(WITHIN, ws.next()).await.unwrap() {
        Some(Ok(Message::Close(Some(f)))) => assert_eq!(f.code, CloseCode::from(4000)),
        other => panic!("expected close 4000, got {other:?}"),
    }
}

/// Asserts the stream is still open: a message published now reaches it.
async fn still_open(hub: &Hub, s: &mut SseStream, channel: &str) {
    let data = format!("alive {}", fastrand_like());
    hub.publish(channel, None, json!(data), false).await;
    loop {
        // Earlier checks' messages on the same channel may come first.
        let e = s.next_message(WAIT).await.expect("stream still open");
        assert_eq!(e.event, "message", "{e:?}");
        if e.data == data {
            return;
        }
    }
}

fn fastrand_like() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

async fn two_nodes(redis: &Redis) -> (Hub, Hub) {
    let url = redis.url();
    let env = [("HUB_REDIS_URL", url.as_str()), ("HUB_JWT_SECRET", SECRET)];
    let a = Hub::start(&env).await;
    let b = Hub::start(&env).await;
    a.wait_ready(WAIT).await;
    b.wait_ready(WAIT).await;
    (a, b)
}

fn q(channel: &str, t: &str) -> String {
    format!("channel={channel}&token={t}")
}

#[tokio::test]
async fn disconnect_by_sub_connection_and_channel_ends_streams_on_every_node() {
    let redis = Redis::start();
    let (a, b) = two_nodes(&redis).await;
    let room = format!("room:dc{}", std::process::id());
    let other = format!("{room}.other");
    let t42 = token("42", &["room:*"], 3600);
    let t7 = token("7", &["room:*"], 3600);

    // By sub: both of 42's streams (one per node, one of them reading two channels) end;
    // 7's stays.
    let (mut on_a, _) = a.connect(&q(&room, &t42), &[]).await;
    let (mut on_b, _) = b
        .connect(&format!("channel={room}&channel={other}&token={t42}"), &[])
        .await;
    let (mut seven, _) = a.connect(&q(&room, &t7), &[]).await;
    let mut ws = try_ws(b.public, &format!("?token={t42}"), &[])
        .await
        .unwrap();
    subscribe(&mut ws, &room).await;
    let (status, body) = post(
        &b,
        "/v1/disconnect",
        json!({"sub": "42", "reason": "logout"}),
    )
    .await;
    assert_eq!((status, body), (202, json!({"accepted": true})));
    ends_with(&mut on_a, "logout").await;
    ends_with(&mut on_b, "logout").await;
    ws_ends_with(&mut ws, "logout").await;
    still_open(&a, &mut seven, &room).await;

    // By connection id: only that stream, whichever node holds it; the default reason.
    let (mut one, connected) = b.connect(&q(&room, &t42), &[]).await;
    let (mut two, _) = b.connect(&q(&room, &t42), &[]).await;
    let id = connected.json()["connection_id"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, _) = post(&a, "/v1/disconnect", json!({"connection_id": id})).await;
    assert_eq!(status, 202);
    ends_with(&mut one, "disconnected").await;
    still_open(&a, &mut two, &room).await;

    // By channel: every reader of it on both nodes, also one reading it among others.
    let (mut both, _) = a
        .connect(&format!("channel={other}&channel={room}&token={t7}"), &[])
        .await;
    let (mut elsewhere, _) = b.connect(&q(&other, &t7), &[]).await;
    let (status, _) = post(
        &a,
        "/v1/disconnect",
        json!({"channel": room, "reason": "closed"}),
    )
    .await;
    assert_eq!(status, 202);
    for s in [&mut seven, &mut two, &mut both] {
        ends_with(s, "closed").await;
    }
    still_open(&a, &mut elsewhere, &other).await;

    // Nobody matches: still accepted.
    let (status, _) = post(&a, "/v1/disconnect", json!({"sub": "nobody"})).await;
    assert_eq!(status, 202);

    let sse = "hub_connections_closed_total{transport=\"sse\",reason=\"disconnected\"}";
    let ws = "hub_connections_closed_total{transport=\"ws\",reason=\"disconnected\"}";
    assert_eq!(a.metric(sse).await, 3.0, "a: 42's, 7's on room, both");
    assert_eq!(
        b.metric(sse).await,
        3.0,
        "b: 42's two-channel stream, one, two"
    );
    assert_eq!(b.metric(ws).await, 1.0);
}

/// The streams of a token that gets revoked end within a second with reason `revoked`; the
/// token is refused (401) on every node; a restarted node still refuses it; the DELETE lifts it.
#[tokio::test]
async fn revoking_a_token_by_jti_refuses_it_everywhere_until_lifted() {
    let redis = Redis::start();
    let (a, b) = two_nodes(&redis).await;
    let room = format!("room:rv{}", std::process::id());
    let exp = now() + 3600;
    let leaked = hs256(json!({"sub": "9", "exp": exp, "jti": "leak-1", "channels": ["room:*"]}));
    let fine = hs256(json!({"sub": "9", "exp": exp, "jti": "ok-2", "channels": ["room:*"]}));
    let (mut s_a, _) = a.connect(&q(&room, &leaked), &[]).await;
    let (mut s_b, _) = b.connect(&q(&room, &leaked), &[]).await;
    let (mut kept, _) = b.connect(&q(&room, &fine), &[]).await;
    let mut ws = try_ws(a.public, &format!("?token={leaked}"), &[])
        .await
        .unwrap();
    subscribe(&mut ws, &room).await;

    let (status, body) = post(&a, "/v1/revoke", json!({"jti": "leak-1", "exp": exp})).await;
    assert_eq!((status, body), (202, json!({"accepted": true})));
    ends_with(&mut s_a, "revoked").await;
    ends_with(&mut s_b, "revoked").await;
    ws_ends_with(&mut ws, "revoked").await;
    still_open(&a, &mut kept, &room).await;
    for hub in [&a, &b] {
        assert_eq!(hub.sse(&q(&room, &leaked), &[]).await.status, 401);
        assert_eq!(
            try_ws(hub.public, &format!("?token={leaked}"), &[])
                .await
                .err(),
            Some(401)
        );
        assert_eq!(
            hub.metric("hub_connections_closed_total{transport=\"sse\",reason=\"revoked\"}")
                .await,
            1.0
        );
    }
    assert_eq!(
        a.metric("hub_connections_closed_total{transport=\"ws\",reason=\"revoked\"}")
            .await,
        1.0
    );
    // A node that starts later (a restarted one is such a node) reads it from Redis.
    let c = Hub::start(&[("HUB_REDIS_URL", &redis.url()), ("HUB_JWT_SECRET", SECRET)]).await;
    c.wait_ready(WAIT).await;
    assert_eq!(c.sse(&q(&room, &leaked), &[]).await.status, 401);
    assert_eq!(
        try_ws(c.public, &format!("?token={leaked}"), &[])
            .await
            .err(),
        Some(401)
    );

    // A node that was away from Redis reads the revocations again when it comes back: one
    // written to Redis while its control message never reached anyone (as when every node
    // was away) is refused after the subscribers reconnect, and its streams end.
    let quiet = hs256(json!({"sub": "9", "exp": exp, "jti": "quiet", "channels": ["room:*"]}));
    let (mut s_quiet, _) = a.connect(&q(&room, &quiet), &[]).await;
    let field = json!({"by": "jti", "jti": "quiet", "until": exp}).to_string();
    redis.cli(&["HSET", "hub:revoked", "j:quiet", &field]);
    let (s, _) = b.connect(&q(&room, &quiet), &[]).await;
    drop(s);
    redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    ends_with(&mut s_quiet, "revoked").await;
    for hub in [&a, &b] {
        wait_until("the quiet revocation is read", WAIT, || async {
            hub.sse(&q(&room, &quiet), &[]).await.status == 401
        })
        .await;
    }

    let (status, _) = delete(&b, "/v1/revoke", json!({"jti": "leak-1", "exp": exp})).await;
    assert_eq!(status, 202);
    for hub in [&a, &b, &c] {
        wait_until("the lifted token passes", WAIT, || async {
            hub.sse(&q(&room, &leaked), &[]).await.status == 200
        })
        .await;
    }
    drop(kept);
}

/// `sub` + `before`: tokens of that user issued before the instant, or without `iat`, are
/// refused and their streams end; one issued at or after it passes; other users are untouched.
#[tokio::test]
async fn revoking_a_user_before_an_instant_spares_newer_tokens_and_other_users() {
    let redis = Redis::start();
    let (a, b) = two_nodes(&redis).await;
    let room = format!("room:rs{}", std::process::id());
    let exp = now() + 3600;
    let cut = now();
    let tok = |sub: &str, iat: Option<u64>| match iat {
        Some(iat) => hs256(json!({"sub": sub, "exp": exp, "iat": iat, "channels": ["room:*"]})),
        None => hs256(json!({"sub": sub, "exp": exp, "channels": ["room:*"]})),
    };
    let old = tok("5", Some(cut - 60));
    let no_iat = tok("5", None);
    let newer = tok("5", Some(cut));
    let someone = tok("6", Some(cut - 60));
    let (mut s_old, _) = a.connect(&q(&room, &old), &[]).await;
    let (mut s_no_iat, _) = b.connect(&q(&room, &no_iat), &[]).await;
    let (mut s_newer, _) = b.connect(&q(&room, &newer), &[]).await;
    let (mut s_other, _) = a.connect(&q(&room, &someone), &[]).await;

    let (status, _) = post(&b, "/v1/revoke", json!({"sub": "5", "before": cut})).await;
    assert_eq!(status, 202);
    ends_with(&mut s_old, "revoked").await;
    ends_with(&mut s_no_iat, "revoked").await;
    still_open(&a, &mut s_newer, &room).await;
    still_open(&a, &mut s_other, &room).await;
    for hub in [&a, &b] {
        assert_eq!(hub.sse(&q(&room, &old), &[]).await.status, 401);
        assert_eq!(hub.sse(&q(&room, &no_iat), &[]).await.status, 401);
    }
    let (s, _) = a.connect(&q(&room, &newer), &[]).await;
    drop(s);
    let (status, _) = delete(&a, "/v1/revoke", json!({"sub": "5", "before": cut})).await;
    assert_eq!(status, 202);
    wait_until("the lifted user passes", WAIT, || async {
        b.sse(&q(&room, &old), &[]).await.status == 200
    })
    .await;
}

/// The same on the embedded broker: in memory, applied at once.
#[tokio::test]
async fn the_embedded_broker_disconnects_and_revokes_too() {
    let hub = Hub::start(&[("HUB_JWT_SECRET", SECRET)]).await;
    let room = format!("room:emb{}", std::process::id());
    let t = hs256(json!({"sub": "1", "exp": now() + 600, "jti": "j1", "channels": ["room:*"]}));
    let (mut s, _) = hub.connect(&q(&room, &t), &[]).await;
    let (status, _) = post(&hub, "/v1/disconnect", json!({"channel": room})).await;
    assert_eq!(status, 202);
    ends_with(&mut s, "disconnected").await;
    let (mut s, _) = hub.connect(&q(&room, &t), &[]).await;
    let (status, _) = post(&hub, "/v1/revoke", json!({"jti": "j1", "exp": now() + 600})).await;
    assert_eq!(status, 202);
    ends_with(&mut s, "revoked").await;
    assert_eq!(hub.sse(&q(&room, &t), &[]).await.status, 401);
    let (status, _) = delete(&hub, "/v1/revoke", json!({"jti": "j1"})).await;
    assert_eq!(status, 202);
    let (s, _) = hub.connect(&q(&room, &t), &[]).await;
    drop(s);
    // A WebSocket whose token is revoked after it opened (by sub, without iat).
    let mut ws = try_ws(hub.public, &format!("?token={t}"), &[])
        .await
        .unwrap();
    send(&mut ws, json!({"op": "subscribe", "channel": room})).await;
    assert_eq!(next(&mut ws).await["type"], "subscribed");
    let (status, _) = post(&hub, "/v1/revoke", json!({"sub": "1", "before": now()})).await;
    assert_eq!(status, 202);
    let frame = tokio::time::timeout(WITHIN, next(&mut ws)).await.unwrap();
    assert_eq!(frame["code"], 4000, "{frame}");
    assert_eq!(
        hub.metric("hub_connections_closed_total{transport=\"ws\",reason=\"revoked\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn bad_control_bodies_get_a_json_error() {
    let hub = Hub::start(&[("HUB_JWT_SECRET", SECRET)]).await;
    let cases: &[(reqwest::Method, &str, String, u16)] = &[
        (reqwest::Method::POST, "/v1/disconnect", "{".into(), 400),
        (reqwest::Method::POST, "/v1/disconnect", "{}".into(), 400),
        (
            reqwest::Method::POST,
            "/v1/disconnect",
            r#"{"sub":"1","channel":"a"}"#.into(),
            400,
        ),
        (
            reqwest::Method::POST,
            "/v1/disconnect",
            r#"{"sub":"1","why":"x"}"#.into(),
            400,
        ),
        (
            reqwest::Method::POST,
            "/v1/disconnect",
            r#"{"connection_id":"nope"}"#.into(),
            400,
        ),
        (
            reqwest::Method::POST,
            "/v1/disconnect",
            r#"{"channel":"bad name"}"#.into(),
            400,
        ),
        (
            reqwest::Method::POST,
            "/v1/disconnect",
            json!({"sub": "1", "reason": "x".repeat(65)}).to_string(),
            400,
        ),
        (
            reqwest::Method::POST,
            "/v1/disconnect",
            json!({"sub": "1", "reason": "é".repeat(64)}).to_string(),
            202,
        ),
        (
            reqwest::Method::POST,
            "/v1/disconnect",
            json!({"sub": "x".repeat(10_000)}).to_string(),
            413,
        ),
        (
            reqwest::Method::POST,
            "/v1/revoke",
            r#"{"jti":"a"}"#.into(),
            400,
        ),
        (
            reqwest::Method::POST,
            "/v1/revoke",
            r#"{"sub":"a"}"#.into(),
            400,
        ),
        (
            reqwest::Method::POST,
            "/v1/revoke",
            r#"{"jti":"a","exp":1,"sub":"b"}"#.into(),
            400,
        ),
        (
            reqwest::Method::POST,
            "/v1/revoke",
            r#"{"jti":"a","exp":"soon"}"#.into(),
            400,
        ),
        (
            reqwest::Method::POST,
            "/v1/revoke",
            r#"{"jti":"a","exp":1,"x":1}"#.into(),
            400,
        ),
        (
            reqwest::Method::DELETE,
            "/v1/revoke",
            r#"{"jti":"never-revoked"}"#.into(),
            202,
        ),
        (reqwest::Method::PUT, "/v1/revoke", "{}".into(), 405),
    ];
    for (method, path, body, want) in cases {
        let (status, v) = call(&hub, method.clone(), path, body).await;
        assert_eq!(status, *want, "{method} {path} {body}: {v}");
        if *want >= 400 {
            assert!(v["error"].is_string() && v["message"].is_string(), "{v}");
        }
    }
    // The publish key guards control as it guards publishing.
    let keyed = Hub::start(&[("HUB_JWT_SECRET", SECRET), ("HUB_PUBLISH_KEY", "k3y")]).await;
    let (status, _) = post(&keyed, "/v1/disconnect", json!({"sub": "1"})).await;
    assert_eq!(status, 401);
    let res = keyed
        .http
        .post(keyed.admin_url("/v1/revoke"))
        .bearer_auth("k3y")
        .json(&json!({"sub": "1", "before": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 202);
}

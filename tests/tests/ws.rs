//! `GET /v1/ws` against a real hub with a real WebSocket client: subscribe/unsubscribe, one
//! message reaching SSE and WebSocket subscribers alike, resume with `since`, bad frames
//! (answered, socket kept), oversized frames, tokens, Origin, limits, pings, stale sockets,
//! and token expiry.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use futures_util::{SinkExt, StreamExt};
use hub_tests::client::{next, send, subscribe, token, try_ws, Ws, SECRET};
use hub_tests::{prefix, Hub, WAIT};
use serde_json::json;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

async fn ws(hub: &Hub) -> Ws {
    try_ws(hub.public, "", &[]).await.unwrap()
}

#[tokio::test]
async fn subscribe_unsubscribe_and_one_message_to_sse_and_ws() {
    let hub = Hub::start(&[]).await;
    let p = prefix("ws");
    let (a, b) = (format!("{p}.a"), format!("{p}.b"));
    let mut w = ws(&hub).await;
    subscribe(&mut w, &a).await;
    let (mut sse, _) = hub.connect(&format!("channel={a}"), &[]).await;
    let id = hub.publish(&a, Some("chat"), json!({"t": 1}), true).await;
    assert_eq!(
        next(&mut w).await,
        json!({"type": "message", "channel": a, "id": id, "event": "chat", "data": {"t": 1}})
    );
    let m = sse.next_message(WAIT).await.unwrap();
    assert_eq!(
        (m.id.as_deref(), m.data.as_str()),
        (Some(id.as_str()), r#"{"t":1}"#)
    );
    assert_eq!(hub.metric(r#"hub_connections{transport="ws"}"#).await, 1.0);
    // After unsubscribing, a's messages stop; b's still come.
    send(&mut w, json!({"op": "unsubscribe", "channel": a})).await;
    assert_eq!(
        next(&mut w).await,
        json!({"type": "unsubscribed", "channel": a})
    );
    subscribe(&mut w, &b).await;
    hub.publish(&a, None, json!("not for ws"), true).await;
    hub.publish(&b, None, json!("for ws"), false).await;
    let m = next(&mut w).await;
    assert_eq!(
        (m["channel"].as_str(), m["data"].as_str()),
        (Some(b.as_str()), Some("for ws"))
    );
    assert_eq!(sse.next_message(WAIT).await.unwrap().data, "not for ws");
    drop(w);
    hub.wait_metric(r#"hub_connections{transport="ws"}"#, 0.0, WAIT)
        .await;
    assert_eq!(
        hub.metric(r#"hub_connections_closed_total{transport="ws",reason="client"}"#)
            .await,
        1.0
    );
}

#[tokio::test]
async fn resume_with_since() {
    let hub = Hub::start(&[]).await;
    let ch = prefix("since");
    let ids: Vec<String> = {
        let mut v = Vec::new();
        for i in 0..3 {
            v.push(hub.publish(&ch, None, json!(i), true).await);
        }
        v
    };
    let mut w = ws(&hub).await;
    send(
        &mut w,
        json!({"op": "subscribe", "channel": ch, "since": ids[0]}),
    )
    .await;
    assert_eq!(next(&mut w).await["type"], "subscribed");
    assert_eq!(next(&mut w).await["id"], ids[1].as_str());
    assert_eq!(next(&mut w).await["id"], ids[2].as_str());
    let live = hub.publish(&ch, None, json!("live"), true).await;
    assert_eq!(
        next(&mut w).await["id"],
        live.as_str(),
        "no duplicates before live"
    );
    // An unreadable position is a reset.
    let mut w2 = ws(&hub).await;
    send(
        &mut w2,
        json!({"op": "subscribe", "channel": ch, "since": "garbage"}),
    )
    .await;
    assert_eq!(next(&mut w2).await["type"], "subscribed");
    assert_eq!(next(&mut w2).await, json!({"type": "reset", "channel": ch}));
}

#[tokio::test]
async fn bad_frames_get_errors_and_the_socket_stays_open() {
    let hub = Hub::start(&[("HUB_MAX_CHANNELS_PER_CONN", "2")]).await;
    let p = prefix("bad");
    let mut w = ws(&hub).await;
    for (frame, channel) in [
        ("junk".to_string(), None),
        (json!({"op": "subscribe"}).to_string(), None),
        (
            json!({"op": "dance", "channel": "public:a"}).to_string(),
            Some("public:a"),
        ),
        (
            json!({"op": "subscribe", "channel": "bad name"}).to_string(),
            Some("bad name"),
        ),
    ] {
        w.send(Message::text(frame.clone())).await.unwrap();
        let e = next(&mut w).await;
        assert_eq!(
            (e["type"].as_str(), e["code"].as_u64()),
            (Some("error"), Some(400)),
            "{frame}"
        );
        assert_eq!(e["channel"].as_str(), channel, "{frame}");
    }
    w.send(Message::binary(vec![1, 2, 3])).await.unwrap();
    assert_eq!(next(&mut w).await["code"], 400);
    subscribe(&mut w, &format!("{p}.1")).await;
    subscribe(&mut w, &format!("{p}.2")).await;
    send(
        &mut w,
        json!({"op": "subscribe", "channel": format!("{p}.3")}),
    )
    .await;
    assert_eq!(next(&mut w).await["code"], 400, "HUB_MAX_CHANNELS_PER_CONN");
    // Still open and working.
    hub.publish(&format!("{p}.2"), None, json!("ok"), true)
        .await;
    assert_eq!(next(&mut w).await["data"], "ok");
    // An oversized frame is refused and the socket closed.
    w.send(Message::text("x".repeat(10_000))).await.unwrap();
    let e = next(&mut w).await;
    assert_eq!(e["code"], 413);
    let end = tokio::time::timeout(WAIT, w.next()).await.unwrap();
    assert!(
        matches!(end, Some(Ok(Message::Close(_))) | None | Some(Err(_))),
        "{end:?}"
    );
}

#[tokio::test]
async fn tokens_origin_and_limits() {
    let hub = Hub::start(&[
        ("HUB_JWT_SECRET", SECRET),
        ("HUB_ALLOWED_ORIGINS", "https://app.example"),
        ("HUB_MAX_CONNECTIONS_PER_USER", "1"),
    ])
    .await;
    // Without a token: public only.
    let mut anon = ws(&hub).await;
    send(&mut anon, json!({"op": "subscribe", "channel": "room:1"})).await;
    assert_eq!(
        next(&mut anon).await,
        json!({"type": "error", "code": 401, "message": "this channel needs a token, given at the upgrade", "channel": "room:1"})
    );
    subscribe(&mut anon, "public:x").await;
    // With a token (query or header): its grants.
    let t = token("u1", &["room:*"], 600);
    let mut w = try_ws(hub.public, &format!("?token={t}"), &[])
        .await
        .unwrap();
    subscribe(&mut w, "room:1").await;
    subscribe(&mut w, "user:u1").await;
    send(&mut w, json!({"op": "subscribe", "channel": "secret"})).await;
    assert_eq!(next(&mut w).await["code"], 403);
    // Per-user limit: a second socket of u1 is 429; another user is fine.
    let bearer = format!("Bearer {t}");
    assert_eq!(
        try_ws(hub.public, "", &[("Authorization", bearer.as_str())])
            .await
            .err(),
        Some(429)
    );
    let t2 = token("u2", &[], 600);
    assert!(try_ws(hub.public, &format!("?token={t2}"), &[])
        .await
        .is_ok());
    // Bad token at the upgrade: 401. Origin: another one 403, the allowed one and none fine.
    assert_eq!(
        try_ws(hub.public, "?token=junk", &[]).await.err(),
        Some(401)
    );
    assert_eq!(
        try_ws(hub.public, "", &[("Origin", "https://evil.example")])
            .await
            .err(),
        Some(403)
    );
    assert!(try_ws(hub.public, "", &[("Origin", "https://app.example")])
        .await
        .is_ok());
}

#[tokio::test]
async fn the_node_limit_counts_websockets() {
    let hub = Hub::start(&[("HUB_MAX_CONNECTIONS", "2")]).await;
    let _w = ws(&hub).await;
    let (_s, _) = hub
        .connect(&format!("channel={}", prefix("lim")), &[])
        .await;
    assert_eq!(try_ws(hub.public, "", &[]).await.err(), Some(503));
    assert_eq!(
        hub.sse(&format!("channel={}", prefix("lim")), &[])
            .await
            .status,
        503
    );
}

#[tokio::test]
async fn pings_every_heartbeat_and_silent_sockets_are_stale() {
    let hub = Hub::start(&[("HUB_HEARTBEAT_SECS", "1"), ("HUB_STALE_AFTER_SECS", "3")]).await;
    let ch = prefix("ping");
    let mut reader = ws(&hub).await;
    subscribe(&mut reader, &ch).await;
    // A socket that never reads never answers a ping.
    let _silent = ws(&hub).await;
    hub.wait_metric(r#"hub_connections{transport="ws"}"#, 2.0, WAIT)
        .await;
    let mut pings = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
    while tokio::time::Instant::now() < deadline {
        if let Ok(Some(Ok(Message::Ping(_)))) =
            tokio::time::timeout_at(deadline, reader.next()).await
        {
            pings += 1;
        }
    }
    assert!(pings >= 3, "one ping per heartbeat, got {pings}");
    hub.wait_metric(
        r#"hub_connections_closed_total{transport="ws",reason="stale"}"#,
        1.0,
        WAIT,
    )
    .await;
    assert_eq!(
        hub.metric(r#"hub_connections{transport="ws"}"#).await,
        1.0,
        "the reader answered and stays"
    );
    hub.publish(&ch, None, json!("still"), true).await;
    assert_eq!(next(&mut reader).await["data"], "still");
}

#[tokio::test]
async fn an_expired_token_ends_the_socket_with_an_error_frame() {
    let hub = Hub::start(&[("HUB_JWT_SECRET", SECRET)]).await;
    let t = token("u9", &["room:*"], 2);
    let mut w = try_ws(hub.public, &format!("?token={t}"), &[])
        .await
        .unwrap();
    subscribe(&mut w, "room:9").await;
    let e = next(&mut w).await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_u64()),
        (Some("error"), Some(401))
    );
    let end = tokio::time::timeout(WAIT, w.next()).await.unwrap();
    assert!(matches!(end, Some(Ok(Message::Close(_))) | None), "{end:?}");
    assert_eq!(
        hub.metric(r#"hub_connections_closed_total{transport="ws",reason="token_expired"}"#)
            .await,
        1.0
    );
}

#[tokio::test]
async fn sigterm_closes_websockets_as_a_restart() {
    let mut hub = Hub::start(&[("HUB_DRAIN_SECS", "1")]).await;
    let mut w = ws(&hub).await;
    subscribe(&mut w, &prefix("drain")).await;
    hub.terminate();
    let end = loop {
        match tokio::time::timeout(WAIT, w.next()).await.unwrap() {
            Some(Ok(Message::Ping(_))) => continue,
            other => break other,
        }
    };
    match end {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 1012),
        other => panic!("expected a close frame with 1012, got {other:?}"),
    }
    assert_eq!(hub.wait_exit(Duration::from_secs(10)).await.code(), Some(0));
}

#[tokio::test]
async fn repeated_resumes_on_one_socket_are_rate_limited() {
    let hub = Hub::start(&[]).await;
    let ch = prefix("resumes");
    let first = hub.publish(&ch, None, json!(0), true).await;
    hub.publish(&ch, None, json!(1), true).await;
    let mut w = ws(&hub).await;
    // 40 subscribe/unsubscribe rounds with an old `since`, sent as fast as the socket takes them.
    for _ in 0..40 {
        send(
            &mut w,
            json!({"op": "subscribe", "channel": ch, "since": first}),
        )
        .await;
        send(&mut w, json!({"op": "unsubscribe", "channel": ch})).await;
    }
    let (mut subscribed, mut limited) = (0, 0);
    while subscribed + limited < 40 {
        let f = next(&mut w).await;
        match f["type"].as_str() {
            Some("subscribed") => subscribed += 1,
            Some("error") => {
                assert_eq!(f["code"], 429, "{f}");
                limited += 1;
            }
            _ => {}
        }
    }
    assert!(limited > 0, "some were refused");
    assert!(subscribed >= 16, "a burst of 16 is allowed: {subscribed}");
    // A subscribe without `since` reads no history and is never limited.
    send(&mut w, json!({"op": "subscribe", "channel": ch})).await;
    loop {
        let f = next(&mut w).await;
        if f["type"] == "subscribed" {
            break;
        }
    }
}

#[tokio::test]
async fn a_socket_that_stops_reading_while_messages_flow_gets_every_frame_whole_and_in_order() {
    // While the client keeps up, the fan-out writes its frames to the socket itself; once the
    // socket is full, the rest is queued (a frame cut at the socket's edge is finished first)
    // and, past the queue, caught up from history; the client's pings are answered in between.
    // A frame cut, interleaved with a pong, or repeated would break the client's parsing or
    // the order checked here. Rounds: each fills the socket once more (frames of 16 KB, so
    // that the socket takes one in part when it is nearly full), then reads it all.
    let hub = Hub::start(&[("HUB_HISTORY_LEN", "5000")]).await;
    let ch = format!("{}.flow", prefix("ws"));
    let mut w = ws(&hub).await;
    subscribe(&mut w, &ch).await;
    let pad = "x".repeat(16_000);
    let (per_round, rounds) = (40, 6);
    let (mut got, mut pongs) = (0, 0);
    for round in 0..rounds {
        for i in round * per_round..(round + 1) * per_round {
            hub.publish(&ch, None, json!(format!("{i:04}{pad}")), true)
                .await;
            if i % 10 == 0 {
                w.send(Message::Ping(vec![1, 2, 3].into())).await.unwrap();
            }
        }
        while got < (round + 1) * per_round {
            let m = tokio::time::timeout(WAIT, w.next())
                .await
                .unwrap_or_else(|_| panic!("frame {got} in time"))
                .expect("socket open")
                .expect("a whole frame");
            match m {
                Message::Text(t) => {
                    let v: serde_json::Value = serde_json::from_str(&t).expect("JSON frame");
                    let data = v["data"].as_str().expect("data");
                    assert_eq!(data, format!("{got:04}{pad}"), "frame {got}");
                    got += 1;
                }
                Message::Pong(p) => {
                    assert_eq!(&p[..], [1, 2, 3]);
                    pongs += 1;
                }
                Message::Ping(_) => {}
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }
    assert!(pongs >= 1, "the client's pings were answered");
    // Live again afterwards.
    hub.publish(&ch, None, json!("after"), false).await;
    assert_eq!(next(&mut w).await["data"], "after");
}

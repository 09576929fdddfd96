//! WebSocket token refresh: `{"op":"refresh","token":"<jwt>"}` replaces the socket's token (same
//! `sub`), answered `refreshed` with the new expiry; the socket outlives the old token; channels
//! the new token no longer grants are unsubscribed with an error frame 403; a bad token, another
//! `sub`, or an anonymous socket get an error frame and the old expiry still stands.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use futures_util::StreamExt;
use hub_tests::client::{next, now, send, subscribe, token, try_ws, Ws, SECRET};
use hub_tests::{wait_until, Hub, WAIT};
use serde_json::{json, Value};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

async fn refresh(w: &mut Ws, t: &str) -> Value {
    send(w, json!({"op": "refresh", "token": t})).await;
    next(w).await
}

fn error_code(v: &Value) -> Option<u64> {
    (v["type"] == "error").then(|| v["code"].as_u64()).flatten()
}

/// Waits until the Unix clock passed `t` (an expiry), bounded.
async fn past(t: u64) {
    wait_until("the old expiry passes", Duration::from_secs(10), || async {
        now() > t
    })
    .await;
}

#[tokio::test]
async fn a_refreshed_socket_outlives_its_first_token_and_loses_what_the_new_one_does_not_grant() {
    let hub = Hub::start(&[("HUB_JWT_SECRET", SECRET)]).await;
    let old_exp = now() + 2;
    let first = token("u1", &["room:*", "news"], 2);
    let mut w = try_ws(hub.public, &format!("?token={first}"), &[])
        .await
        .unwrap();
    subscribe(&mut w, "room:1").await;
    subscribe(&mut w, "news").await;

    let fresh = token("u1", &["room:*"], 3600);
    let answer = refresh(&mut w, &fresh).await;
    assert_eq!(answer["type"], "refreshed", "{answer}");
    let exp = answer["exp"].as_u64().unwrap();
    assert!(exp >= now() + 3500, "{answer}");
    let dropped = next(&mut w).await;
    assert_eq!(error_code(&dropped), Some(403), "{dropped}");
    assert_eq!(dropped["channel"], "news");

    past(old_exp + 1).await;
    hub.publish("news", None, json!("not for you"), true).await;
    hub.publish("room:1", None, json!("still here"), true).await;
    let m = next(&mut w).await;
    assert_eq!(
        (m["channel"].as_str(), m["data"].as_str()),
        (Some("room:1"), Some("still here")),
        "{m}"
    );
    // A channel the new token grants can be subscribed; one it does not, not.
    subscribe(&mut w, "room:2").await;
    send(&mut w, json!({"op": "subscribe", "channel": "news"})).await;
    assert_eq!(error_code(&next(&mut w).await), Some(403));
    assert_eq!(
        hub.metric(r#"hub_connections_closed_total{transport="ws",reason="token_expired"}"#)
            .await,
        0.0
    );
}

#[tokio::test]
async fn a_refused_refresh_leaves_the_old_token_and_its_expiry() {
    let hub = Hub::start(&[("HUB_JWT_SECRET", SECRET)]).await;
    let first = token("u2", &["room:*"], 3);
    let mut w = try_ws(hub.public, &format!("?token={first}"), &[])
        .await
        .unwrap();
    subscribe(&mut w, "room:1").await;
    // Another sub: 403. An expired or badly signed token: 401. No token: 400.
    let other = refresh(&mut w, &token("someone-else", &["room:*"], 3600)).await;
    assert_eq!(error_code(&other), Some(403), "{other}");
    let expired = refresh(&mut w, &token("u2", &["room:*"], -10)).await;
    assert_eq!(error_code(&expired), Some(401), "{expired}");
    let forged = refresh(&mut w, &format!("{}x", token("u2", &["room:*"], 3600))).await;
    assert_eq!(error_code(&forged), Some(401), "{forged}");
    send(&mut w, json!({"op": "refresh"})).await;
    assert_eq!(error_code(&next(&mut w).await), Some(400));
    // Still open and reading.
    hub.publish("room:1", None, json!("open"), true).await;
    assert_eq!(next(&mut w).await["data"], "open");
    // The old expiry still stands: 401 and a close when it comes.
    let e = next(&mut w).await;
    assert_eq!(error_code(&e), Some(401), "{e}");
    let end = loop {
        match tokio::time::timeout(WAIT, w.next()).await.unwrap() {
            Some(Ok(Message::Ping(_))) => continue,
            other => break other,
        }
    };
    assert!(matches!(end, Some(Ok(Message::Close(_))) | None), "{end:?}");
}

#[tokio::test]
async fn an_anonymous_socket_cannot_refresh_and_refreshes_are_rate_limited() {
    let hub = Hub::start(&[("HUB_JWT_SECRET", SECRET)]).await;
    let mut anon = try_ws(hub.public, "", &[]).await.unwrap();
    let a = refresh(&mut anon, &token("u3", &["*"], 3600)).await;
    assert_eq!(error_code(&a), Some(403), "{a}");

    let mut w = try_ws(
        hub.public,
        &format!("?token={}", token("u4", &["*"], 3600)),
        &[],
    )
    .await
    .unwrap();
    let t = token("u4", &["*"], 3600);
    let mut codes = Vec::new();
    for _ in 0..6 {
        let r = refresh(&mut w, &t).await;
        codes.push(error_code(&r).unwrap_or(0));
    }
    // A burst of 4, then 429.
    assert_eq!(codes, [0, 0, 0, 0, 429, 429], "{codes:?}");
}

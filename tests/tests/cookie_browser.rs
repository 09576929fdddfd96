//! The cookie flow in a real browser: a page on another origin opens
//! `new EventSource(url, {withCredentials: true})` to a protected channel with no token in the
//! URL; the hub takes the token from the cookie `HUB_JWT_COOKIE` names. The page renews the
//! cookie before each token expires; the hub closes each stream at its token's expiry
//! (`hub.reconnect` token_expired) and EventSource's own reconnect carries the renewed cookie
//! and `Last-Event-ID`, so the page gets every message once, in order, across the expiries.
//! Default heartbeat and retry.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use hub_tests::browser::{page_server, Chromium, Reports};
use hub_tests::client::{hs256, now, SECRET};
use hub_tests::{wait_until, Hub};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// Seconds each token lives past the previous one's expiry; the page renews its cookie every
/// half of that, so the cookie always holds a token valid for a while.
const STEP: u64 = 4;

const PAGE: &str = r#"<!doctype html>
<meta charset="utf-8">
<script>
const tokens = __TOKENS__;
let k = 0;
function renew() { document.cookie = "hub_token=" + tokens[Math.min(k++, tokens.length - 1)] + "; path=/"; }
renew();
setInterval(renew, __RENEW_MS__);
let n = 0;
function report(kind, data) {
  fetch("/report", {method: "POST", body: JSON.stringify({n: n++, kind, data})});
}
const es = new EventSource("__URL__", {withCredentials: true});
es.addEventListener("hub.connected", e => report("connected", e.data));
es.addEventListener("hub.reconnect", e => report("reconnect", e.data));
es.onmessage = e => report("message", e.data);
es.onerror = () => report("error", String(es.readyState));
</script>
"#;

fn reports_of(reports: &Reports, kind: &str) -> Vec<Value> {
    let mut all = reports.lock().unwrap().clone();
    all.sort_by_key(|r| r["n"].as_u64());
    all.into_iter()
        .filter(|r| r["kind"] == kind)
        .map(|r| r["data"].clone())
        .collect()
}

#[tokio::test]
async fn a_renewed_cookie_keeps_a_cross_origin_eventsource_across_token_expiries() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", listener.local_addr().unwrap());
    let hub = Hub::start(&[
        ("HUB_JWT_SECRET", SECRET),
        ("HUB_JWT_COOKIE", "hub_token"),
        ("HUB_ALLOWED_ORIGINS", &origin),
    ])
    .await;
    // A named origin gets credentials CORS.
    let s = hub
        .sse("channel=public:cors", &[("origin", origin.as_str())])
        .await;
    assert_eq!(
        s.header("access-control-allow-origin"),
        Some(origin.as_str())
    );
    assert_eq!(s.header("access-control-allow-credentials"), Some("true"));
    drop(s);

    let channel = format!("room:cookie{}", std::process::id());
    let t0 = now();
    let tokens: Vec<String> = (1..=12)
        .map(|k| hs256(json!({"sub": "c1", "exp": t0 + STEP * k, "channels": ["room:*"]})))
        .collect();
    let page = PAGE
        .replace("__TOKENS__", &serde_json::to_string(&tokens).unwrap())
        .replace("__RENEW_MS__", &(STEP * 1000 / 2).to_string())
        .replace("__URL__", &hub.url(&format!("/v1/sse?channel={channel}")));
    let reports: Reports = Arc::default();
    let server = tokio::spawn(page_server(listener, page, reports.clone()));
    let _browser = Chromium::open(&format!("{origin}/"), &[]);
    wait_until(
        "the page's stream opens",
        Duration::from_secs(30),
        || async { !reports_of(&reports, "connected").is_empty() },
    )
    .await;

    // Publish across at least two expiries (and EventSource's default 2 s retry after each).
    let total = 60;
    for i in 0..total {
        hub.publish(&channel, None, json!(format!("m{i}")), true)
            .await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    wait_until(
        "the page got the last message",
        Duration::from_secs(20),
        || async {
            reports_of(&reports, "message")
                .last()
                .is_some_and(|m| *m == json!(format!("m{}", total - 1)))
        },
    )
    .await;
    let got: Vec<String> = reports_of(&reports, "message")
        .into_iter()
        .map(|m| m.as_str().unwrap().to_string())
        .collect();
    let want: Vec<String> = (0..total).map(|i| format!("m{i}")).collect();
    assert_eq!(got, want, "every message once, in order");
    let expiries = reports_of(&reports, "reconnect")
        .iter()
        .filter(|r| {
            serde_json::from_str::<Value>(r.as_str().unwrap()).unwrap()["reason"] == "token_expired"
        })
        .count();
    assert!(expiries >= 2, "{:?}", reports.lock().unwrap());
    assert!(
        reports_of(&reports, "connected").len() > expiries,
        "each expiry was followed by a new stream"
    );
    assert!(
        !reports_of(&reports, "error").contains(&json!("2")),
        "the EventSource never closed for good"
    );
    assert_eq!(
        hub.metric("hub_connections_rejected_total{reason=\"unauthorized\"}")
            .await,
        0.0,
        "every reconnect carried a valid cookie"
    );
    server.abort();
}

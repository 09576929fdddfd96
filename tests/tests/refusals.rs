//! Refusals an EventSource survives (issue 21): a browser's EventSource closes for good on any
//! answer but 200, so a stream request with `Accept: text/event-stream` refused for a reason
//! that passes (full node, per-user limit, draining, Redis away) gets a 200 with `retry:` and
//! one `hub.reconnect`, then the end; other clients keep the status. Checked with raw clients
//! on both of the public port's readers (the front, and actix for what the front hands over),
//! then with a real EventSource in headless Chromium, which must keep retrying by itself and
//! connect once a place frees or Redis returns.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use hub_tests::browser::{page_server, Chromium, Reports};
use hub_tests::client::{token, SECRET};
use hub_tests::{free_port, prefix, wait_until, Hub, Redis, SseEvent, SseStream, WAIT};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

const EVENT_STREAM: (&str, &str) = ("Accept", "text/event-stream");
const OPENED: &str = r#"hub_connections_opened_total{transport="sse"}"#;

fn rejected(reason: &str) -> String {
    format!(r#"hub_connections_rejected_total{{reason="{reason}"}}"#)
}

/// Headers enough that the front hands the request to actix-http (it reads at most 48).
fn many_headers() -> Vec<(String, String)> {
    (0..50)
        .map(|i| (format!("x-filler-{i}"), "1".to_string()))
        .collect()
}

/// Opens `n` raw streams on `channel` that are never read, and waits until the node holds
/// `total` streams: a drain closes one per tenth of a second, so many keep a node draining.
async fn hold(hub: &Hub, channel: &str, n: usize, total: u64) -> Vec<tokio::net::TcpStream> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let path = format!("/v1/sse?channel={channel}");
        held.push(hub_tests::raw_get(hub.public, &path, &[], None).await);
    }
    wait_until(&format!("{total} streams open"), WAIT, || async {
        hub.stats().await["connections"]["total"] == total
    })
    .await;
    held
}

/// Opens a stream that must be refused with a 200 telling the EventSource to come back:
/// returns its one event (after checking that the stream then ends).
async fn told_to_come_back(hub: &Hub, query: &str, extra: &[(&str, &str)]) -> SseEvent {
    let mut headers = vec![EVENT_STREAM];
    headers.extend_from_slice(extra);
    let mut s = SseStream::raw(hub.public, &format!("/v1/sse?{query}"), &headers, 65536).await;
    assert_eq!(
        s.status, 200,
        "an EventSource is never answered with a refusal status"
    );
    assert_eq!(s.header("content-type"), Some("text/event-stream"));
    let e = s.next_event(WAIT).await.expect("one event");
    assert_eq!(e.event, "hub.reconnect", "{e:?}");
    assert!(
        s.next_event(WAIT).await.is_none(),
        "then the end of the stream"
    );
    e
}

/// Checks the event's reason and that its `retry:` is the `Retry-After` jittered by up to 20%.
fn check(e: &SseEvent, reason: &str, retry_after_secs: u64) -> u64 {
    let v = e.json();
    assert_eq!(v["reason"], reason, "{v}");
    let retry = e.retry.expect("a retry: line");
    assert_eq!(v["retry_ms"].as_u64(), Some(retry), "{v}");
    let base = retry_after_secs * 1000;
    assert!(
        retry >= (base * 4 / 5).max(1000) && retry <= base * 6 / 5,
        "retry {retry} ms for a Retry-After of {retry_after_secs} s"
    );
    retry
}

#[tokio::test]
async fn a_passing_refusal_tells_an_eventsource_to_come_back_and_others_get_the_status() {
    let hub = Hub::start(&[
        ("HUB_JWT_SECRET", SECRET),
        ("HUB_MAX_CONNECTIONS", "2"),
        ("HUB_MAX_CONNECTIONS_PER_USER", "1"),
    ])
    .await;
    let ch = prefix("refused");
    let alice = format!("channel={ch}&token={}", token("alice", &[], 600));
    let (_held_by_alice, _) = hub.connect(&alice, &[]).await;

    // Her second stream: per-user limit, on the front and through actix.
    let e = told_to_come_back(&hub, &alice, &[]).await;
    check(&e, "user_limit", 5);
    let filler = many_headers();
    let filler: Vec<(&str, &str)> = filler
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let e = told_to_come_back(&hub, &alice, &filler).await;
    check(&e, "user_limit", 5);
    assert_eq!(hub.metric(&rejected("user_limit")).await, 2.0);
    // Without the Accept of an EventSource: the status, with Retry-After.
    let s = hub.sse(&alice, &[]).await;
    assert_eq!((s.status, s.header("retry-after")), (429, Some("5")));
    assert_eq!(hub.metric(&rejected("user_limit")).await, 3.0);

    // The node full: capacity, jittered so that browsers refused together spread out.
    let public = format!("channel={ch}");
    let (_second, _) = hub.connect(&public, &[]).await;
    let opened = hub.metric(OPENED).await;
    let mut retries = std::collections::BTreeSet::new();
    for _ in 0..12 {
        let e = told_to_come_back(&hub, &public, &[]).await;
        retries.insert(check(&e, "capacity", 5));
    }
    assert!(retries.len() >= 6, "retries spread: {retries:?}");
    let s = hub.sse(&public, &[]).await;
    assert_eq!((s.status, s.header("retry-after")), (503, Some("5")));
    assert_eq!(hub.metric(&rejected("capacity")).await, 13.0);
    assert_eq!(
        hub.metric(OPENED).await,
        opened,
        "a refusal is never counted as opened"
    );

    // Refusals that do not pass keep their status for an EventSource too.
    let bad = hub.sse("channel=bad%20name", &[EVENT_STREAM]).await;
    assert_eq!(bad.status, 400);
    let unauthorized = hub.sse("channel=room:1", &[EVENT_STREAM]).await;
    assert_eq!(unauthorized.status, 401);
}

#[tokio::test]
async fn a_draining_node_and_a_node_without_redis_tell_an_eventsource_to_come_back() {
    // Redis not there yet: the node starts, refuses streams as unavailable.
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}/");
    let mut hub = Hub::start(&[("HUB_REDIS_URL", url.as_str()), ("HUB_DRAIN_SECS", "30")]).await;
    let ch = prefix("away");
    let e = told_to_come_back(&hub, &format!("channel={ch}"), &[]).await;
    check(&e, "unavailable", 2);
    let s = hub.sse(&format!("channel={ch}"), &[]).await;
    assert_eq!((s.status, s.header("retry-after")), (503, Some("2")));

    let _redis = Redis::start_on(port);
    hub.wait_ready(WAIT).await;
    // Draining: 100 held streams keep it draining for 10 s (one closed per tenth of a second
    // over HUB_DRAIN_SECS=30); with fewer the drain is over at once.
    let held = hold(&hub, &ch, 100, 100).await;
    hub.terminate();
    wait_until("draining", WAIT, || async { !hub.is_ready().await }).await;
    let e = told_to_come_back(&hub, &format!("channel={ch}"), &[]).await;
    check(&e, "draining", 1);
    assert_eq!(hub.metric(&rejected("draining")).await, 1.0);
    assert_eq!(hub.metric(&rejected("unavailable")).await, 2.0);
    assert!(hub.wait_exit(Duration::from_secs(40)).await.success());
    drop(held);
}

const PAGE: &str = r#"<!doctype html>
<meta charset="utf-8">
<script>
let n = 0;
function report(kind, data) {
  fetch("/report", {method: "POST", body: JSON.stringify({n: n++, kind, data})});
}
const es = new EventSource("__URL__");
es.addEventListener("hub.connected", e => report("connected", e.data));
es.addEventListener("hub.reconnect", e => report("reconnect", e.data));
es.onmessage = e => report("message", e.data);
es.onerror = () => report("error", String(es.readyState));
</script>
"#;

/// A page that opens one EventSource to `url` and reports what it sees.
struct Page {
    reports: Reports,
    _browser: Chromium,
    server: tokio::task::JoinHandle<()>,
}

impl Page {
    async fn open(url: &str) -> Page {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin = format!("http://{}", listener.local_addr().unwrap());
        let reports: Reports = Arc::default();
        let server = tokio::spawn(page_server(
            listener,
            PAGE.replace("__URL__", url),
            reports.clone(),
        ));
        let browser = Chromium::open(&format!("{origin}/"), &[]);
        Page {
            reports,
            _browser: browser,
            server,
        }
    }

    fn of_kind(&self, kind: &str) -> Vec<Value> {
        let mut all = self.reports.lock().unwrap().clone();
        all.sort_by_key(|v| v["n"].as_u64().unwrap_or(0));
        all.into_iter().filter(|v| v["kind"] == kind).collect()
    }

    /// Waits for `n` reports of `kind` (a browser takes seconds to start).
    async fn wait(&self, kind: &str, n: usize, timeout: Duration) {
        wait_until(&format!("{n} {kind} reports"), timeout, || async {
            self.of_kind(kind).len() >= n
        })
        .await;
    }

    /// The page's EventSource never closed for good (readyState 2) after an error.
    fn never_closed(&self) {
        let errors = self.of_kind("error");
        assert!(
            errors.iter().all(|e| e["data"] != "2"),
            "the EventSource closed for good: {:?}",
            self.reports.lock().unwrap()
        );
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// The page was refused `reason` at least `times` times, by the hub's count and by its own
/// `hub.reconnect` reports, and keeps retrying by itself.
async fn refused_and_retrying(hub: &Hub, page: &Page, reason: &str, times: usize) {
    let deadline = Duration::from_secs(60);
    page.wait("reconnect", times, deadline).await;
    for r in page.of_kind("reconnect") {
        let v: Value = serde_json::from_str(r["data"].as_str().unwrap()).unwrap();
        assert_eq!(v["reason"], reason, "{v}");
    }
    assert!(hub.metric(&rejected(reason)).await >= times as f64);
    assert!(page.of_kind("connected").is_empty());
    page.never_closed();
}

/// Publishes until the page reports one message (it is subscribed once connected).
async fn delivered(hub: &Hub, page: &Page, channel: &str) {
    page.wait("connected", 1, Duration::from_secs(30)).await;
    hub.publish(channel, None, json!("hello"), true).await;
    page.wait("message", 1, WAIT).await;
    page.never_closed();
}

#[tokio::test]
async fn an_eventsource_in_chromium_refused_for_capacity_or_its_user_limit_connects_when_a_place_frees(
) {
    let hub = Hub::start(&[
        ("HUB_JWT_SECRET", SECRET),
        ("HUB_MAX_CONNECTIONS", "1"),
        ("HUB_MAX_CONNECTIONS_PER_USER", "1"),
    ])
    .await;
    // Capacity: the node's one place is held.
    let ch = prefix("es-capacity");
    let (held, _) = hub.connect(&format!("channel={ch}"), &[]).await;
    let page = Page::open(&hub.url(&format!("/v1/sse?channel={ch}"))).await;
    refused_and_retrying(&hub, &page, "capacity", 2).await;
    drop(held);
    delivered(&hub, &page, &ch).await;
    drop(page);
    wait_until("the page's stream released", WAIT, || async {
        hub.stats().await["connections"]["total"] == 0
    })
    .await;

    // The per-user limit: alice's one place is held by another of her tabs.
    let ch = prefix("es-user");
    let q = format!("channel={ch}&token={}", token("alice", &[], 600));
    let (held, _) = hub.connect(&q, &[]).await;
    let page = Page::open(&hub.url(&format!("/v1/sse?{q}"))).await;
    refused_and_retrying(&hub, &page, "user_limit", 2).await;
    drop(held);
    delivered(&hub, &page, &ch).await;
}

#[tokio::test]
async fn an_eventsource_in_chromium_survives_redis_away_and_a_draining_node() {
    // Fixed ports: the node that replaces the draining one comes back where the page points.
    let (public, admin) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}/");
    let env = |drain: &'static str| {
        vec![
            ("HUB_REDIS_URL", url.clone()),
            ("HUB_BIND", public.clone()),
            ("HUB_ADMIN_BIND", admin.clone()),
            ("HUB_DRAIN_SECS", drain.to_string()),
        ]
    };
    let start = |env: Vec<(&'static str, String)>| async move {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Hub::start(&env).await
    };
    // Redis away: refused as unavailable until it comes.
    let mut hub = start(env("30")).await;
    let ch = prefix("es-away");
    let first = Page::open(&hub.url(&format!("/v1/sse?channel={ch}"))).await;
    refused_and_retrying(&hub, &first, "unavailable", 2).await;
    let _redis = Redis::start_on(port);
    delivered(&hub, &first, &ch).await;

    // Draining: 300 held streams keep the node draining for 30 s (one closed per tenth of a
    // second). A page opened then is refused as draining and retries by itself; when the
    // node is gone, it goes on retrying until the node that replaces it takes it.
    let held = hold(&hub, &ch, 300, 301).await;
    hub.terminate();
    wait_until("draining", WAIT, || async { !hub.is_ready().await }).await;
    let second = Page::open(&hub.url(&format!("/v1/sse?channel={ch}"))).await;
    refused_and_retrying(&hub, &second, "draining", 2).await;
    assert!(hub.wait_exit(Duration::from_secs(60)).await.success());
    drop(held);
    let hub = start(env("1")).await;
    wait_until(
        "both pages on the new node",
        Duration::from_secs(30),
        || async { hub.stats().await["connections"]["total"] == 2 },
    )
    .await;
    hub.publish(&ch, None, json!("after the drain"), true).await;
    for page in [&first, &second] {
        wait_until("the message after the drain", WAIT, || async {
            page.of_kind("message")
                .iter()
                .any(|m| m["data"] == "after the drain")
        })
        .await;
        page.never_closed();
    }
}

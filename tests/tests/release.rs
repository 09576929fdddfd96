//! Streams are released the moment their client leaves: a closed SSE or WebSocket connection
//! frees its slot, counts, gauges and per-user place within 1 s; churn at the cap is never
//! refused; a user who reloads a page is not locked out; and a client that resets its
//! connection while its stream is being opened (Redis frozen at that await) leaves nothing.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use hub_tests::client::{token, try_ws, SECRET};
use hub_tests::{prefix, signal, wait_until, Hub, Redis, WAIT};
use std::time::{Duration, Instant};

const SSE: &str = r#"hub_connections{transport="sse"}"#;
const WS: &str = r#"hub_connections{transport="ws"}"#;
/// The contract: a stream whose client closes its connection is released within 1 s.
const RELEASE: Duration = Duration::from_secs(1);

/// Waits until the node holds `sse` SSE and `ws` WebSocket streams, by `deadline`.
async fn wait_open(hub: &Hub, sse: f64, ws: f64, deadline: Instant, what: &str) {
    let left = deadline.saturating_duration_since(Instant::now());
    wait_until(what, left, || async {
        let m = hub.metrics().await;
        hub_tests::metric_value(&m, SSE) == sse && hub_tests::metric_value(&m, WS) == ws
    })
    .await;
}

#[tokio::test]
async fn a_closed_stream_is_released_within_a_second() {
    // Heartbeats every 30 s (the default): nothing but the close itself can release them.
    let hub = Hub::start(&[
        ("HUB_JWT_SECRET", SECRET),
        ("HUB_MAX_CONNECTIONS_PER_USER", "3"),
    ])
    .await;
    let ch = prefix("release");
    let t = token("alice", &[], 600);
    let q = format!("channel={ch}&token={t}");
    let (a, _) = hub.connect(&q, &[]).await;
    let (b, _) = hub.connect(&q, &[]).await;
    let w = try_ws(hub.public, &format!("?token={t}"), &[])
        .await
        .unwrap();
    wait_open(&hub, 2.0, 1.0, Instant::now() + WAIT, "three streams").await;
    assert_eq!(hub.sse(&q, &[]).await.status, 429, "alice holds her 3");

    let closed = Instant::now();
    drop((a, b, w));
    wait_open(&hub, 0.0, 0.0, closed + RELEASE, "released within 1 s").await;
    assert_eq!(
        hub.metric(r#"hub_connections_closed_total{transport="sse",reason="client"}"#)
            .await,
        2.0
    );
    assert_eq!(
        hub.metric(r#"hub_connections_closed_total{transport="ws",reason="client"}"#)
            .await,
        1.0
    );
    // Her three places are hers again.
    let mut again = Vec::new();
    for _ in 0..3 {
        again.push(hub.connect(&q, &[]).await.0);
    }
    assert_eq!(hub.stats().await["connections"]["total"], 3);
}

/// At the default heartbeat, plain SSE and WebSocket streams whose client resets (RST) are
/// released within 1 s, like those that close.
#[tokio::test]
async fn a_reset_stream_is_released_within_a_second() {
    let hub = Hub::start(&[]).await;
    let ch = prefix("reset");
    let sse = raw_request(&hub, &format!("channel={ch}"), None).await;
    let ws = try_ws(hub.public, "", &[]).await.unwrap();
    wait_open(&hub, 1.0, 1.0, Instant::now() + WAIT, "two streams").await;
    let reset_at = Instant::now();
    reset(sse);
    match ws.into_inner() {
        tokio_tungstenite::MaybeTlsStream::Plain(c) => reset(c),
        _ => unreachable!("a plain ws:// connection"),
    }
    wait_open(&hub, 0.0, 0.0, reset_at + RELEASE, "released within 1 s").await;
}

#[tokio::test]
async fn churn_at_the_cap_is_never_refused() {
    let hub = Hub::start(&[("HUB_MAX_CONNECTIONS", "100")]).await;
    let ch = prefix("churn");
    let q = format!("channel={ch}");
    for round in 0..10 {
        let opened = futures_util::future::join_all((0..100).map(|_| hub.connect(&q, &[]))).await;
        wait_open(&hub, 100.0, 0.0, Instant::now() + WAIT, "100 open").await;
        let closed = Instant::now();
        drop(opened);
        wait_open(
            &hub,
            0.0,
            0.0,
            closed + RELEASE,
            &format!("round {round}: all 100 released within 1 s"),
        )
        .await;
    }
    assert_eq!(
        hub.metric(r#"hub_connections_rejected_total{reason="capacity"}"#)
            .await,
        0.0
    );
    assert_eq!(
        hub.metric(r#"hub_connections_opened_total{transport="sse"}"#)
            .await,
        1000.0
    );
    assert_eq!(
        hub.metric(r#"hub_connections_closed_total{transport="sse",reason="client"}"#)
            .await,
        1000.0
    );
}

#[tokio::test]
async fn a_user_who_reloads_ten_times_still_opens_three_streams() {
    let hub = Hub::start(&[
        ("HUB_JWT_SECRET", SECRET),
        ("HUB_MAX_CONNECTIONS_PER_USER", "3"),
    ])
    .await;
    let ch = prefix("reload");
    let q = format!("channel={ch}&token={}", token("bob", &[], 600));
    // A reload: the old page's EventSource closes, the new page opens one.
    let (mut page, _) = hub.connect(&q, &[]).await;
    for _ in 0..10 {
        drop(page);
        page = hub.connect(&q, &[]).await.0;
    }
    wait_open(
        &hub,
        1.0,
        0.0,
        Instant::now() + RELEASE,
        "only the last page",
    )
    .await;
    let (_tab2, _) = hub.connect(&q, &[]).await;
    let (_tab3, _) = hub.connect(&q, &[]).await;
    assert_eq!(
        hub.metric(r#"hub_connections_rejected_total{reason="user_limit"}"#)
            .await,
        0.0
    );
}

/// Sends a stream request on a raw socket (so that it can be reset) and returns the socket.
async fn raw_request(hub: &Hub, query: &str, last_event_id: Option<&str>) -> tokio::net::TcpStream {
    let headers: Vec<(&str, &str)> = last_event_id
        .map(|id| ("Last-Event-ID", id))
        .into_iter()
        .collect();
    hub_tests::raw_get(hub.public, &format!("/v1/sse?{query}"), &headers, None).await
}

/// Resets a connection (RST, not FIN): SO_LINGER 0, then close.
fn reset(c: tokio::net::TcpStream) {
    socket2::SockRef::from(&c)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(c);
}

#[tokio::test]
async fn a_reset_at_any_await_of_the_opening_leaves_nothing() {
    let redis = Redis::start();
    let url = redis.url();
    let hub = Hub::start(&[("HUB_REDIS_URL", url.as_str())]).await;
    hub.wait_ready(WAIT).await;
    let pid = redis.pid().unwrap();

    // Which await a request stops at while Redis is frozen:
    // - a channel nobody reads yet: the SUBSCRIBE (and a second opener of it behind the first);
    // - a channel already subscribed, fresh: the read of its latest position;
    // - the same, resuming from an id: the history read.
    let p = prefix("reset");
    let keeper_ch = format!("{p}.kept");
    let (_keeper, _) = hub.connect(&format!("channel={keeper_ch}"), &[]).await;
    let id = hub
        .publish(&keeper_ch, None, serde_json::json!("x"), true)
        .await;
    let cases: [(&str, String, Option<&str>, usize); 3] = [
        ("subscribe", format!("channel={p}.new"), None, 2),
        ("tail read", format!("channel={keeper_ch}"), None, 1),
        ("history read", format!("channel={keeper_ch}"), Some(&id), 1),
    ];
    for (what, query, last_id, clients) in cases {
        signal(pid, "STOP");
        let mut socks = Vec::new();
        for _ in 0..clients {
            socks.push(raw_request(&hub, &query, last_id).await);
        }
        // Every request got as far as being admitted.
        wait_until(
            &format!("{what}: admitted"),
            Duration::from_secs(3),
            || async { hub.stats().await["connections"]["admitted"] == 1 + clients },
        )
        .await;
        let gone = Instant::now();
        for s in socks {
            reset(s);
        }
        // Released at once, with Redis still frozen.
        wait_until(
            &format!("{what}: released within 1 s while Redis is frozen"),
            (gone + RELEASE).saturating_duration_since(Instant::now()),
            || async {
                let st = hub.stats().await;
                st["connections"]["admitted"] == 1 && st["connections"]["sse"] == 1
            },
        )
        .await;
        signal(pid, "CONT");
        hub.wait_ready(WAIT).await;
    }
    // Nothing was left behind: counts exact, and new streams open.
    assert_eq!(hub.stats().await["connections"]["total"], 1);
    let (_s, _) = hub.connect(&format!("channel={p}.new"), &[]).await;
    assert_eq!(hub.stats().await["connections"]["admitted"], 2);
}

#[tokio::test]
async fn clients_that_close_and_reopen_at_once_at_the_cap_are_never_refused() {
    // 50 clients at a cap of 50, each closing its stream and opening the next at once: the
    // node may see a new request before the old connection's close, and must not refuse it.
    let hub = Hub::start(&[("HUB_MAX_CONNECTIONS", "50")]).await;
    let ch = prefix("reopen");
    let q = format!("channel={ch}");
    let clients = (0..50).map(|_| {
        let (hub, q) = (&hub, &q);
        async move {
            for _ in 0..20 {
                let s = hub.sse(q, &[]).await;
                assert_eq!(s.status, 200, "refused while the client held nothing");
                drop(s);
            }
        }
    });
    futures_util::future::join_all(clients).await;
    assert_eq!(
        hub.metric(r#"hub_connections_rejected_total{reason="capacity"}"#)
            .await,
        0.0
    );
    wait_open(&hub, 0.0, 0.0, Instant::now() + RELEASE, "all released").await;
}

#[tokio::test]
async fn websockets_that_reset_while_messages_flow_are_released_and_the_others_miss_nothing() {
    // While a socket keeps up, the fan-out writes to it directly; a client that resets then
    // makes that write fail (or land in a dead socket). Each must be released at once with an
    // exact count, and the sockets that stay must get every message, whole and in order.
    let hub = Hub::start(&[]).await;
    let ch = prefix("wsreset");
    let mut socks = Vec::new();
    for _ in 0..60 {
        let mut w = try_ws(hub.public, "", &[]).await.unwrap();
        hub_tests::client::subscribe(&mut w, &ch).await;
        socks.push(w);
    }
    let gone = socks.split_off(30);
    let mut gone = Some(gone);
    let mut reset_at = None;
    for i in 0..200 {
        hub.publish(&ch, None, serde_json::json!(i), true).await;
        if i == 50 {
            for w in gone.take().unwrap() {
                match w.get_ref() {
                    tokio_tungstenite::MaybeTlsStream::Plain(tcp) => socket2::SockRef::from(tcp)
                        .set_linger(Some(Duration::ZERO))
                        .unwrap(),
                    _ => unreachable!("plain test connection"),
                }
                drop(w);
            }
            reset_at = Some(Instant::now());
        }
    }
    let reset_at = reset_at.unwrap();
    wait_open(
        &hub,
        0.0,
        30.0,
        reset_at + WAIT,
        "the 30 reset sockets released",
    )
    .await;
    for w in &mut socks {
        for i in 0..200 {
            assert_eq!(hub_tests::client::next(w).await["data"], i);
        }
    }
    let m = hub.metrics().await;
    let closed: f64 = ["client", "error", "slow", "stale"]
        .iter()
        .map(|r| {
            hub_tests::metric_value(
                &m,
                &format!(r#"hub_connections_closed_total{{transport="ws",reason="{r}"}}"#),
            )
        })
        .sum();
    assert_eq!(closed, 30.0, "each reset socket closed once");
    assert_eq!(hub.stats().await["connections"]["total"], 30);
}

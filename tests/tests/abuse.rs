//! Abuse limits: streams per client address (`HUB_MAX_STREAMS_PER_IP`, 429 `ip_limit`), new
//! streams per second per address (`HUB_CONNECT_RATE_PER_IP`, 429 `rate_limited` with
//! `Retry-After`), the client address behind `HUB_TRUSTED_PROXIES` (the right-most untrusted
//! `X-Forwarded-For` hop; a spoofed hop is ignored, and without trusted proxies the header is),
//! and `HUB_HEAD_TIMEOUT_SECS` (a silent or slow connection is closed, over TLS too, and at the
//! default of 10 s), and an address asking again at once is answered after a hold.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use hub_tests::client::try_ws;
use hub_tests::{Hub, SseStream, TlsCerts, WAIT};
use serde_json::json;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A client whose connections leave from `local` (127.0.0.x: another address to the hub).
fn client_from(local: &str) -> reqwest::Client {
    hub_tests::install_crypto();
    reqwest::Client::builder()
        .local_address(local.parse::<IpAddr>().unwrap())
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

async fn sse_from(
    hub: &Hub,
    http: &reqwest::Client,
    ch: &str,
    headers: &[(&str, &str)],
) -> SseStream {
    SseStream::open(http, &hub.url(&format!("/v1/sse?channel={ch}")), headers).await
}

#[tokio::test]
async fn streams_per_address_are_limited_and_given_back() {
    let hub = Hub::start(&[("HUB_MAX_STREAMS_PER_IP", "2")]).await;
    let (a, b) = (client_from("127.0.0.2"), client_from("127.0.0.3"));
    let one = sse_from(&hub, &a, "public:x", &[]).await;
    let _two = sse_from(&hub, &a, "public:y", &[]).await;
    assert_eq!((one.status, _two.status), (200, 200));
    let mut third = sse_from(&hub, &a, "public:x", &[]).await;
    assert_eq!(third.status, 429);
    assert_eq!(third.header("retry-after"), Some("5"));
    assert!(third.error_body().await.contains("ip_limit"));
    // An EventSource is told to come back; a WebSocket's upgrade is refused the same.
    let mut es = sse_from(&hub, &a, "public:x", &[("accept", "text/event-stream")]).await;
    assert_eq!(es.status, 200);
    let e = es.next_message(WAIT).await.unwrap();
    assert_eq!(
        (e.event.as_str(), e.json()["reason"].clone()),
        ("hub.reconnect", json!("ip_limit"))
    );
    // Another address is counted apart.
    assert_eq!(sse_from(&hub, &b, "public:x", &[]).await.status, 200);
    // A released place is taken again.
    drop(one);
    hub_tests::wait_until("the place is given back", WAIT, || async {
        sse_from(&hub, &a, "public:x", &[]).await.status == 200
    })
    .await;
    assert!(
        hub.metric("hub_connections_rejected_total{reason=\"ip_limit\"}")
            .await
            >= 2.0
    );
    // WebSocket: one place per socket, from loopback's own address.
    let _w1 = try_ws(hub.public, "", &[]).await.unwrap();
    let _w2 = try_ws(hub.public, "", &[]).await.unwrap();
    assert_eq!(try_ws(hub.public, "", &[]).await.err(), Some(429));
}

#[tokio::test]
async fn the_connect_rate_per_address_has_a_burst_of_twice_the_rate() {
    let hub = Hub::start(&[("HUB_CONNECT_RATE_PER_IP", "2")]).await;
    let a = client_from("127.0.0.4");
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(sse_from(&hub, &a, "public:r", &[]).await.status);
    }
    assert_eq!(statuses, [200, 200, 200, 200, 429]);
    let mut refused = sse_from(&hub, &a, "public:r", &[]).await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert!(refused.error_body().await.contains("rate_limited"));
    let other = client_from("127.0.0.5");
    assert_eq!(sse_from(&hub, &other, "public:r", &[]).await.status, 200);
    // (a refusal beyond the fourth in a row would wait 5 s: the address is held back)
    hub_tests::wait_until("a token is back", Duration::from_secs(9), || async {
        sse_from(&hub, &a, "public:r", &[]).await.status == 200
    })
    .await;
    assert!(
        hub.metric("hub_connections_rejected_total{reason=\"rate_limited\"}")
            .await
            >= 2.0
    );
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_forwarded_address_counts() {
    let hub = Hub::start(&[
        ("HUB_MAX_STREAMS_PER_IP", "1"),
        ("HUB_TRUSTED_PROXIES", "127.0.0.1/32, 10.0.0.0/8"),
    ])
    .await;
    let proxy = client_from("127.0.0.1");
    let xff = |v: &'static str| [("x-forwarded-for", v)];
    let _one = sse_from(&hub, &proxy, "public:p", &xff("1.1.1.1")).await;
    assert_eq!(_one.status, 200);
    // Another client behind the proxy; then the first again, spoofing a hop to its left and
    // passing a trusted inner proxy: still 1.1.1.1.
    assert_eq!(
        sse_from(&hub, &proxy, "public:p", &xff("2.2.2.2"))
            .await
            .status,
        200
    );
    assert_eq!(
        sse_from(&hub, &proxy, "public:p", &xff("9.9.9.9, 1.1.1.1, 10.1.2.3"))
            .await
            .status,
        429
    );
    // An untrusted peer's header is not believed: it is its own address.
    let direct = client_from("127.0.0.6");
    let _d = sse_from(&hub, &direct, "public:p", &xff("3.3.3.3")).await;
    assert_eq!(_d.status, 200);
    assert_eq!(
        sse_from(&hub, &direct, "public:p", &xff("4.4.4.4"))
            .await
            .status,
        429
    );
}

/// A connection from `local` that has sent a stream request's whole head.
async fn raw_request_from(local: &str, addr: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(local.parse().unwrap(), 0))
        .unwrap();
    let mut io = sock.connect(addr).await.unwrap();
    io.write_all(b"GET /v1/sse?channel=public:h HTTP/1.1\r\nHost: hub\r\n\r\n")
        .await
        .unwrap();
    io
}

#[tokio::test]
async fn an_address_that_asks_again_at_once_is_answered_after_the_hold() {
    let hub = Hub::start(&[("HUB_MAX_STREAMS_PER_IP", "1")]).await;
    let a = client_from("127.0.0.7");
    let one = sse_from(&hub, &a, "public:h", &[]).await;
    assert_eq!(one.status, 200);
    // Four refusals in a row are answered at once.
    for _ in 0..4 {
        let asked = Instant::now();
        let refused = sse_from(&hub, &a, "public:h", &[]).await;
        assert_eq!(refused.status, 429);
        assert!(
            asked.elapsed() < Duration::from_secs(2),
            "{:?}",
            asked.elapsed()
        );
    }
    let held = |n: u64| {
        let hub = &hub;
        move || async move { hub.stats().await["connections"]["refusals_held"] == n }
    };
    // The fifth waits 5 to 10 s for the same answer; meanwhile the node serves other addresses, and
    // a held client that leaves gives its place back at once.
    let fifth = async {
        let asked = Instant::now();
        let mut refused = sse_from(&hub, &a, "public:h", &[]).await;
        let waited = asked.elapsed();
        assert_eq!(refused.status, 429);
        assert_eq!(refused.header("retry-after"), Some("5"));
        assert!(refused.error_body().await.contains("ip_limit"));
        waited
    };
    let meanwhile = async {
        hub_tests::wait_until("one refusal held", WAIT, held(1)).await;
        let asked = Instant::now();
        let other = sse_from(&hub, &client_from("127.0.0.8"), "public:h", &[]).await;
        assert_eq!(other.status, 200);
        let served_in = asked.elapsed();
        let leaving = raw_request_from("127.0.0.7", hub.public).await;
        hub_tests::wait_until("two refusals held", WAIT, held(2)).await;
        drop(leaving);
        hub_tests::wait_until("the leaver's place given back", WAIT, held(1)).await;
        served_in
    };
    let (waited, served_in) = tokio::join!(fifth, meanwhile);
    assert!(
        waited >= Duration::from_millis(4900) && waited < Duration::from_secs(14),
        "held {waited:?}"
    );
    assert!(served_in < Duration::from_secs(1), "{served_in:?}");
    hub_tests::wait_until("nothing held", WAIT, held(0)).await;
    // An address that waits as told is answered at once again.
    drop(one);
    hub_tests::wait_until("the place is given back", WAIT, || async {
        sse_from(&hub, &a, "public:h", &[]).await.status == 200
    })
    .await;
}

/// Connects to `addr` and waits for the hub to close the connection; returns what it sent and
/// how long it took.
async fn wait_closed(mut io: TcpStream, limit: Duration) -> (Vec<u8>, Duration) {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(limit.saturating_sub(start.elapsed()), io.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (got, start.elapsed()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("not closed within {limit:?}"),
        }
    }
}

async fn connect(addr: SocketAddr) -> TcpStream {
    TcpSocket::new_v4().unwrap().connect(addr).await.unwrap()
}

#[tokio::test]
async fn a_silent_or_slow_connection_is_closed_at_the_head_timeout() {
    let hub = Hub::start(&[("HUB_HEAD_TIMEOUT_SECS", "1")]).await;
    // Nothing sent.
    let (got, took) = wait_closed(connect(hub.public).await, WAIT).await;
    assert!(got.is_empty() && took < Duration::from_secs(3), "{took:?}");
    // A byte every 300 ms (a slowloris): closed with 408 at the deadline, not later.
    let mut slow = connect(hub.public).await;
    slow.write_all(b"GET /v1/sse?chan").await.unwrap();
    let start = Instant::now();
    let mut got = Vec::new();
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await; // the slow client's pace
        if slow.write_all(b"n").await.is_err() {
            break;
        }
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(1), slow.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
        assert!(start.elapsed() < WAIT, "never closed");
    }
    assert!(start.elapsed() < Duration::from_secs(3));
    assert!(
        got.is_empty() || got.starts_with(b"HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    // A whole head in time is served.
    let (s, _) = hub.connect("channel=public:ok", &[]).await;
    drop(s);
}

#[tokio::test]
async fn a_silent_tls_connection_is_closed_at_the_head_timeout() {
    let certs = TlsCerts::make();
    let (cert, key) = (certs.cert.to_str().unwrap(), certs.key.to_str().unwrap());
    let hub = Hub::start(&[
        ("HUB_TLS_CERT", cert),
        ("HUB_TLS_KEY", key),
        ("HUB_HEAD_TIMEOUT_SECS", "1"),
    ])
    .await;
    let (got, took) = wait_closed(connect(hub.public).await, WAIT).await;
    assert!(got.is_empty() && took < Duration::from_secs(3), "{took:?}");
}

/// At the default (10 s), not at a short setting nobody runs.
#[tokio::test]
async fn a_silent_connection_is_closed_at_the_default_head_timeout() {
    let hub = Hub::start(&[]).await;
    let (got, took) = wait_closed(connect(hub.public).await, Duration::from_secs(20)).await;
    assert!(got.is_empty());
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(13),
        "{took:?}"
    );
}

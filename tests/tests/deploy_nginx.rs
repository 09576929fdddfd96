//! `deploy/nginx/hub.conf` with real nginx in front of two hub processes on one redis-server:
//! events pass unbuffered (gzip streams too), heartbeats pass, a SIGTERM to one node moves its streams to the other
//! (they resume with `Last-Event-ID` and miss nothing), and a full node's 503 is retried on the
//! other node.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use hub_tests::{prefix, reqwest, Hub, Nginx, Redis, SseStream, WAIT};
use protocol::{publish, Envelope};
use serde_json::json;
use std::time::{Duration, Instant};

async fn two_hubs(redis: &Redis, a: &[(&str, &str)], b: &[(&str, &str)]) -> (Hub, Hub) {
    let url = redis.url();
    let mut hubs = Vec::new();
    for (name, extra) in [("node-a", a), ("node-b", b)] {
        let mut env = vec![("HUB_REDIS_URL", url.as_str()), ("HUB_NODE_ID", name)];
        env.extend_from_slice(extra);
        let hub = Hub::start(&env).await;
        hub.wait_ready(WAIT).await;
        hubs.push(hub);
    }
    let b = hubs.pop().unwrap();
    (hubs.pop().unwrap(), b)
}

fn client() -> reqwest::Client {
    hub_tests::install_crypto();
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

const SSE: &str = "sse";

async fn connections(hub: &Hub) -> f64 {
    hub.metric(&format!("hub_connections{{transport=\"{SSE}\"}}"))
        .await
}

#[tokio::test]
async fn events_and_heartbeats_pass_through_unbuffered() {
    let redis = Redis::start();
    let fast = [("HUB_HEARTBEAT_SECS", "1")];
    let (a, b) = two_hubs(&redis, &fast, &fast).await;
    let nginx = Nginx::start_hub_conf([a.public, b.public]);
    let ch = prefix("nginx_unbuffered");
    let http = client();
    let mut s = SseStream::open(&http, &nginx.url(&format!("/v1/sse?channel={ch}")), &[]).await;
    assert_eq!(s.status, 200);
    assert_eq!(s.header("content-type"), Some("text/event-stream"));
    let first = s.next_event(WAIT).await.expect("hub.connected");
    assert_eq!(first.event, "hub.connected");
    // Each small event must come through at once: a buffering proxy would hold it back until
    // its buffer filled or the response ended.
    for i in 0..5 {
        let sent = Instant::now();
        a.publish(&ch, None, json!(format!("m{i}")), true).await;
        let ev = s.next_message(WAIT).await.expect("stream ended");
        assert_eq!(ev.data, format!("m{i}"));
        assert!(
            sent.elapsed() < Duration::from_millis(1000),
            "event {i} took {:?} through nginx",
            sent.elapsed()
        );
    }
    // Heartbeats (comments every second here) pass too.
    let mut comments = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while comments < 2 {
        assert!(Instant::now() < deadline, "no heartbeats through nginx");
        let ev = s.next_event(WAIT).await.expect("stream ended");
        if ev.comment {
            comments += 1;
        }
    }
}

/// A gzip stream (what browsers get) passes through nginx encoded and unbuffered: each event
/// inflates as soon as it is sent.
#[tokio::test]
async fn a_gzip_stream_passes_through_unbuffered() {
    use hub_tests::gzip::{read_head, read_until, GzReader};
    use tokio::io::AsyncWriteExt;
    let redis = Redis::start();
    let (a, b) = two_hubs(&redis, &[], &[]).await;
    let nginx = Nginx::start_hub_conf([a.public, b.public]);
    let ch = prefix("nginx_gzip");
    let mut io = tokio::net::TcpStream::connect(nginx.addr).await.unwrap();
    io.write_all(
        format!("GET /v1/sse?channel={ch} HTTP/1.1\r\nHost: hub\r\nAccept-Encoding: gzip, deflate, br\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let (head, rest) = read_head(&mut io).await;
    assert!(head.contains("content-encoding: gzip"), "{head}");
    let mut gz = if head.contains("transfer-encoding: chunked") {
        GzReader::chunked()
    } else {
        GzReader::new()
    };
    gz.feed(&rest);
    read_until(&mut io, &mut gz, "event: hub.connected").await;
    for i in 0..5 {
        let sent = Instant::now();
        a.publish(&ch, None, json!(format!("m{i}")), true).await;
        read_until(&mut io, &mut gz, &format!("data: m{i}\n")).await;
        assert!(
            sent.elapsed() < Duration::from_millis(1000),
            "event {i} took {:?} through nginx",
            sent.elapsed()
        );
    }
}

/// One client that behaves like EventSource: on end of stream it reconnects through nginx with
/// `Last-Event-ID`. Returns the data of every message in arrival order, how often it
/// reconnected, and the stream it holds at the end (still open).
async fn follow(url: String, want: usize) -> (Vec<String>, usize, SseStream) {
    let http = client();
    let mut got = Vec::new();
    let mut last_id: Option<String> = None;
    let mut reconnects = 0;
    let mut first = true;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "gave up after {got:?}");
        let headers: Vec<(&str, &str)> = last_id
            .as_deref()
            .map(|id| vec![("Last-Event-ID", id)])
            .unwrap_or_default();
        let mut s = SseStream::open(&http, &url, &headers).await;
        if s.status != 200 {
            let status = s.status;
            panic!(
                "nginx should have found a node: {status} {}",
                s.error_body().await
            );
        }
        if !first {
            reconnects += 1;
        }
        first = false;
        while let Some(ev) = s.next_event(WAIT).await {
            if let Some(id) = &ev.id {
                last_id = Some(id.clone());
            }
            if ev.event == "message" && !ev.comment {
                got.push(ev.data);
                if got.len() == want {
                    return (got, reconnects, s);
                }
            }
        }
    }
}

#[tokio::test]
async fn sigterm_moves_streams_to_the_other_node_and_they_miss_nothing() {
    let redis = Redis::start();
    let (mut a, b) = two_hubs(&redis, &[("HUB_DRAIN_SECS", "1")], &[]).await;
    let nginx = Nginx::start_hub_conf([a.public, b.public]);
    let ch = prefix("nginx_sigterm");
    const STREAMS: usize = 10;
    const MESSAGES: usize = 60;
    let url = nginx.url(&format!("/v1/sse?channel={ch}"));
    let clients: Vec<_> = (0..STREAMS)
        .map(|_| tokio::spawn(follow(url.clone(), MESSAGES)))
        .collect();
    // nginx spreads the streams over both nodes.
    hub_tests::wait_until("streams on both nodes", WAIT, || async {
        connections(&a).await + connections(&b).await == STREAMS as f64
    })
    .await;
    let on_a = connections(&a).await;
    assert!(
        on_a >= 1.0 && on_a < STREAMS as f64,
        "{on_a} of {STREAMS} on node a"
    );
    let mut conn = redis.conn().await;
    let env = |i: usize| Envelope {
        event: None,
        data: json!(format!("m{i}")),
    };
    for i in 0..MESSAGES {
        publish::publish_durable(&mut conn, &ch, &env(i))
            .await
            .unwrap();
        if i == 15 {
            a.terminate();
        }
        tokio::time::sleep(Duration::from_millis(20)).await; // publishing pace, not a wait
    }
    assert!(a.wait_exit(WAIT).await.success());
    let want: Vec<String> = (0..MESSAGES).map(|i| format!("m{i}")).collect();
    let mut moved = 0;
    let mut open = Vec::new();
    for c in clients {
        let (got, reconnects, stream) = c.await.unwrap();
        assert_eq!(got, want, "every message once, in order");
        moved += usize::from(reconnects > 0);
        open.push(stream);
    }
    assert_eq!(moved as f64, on_a, "the streams of node a moved");
    assert_eq!(connections(&b).await, STREAMS as f64);
}

#[tokio::test]
async fn a_full_nodes_503_is_retried_on_the_other_node() {
    let redis = Redis::start();
    let (a, b) = two_hubs(&redis, &[("HUB_MAX_CONNECTIONS", "2")], &[]).await;
    let nginx = Nginx::start_hub_conf([a.public, b.public]);
    let ch = prefix("nginx_full");
    let http = client();
    let mut streams = Vec::new();
    for _ in 0..8 {
        let mut s = SseStream::open(&http, &nginx.url(&format!("/v1/sse?channel={ch}")), &[]).await;
        if s.status != 200 {
            let status = s.status;
            panic!("refused: {status} {}", s.error_body().await);
        }
        assert_eq!(s.next_event(WAIT).await.unwrap().event, "hub.connected");
        streams.push(s);
    }
    assert_eq!(connections(&a).await, 2.0);
    assert_eq!(connections(&b).await, 6.0);
    assert!(
        a.metric(r#"hub_connections_rejected_total{reason="capacity"}"#)
            .await
            >= 1.0,
        "node a answered 503 at least once, and nginx retried it on node b"
    );
    // Everyone still gets messages, whichever node holds them.
    b.publish(&ch, None, json!("hello"), true).await;
    for s in &mut streams {
        assert_eq!(s.next_message(WAIT).await.unwrap().data, "hello");
    }
}

//! A tiny run of the load generator (a few hundred streams, a few seconds) against a real hub,
//! so the tool the benchmarks depend on is checked on every CI run. The full scenarios are not
//! run here (see loadtests/).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use hub_tests::{binary, Hub, Redis};
use std::process::Command;

fn loadgen(args: &[&str]) -> serde_json::Value {
    let out = Command::new(binary("loadgen")).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "loadgen failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("report ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// A hub's public address, admin URL and PID, as loadgen arguments.
fn addresses(hub: &Hub) -> (String, String, String) {
    (
        hub.public.to_string(),
        hub.admin_url(""),
        hub.pid().to_string(),
    )
}

fn check(r: &serde_json::Value, streams: u64, stalled: u64, messages: u64) {
    assert_eq!(r["opened"], streams, "{r}");
    assert_eq!(r["failed"], 0);
    assert_eq!(r["holds"]["streams_stalled"], stalled, "{r}");
    assert_eq!(r["deliveries"], (streams - stalled) * messages, "{r}");
    assert_eq!(r["missing"], 0);
    assert_eq!(r["duplicates"], 0);
    assert_eq!(r["holds"]["min_per_stream"], messages);
    assert!(r["latency"]["p99_ms"].as_f64().unwrap() > 0.0);
    assert!(
        r["server_cpu_secs_per_million_deliveries"].is_number(),
        "{r}"
    );
    assert!(r["server_rss_kb_per_stream"].is_number(), "{r}");
}

#[tokio::test]
async fn two_processes_over_http() {
    let hub = Hub::start(&[]).await;
    let (target, admin, pid) = addresses(&hub);
    let r = loadgen(&[
        "run",
        "--target",
        &target,
        "--path",
        "/v1/sse?channel=public:smoke",
        "--streams",
        "300",
        "--stall",
        "20",
        "--processes",
        "2",
        "--http",
        &admin,
        "--channel",
        "public:smoke",
        "--count",
        "5",
        "--rate",
        "20",
        "--server-pid",
        &pid,
        "--duration",
        "30",
    ]);
    // 20 streams stop reading once open: they are not expected to receive anything.
    check(&r, 300, 20, 5);
}

#[tokio::test]
async fn publishing_over_redis_as_fast_as_replies_come() {
    let redis = Redis::start();
    let url = redis.url();
    let hub = Hub::start(&[("HUB_REDIS_URL", url.as_str())]).await;
    hub.wait_ready(hub_tests::WAIT).await;
    let (target, pid) = (hub.public.to_string(), hub.pid().to_string());
    let r = loadgen(&[
        "run",
        "--target",
        &target,
        "--path",
        "/v1/sse?channel=public:smoke",
        "--streams",
        "100",
        "--processes",
        "1",
        "--redis",
        &url,
        "--channel",
        "public:smoke",
        "--count",
        "50",
        "--rate",
        "0",
        "--server-pid",
        &pid,
        "--duration",
        "30",
    ]);
    check(&r, 100, 0, 50);
}

#[tokio::test]
async fn websocket_streams_over_many_channels() {
    let hub = Hub::start(&[]).await;
    let (target, admin, pid) = addresses(&hub);
    // 200 WebSockets over 20 channels; 60 messages go to the channels in turn, 3 each.
    let r = loadgen(&[
        "run",
        "--target",
        &target,
        "--ws",
        "--path",
        "/v1/ws",
        "--subscribe",
        r#"{"op":"subscribe","channel":"public:ws{ch}"}"#,
        "--streams",
        "200",
        "--processes",
        "2",
        "--http",
        &admin,
        "--channel",
        "public:ws{n}",
        "--channel-count",
        "20",
        "--count",
        "60",
        "--rate",
        "100",
        "--server-pid",
        &pid,
        "--duration",
        "30",
    ]);
    check(&r, 200, 0, 3);
    assert_eq!(r["gaps"], 0);
    assert_eq!(
        hub.metric(r#"hub_connections_opened_total{transport="ws"}"#)
            .await,
        200.0
    );
}

#[tokio::test]
async fn streams_resume_after_their_node_restarts() {
    let redis = Redis::start();
    let url = redis.url();
    let port = hub_tests::free_port();
    let bind = format!("127.0.0.1:{port}");
    let env = [
        ("HUB_REDIS_URL", url.as_str()),
        ("HUB_BIND", bind.as_str()),
        ("HUB_DRAIN_SECS", "0"),
    ];
    let mut hub = Hub::start(&env).await;
    hub.wait_ready(hub_tests::WAIT).await;
    let ready = std::env::temp_dir().join(format!("loadgen-ready-{}", std::process::id()));
    let _ = std::fs::remove_file(&ready);
    let mut run = tokio::process::Command::new(binary("loadgen"));
    run.args([
        "run",
        "--target",
        &bind,
        "--path",
        "/v1/sse?channel=public:storm",
        "--streams",
        "200",
        "--reconnect",
        "--reconnect-ms",
        "300",
        "--redis",
        &url,
        "--channel",
        "public:storm",
        "--count",
        "40",
        "--rate",
        "20",
        "--duration",
        "30",
        "--ready-file",
    ])
    .arg(&ready)
    .stdout(std::process::Stdio::piped());
    let child = run.spawn().unwrap();
    hub_tests::wait_until("streams open", hub_tests::WAIT, || async { ready.exists() }).await;
    // Publishing is under way (2 s in all): restart the node under the streams.
    hub.terminate();
    assert!(hub.wait_exit(hub_tests::WAIT).await.success());
    let hub = Hub::start(&env).await;
    hub.wait_ready(hub_tests::WAIT).await;
    let out = child.wait_with_output().await.unwrap();
    assert!(out.status.success());
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["opened"], 200, "{r}");
    assert_eq!(r["reconnects"], 200, "every stream came back: {r}");
    assert_eq!(r["still_down"], 0);
    assert_eq!(r["deliveries"], 200 * 40, "nothing missed: {r}");
    assert_eq!(r["gaps"], 0);
    assert_eq!(r["duplicates"], 0);
    assert!(r["resume_secs"].as_f64().unwrap() > 0.0, "{r}");
}

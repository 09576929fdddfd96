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
    let (target, admin, pid) = (
        hub.public.to_string(),
        hub.admin_url(""),
        hub.pid().to_string(),
    );
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

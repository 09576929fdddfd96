//! The node's life: configuration checked at start, health and readiness on both ports, stats
//! and metrics, and the drain on SIGTERM/SIGINT.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use hub_tests::{binary, prefix, Hub, WAIT};
use std::process::Command;
use std::time::{Duration, Instant};

fn start_with(env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = Command::new(binary("hub"));
    cmd.env_clear()
        .env("HUB_BIND", "127.0.0.1:0")
        .env("HUB_ADMIN_BIND", "127.0.0.1:0");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run hub");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_configuration_stops_with_one_line_naming_the_variable() {
    for (env, name) in [
        (vec![("HUB_HEARTBEAT_SECS", "abc")], "HUB_HEARTBEAT_SECS"),
        (vec![("HUB_HEARTBEAT_SECS", "0")], "HUB_HEARTBEAT_SECS"),
        (vec![("HUB_MAX_CONNECTIONS", "-5")], "HUB_MAX_CONNECTIONS"),
        (
            vec![("HUB_HEARTBEAT_SECS", "60"), ("HUB_STALE_AFTER_SECS", "30")],
            "HUB_STALE_AFTER_SECS",
        ),
        (
            vec![("HUB_ALLOWED_ORIGINS", "app.example")],
            "HUB_ALLOWED_ORIGINS",
        ),
        (vec![("HUB_BIND", "nowhere")], "HUB_BIND"),
        (
            vec![("HUB_MAX_MESSAGE_BYTES", "lots")],
            "HUB_MAX_MESSAGE_BYTES",
        ),
        (vec![("HUB_REDIS_URL", "http://x")], "HUB_REDIS_URL"),
        (vec![("HUB_LOG", "[[[")], "HUB_LOG"),
    ] {
        let (code, stderr) = start_with(&env);
        assert_eq!(code, Some(2), "{env:?}: {stderr}");
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "one line for {env:?}: {stderr}"
        );
        assert!(
            stderr.contains(name),
            "{env:?} should name {name}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn an_admin_port_open_to_other_hosts_needs_a_publish_key_or_admin_open() {
    let (code, stderr) = start_with(&[("HUB_ADMIN_BIND", "0.0.0.0:0")]);
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("HUB_PUBLISH_KEY") && stderr.contains("HUB_ADMIN_OPEN"),
        "{stderr}"
    );
}

#[tokio::test]
async fn an_admin_port_open_to_other_hosts_starts_with_a_key_or_when_meant() {
    for extra in [("HUB_PUBLISH_KEY", "k"), ("HUB_ADMIN_OPEN", "true")] {
        let hub = Hub::start(&[("HUB_ADMIN_BIND", "0.0.0.0:0"), extra]).await;
        let health = hub
            .http
            .get(format!("http://127.0.0.1:{}/healthz", hub.admin.port()));
        assert_eq!(health.send().await.unwrap().status(), 200, "{extra:?}");
    }
}

#[tokio::test]
async fn health_readiness_stats_and_metrics() {
    let hub = Hub::start(&[("HUB_MAX_CONNECTIONS", "1234"), ("HUB_NODE_ID", "node-a")]).await;
    for url in [
        hub.url("/healthz"),
        hub.url("/readyz"),
        hub.admin_url("/healthz"),
        hub.admin_url("/readyz"),
    ] {
        assert_eq!(
            hub.http.get(&url).send().await.unwrap().status(),
            200,
            "{url}"
        );
    }
    let (_s, _) = hub
        .connect(&format!("channel={}", prefix("stats")), &[])
        .await;
    let stats = hub.stats().await;
    assert_eq!(stats["node"], "node-a");
    assert_eq!(stats["connections"]["sse"], 1);
    assert_eq!(stats["connections"]["max"], 1234);
    assert_eq!(stats["ready"], true);
    let text = hub.metrics().await;
    for name in [
        r#"hub_connections{transport="sse"}"#,
        r#"hub_connections{transport="ws"}"#,
        "hub_connections_max",
        r#"hub_connections_opened_total{transport="sse"}"#,
        r#"hub_connections_closed_total{transport="sse",reason="client"}"#,
        r#"hub_connections_closed_total{transport="ws",reason="token_expired"}"#,
        r#"hub_connections_rejected_total{reason="capacity"}"#,
        r#"hub_connections_rejected_total{reason="user_limit"}"#,
        r#"hub_connections_rejected_total{reason="draining"}"#,
        "hub_channels",
        r#"hub_messages_received_total{source="redis"}"#,
        r#"hub_messages_received_total{source="http"}"#,
        r#"hub_messages_received_total{source="local"}"#,
        "hub_messages_delivered_total",
        r#"hub_messages_dropped_total{reason="malformed"}"#,
        r#"hub_messages_dropped_total{reason="too_large"}"#,
        r#"hub_messages_dropped_total{reason="slow"}"#,
        "hub_delivery_latency_seconds_bucket",
        "hub_heartbeats_sent_total",
        "hub_stale_closed_total",
        "hub_redis_up",
        "hub_redis_reconnects_total",
        "hub_history_replayed_total",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "{name} missing from /metrics"
        );
    }
    assert_eq!(
        hub_tests::metric_value(&text, "hub_connections_max"),
        1234.0
    );
    assert_eq!(
        hub_tests::metric_value(&text, r#"hub_connections{transport="sse"}"#),
        1.0
    );
}

#[tokio::test]
async fn delivery_is_counted_and_timed() {
    let hub = Hub::start(&[]).await;
    let ch = prefix("lat");
    let (mut a, _) = hub.connect(&format!("channel={ch}"), &[]).await;
    let (mut b, _) = hub.connect(&format!("channel={ch}"), &[]).await;
    // A WebSocket's messages are written by the fan-out itself while it keeps up: counted too.
    let mut w = hub_tests::client::try_ws(hub.public, "", &[])
        .await
        .unwrap();
    hub_tests::client::subscribe(&mut w, &ch).await;
    for i in 0..5 {
        hub.publish(&ch, None, serde_json::json!(i), true).await;
    }
    for i in 0..5 {
        a.next_message(WAIT).await.unwrap();
        b.next_message(WAIT).await.unwrap();
        assert_eq!(hub_tests::client::next(&mut w).await["data"], i);
    }
    // (The fan-out counts what it wrote once it has offered the message to every reader.)
    hub.wait_metric("hub_messages_delivered_total", 15.0, WAIT)
        .await;
    assert_eq!(
        hub.metric(r#"hub_messages_received_total{source="http"}"#)
            .await,
        5.0
    );
    // Histogram samples are folded in every few seconds.
    hub.wait_metric("hub_delivery_latency_seconds_count", 15.0, WAIT)
        .await;
}

#[tokio::test]
async fn sigterm_drains_streams_spread_over_the_drain_time_then_exits_zero() {
    let mut hub = Hub::start(&[("HUB_DRAIN_SECS", "2"), ("HUB_RETRY_MS", "1000")]).await;
    let ch = prefix("drain");
    let mut streams = Vec::new();
    for _ in 0..20 {
        streams.push(hub.connect(&format!("channel={ch}"), &[]).await.0);
    }
    hub.terminate();
    let start = Instant::now();
    // Readiness turns 503 at once on both ports.
    for url in [hub.url("/readyz"), hub.admin_url("/readyz")] {
        let http = hub.http.clone();
        hub_tests::wait_until("readyz 503", WAIT, || {
            let (http, url) = (http.clone(), url.clone());
            async move {
                http.get(&url)
                    .send()
                    .await
                    .map(|r| r.status() == 503)
                    .unwrap_or(false)
            }
        })
        .await;
    }
    // New streams are refused with 503 so a load balancer retries elsewhere.
    let mut refused = hub.sse(&format!("channel={ch}"), &[]).await;
    assert_eq!(refused.status, 503);
    let body: serde_json::Value = serde_json::from_str(&refused.error_body().await).unwrap();
    assert_eq!(body["error"], "draining");
    // Every open stream is told to reconnect, then ends; spread over the drain time.
    let mut arrivals = Vec::new();
    for mut s in streams {
        let ev = s
            .next_message(Duration::from_secs(5))
            .await
            .expect("hub.reconnect before the end");
        assert_eq!(ev.event, "hub.reconnect");
        let v = ev.json();
        assert_eq!(v["reason"], "shutdown");
        let retry = v["retry_ms"].as_u64().unwrap();
        assert!((1000..2000).contains(&retry), "{v}");
        assert_eq!(ev.retry, Some(retry), "EventSource waits that long");
        assert!(
            s.next_event(Duration::from_secs(5)).await.is_none(),
            "stream ends after hub.reconnect"
        );
        arrivals.push(start.elapsed());
    }
    let status = hub.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "log:\n{}", hub.log());
    // Streams are read in the order they opened, not the order they were closed; the last one
    // to be closed bounds the spread.
    let last = arrivals.iter().max().unwrap();
    assert!(
        *last >= Duration::from_millis(1000),
        "closes were spread over the drain: {arrivals:?}"
    );
    assert!(
        *last < Duration::from_secs(4),
        "drain finished within HUB_DRAIN_SECS: {arrivals:?}"
    );
}

/// `hub healthcheck` (the container's HEALTHCHECK) answers for a running node and fails for none.
#[tokio::test]
async fn healthcheck_command_asks_the_running_node() {
    let hub = Hub::start(&[]).await;
    let run = |bind: String| {
        std::process::Command::new(hub_tests::binary("hub"))
            .arg("healthcheck")
            .env_clear()
            .env("HUB_ADMIN_BIND", bind)
            .output()
            .unwrap()
    };
    let ok = run(hub.admin.to_string());
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // As in the container: bound to every interface, asked on loopback.
    let any = run(format!("0.0.0.0:{}", hub.admin.port()));
    assert!(
        any.status.success(),
        "{}",
        String::from_utf8_lossy(&any.stderr)
    );
    let gone = run(format!("127.0.0.1:{}", hub_tests::free_port()));
    assert_eq!(gone.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&gone.stderr).contains("/healthz"));
    let bad = run("nowhere".into());
    assert_eq!(bad.status.code(), Some(2));
}

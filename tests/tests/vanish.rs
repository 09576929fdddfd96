//! A client that vanishes without closing (its network goes away: no FIN, no RST) is released
//! by the second heartbeat after it left, while a client that only stopped reading (its window
//! closed, still acknowledging) is not. The vanishing client is curl in a network namespace
//! whose link is taken down.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use hub_tests::netns::NetNs;
use hub_tests::{prefix, Hub, SseStream, WAIT};
use serde_json::json;
use std::process::Stdio;
use std::time::{Duration, Instant};

const SSE: &str = r#"hub_connections{transport="sse"}"#;

#[tokio::test]
async fn a_client_that_vanishes_is_released_by_the_second_heartbeat() {
    let ns = NetNs::create();
    let bind = format!("{}:0", ns.host_addr);
    // Heartbeats every second; stale only after 30 s, so only the vanishing rule can act.
    let hub = Hub::start(&[
        ("HUB_BIND", bind.as_str()),
        ("HUB_HEARTBEAT_SECS", "1"),
        ("HUB_STALE_AFTER_SECS", "30"),
    ])
    .await;
    let ch = prefix("vanish");
    let url = format!("http://{}/v1/sse?channel={ch}", hub.public);
    let mut curl = ns
        .command("curl")
        .args(["-sN", &url])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    hub.wait_metric(SSE, 1.0, WAIT).await;
    // A reader on this host that stops reading, with its window closed by a few big messages.
    let sleeper = SseStream::raw(hub.public, &format!("/v1/sse?channel={ch}"), &[], 4096).await;
    assert_eq!(sleeper.status, 200);
    hub.wait_metric(SSE, 2.0, WAIT).await;
    for _ in 0..20 {
        hub.publish(&ch, None, json!("z".repeat(60_000)), true)
            .await;
    }

    ns.cut();
    let cut = Instant::now();
    // Released by the second heartbeat after it left (heartbeat 1 s; one more tick of slack).
    hub.wait_metric(SSE, 1.0, Duration::from_secs(4)).await;
    eprintln!("released {:?} after the cut", cut.elapsed());
    assert_eq!(
        hub.metric(r#"hub_connections_closed_total{transport="sse",reason="stale"}"#)
            .await,
        1.0
    );
    // The reader that only stopped reading is still open several heartbeats later.
    tokio::time::sleep(Duration::from_secs(3)).await; // heartbeats pass: a span, not a wait for a condition
    assert_eq!(hub.metric(SSE).await, 1.0);
    let _ = curl.kill();
    let _ = curl.wait();
    drop(sleeper);
}

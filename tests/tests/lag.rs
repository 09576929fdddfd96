//! Readers that fall behind are never closed for it while what they missed is in history: a
//! reader that stops and reads on, on the same connection, gets everything history holds, in
//! order, exactly once (and `hub.reset` when history no longer reaches it); a resume of 900
//! messages comes through the same bounded path (SSE and WebSocket, embedded and Redis, default
//! and tiny queues); ephemeral messages a reader fell behind on are counted `lagged`, exactly;
//! a reader behind on two channels keeps each channel's order; and fifty readers that read
//! nothing while 2,000 messages go by leave the hub's memory bounded.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use hub_tests::client::{next, send, try_ws, Ws};
use hub_tests::{prefix, wait_until, Hub, Redis, SseEvent, SseStream, WAIT};
use serde_json::json;
use std::time::Duration;

const SSE: &str = r#"hub_connections{transport="sse"}"#;
const LAGGED: &str = r#"hub_messages_dropped_total{reason="lagged"}"#;
const CLOSED_SLOW: &str = r#"hub_connections_closed_total{transport="sse",reason="slow"}"#;
/// A reader's receive buffer: small, so that a reader that stops stops the hub's writes soon.
const RCVBUF: u32 = 4096;

/// `n` payloads of about `size` bytes, each naming its tag and index.
fn payloads(tag: &str, n: usize, size: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let mut s = format!("{tag}-{i:05}-");
            s.extend(std::iter::repeat_n('x', size.saturating_sub(s.len())));
            s
        })
        .collect()
}

/// The next `n` message events (hub events other than messages fail the test).
async fn messages(s: &mut SseStream, n: usize) -> Vec<SseEvent> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let ev = s
            .next_message(WAIT)
            .await
            .unwrap_or_else(|| panic!("stream ended after {} of {n}", out.len()));
        assert_eq!(
            ev.event,
            "message",
            "unexpected event after {}: {ev:?}",
            out.len()
        );
        out.push(ev);
    }
    out
}

fn data(evs: &[SseEvent]) -> Vec<String> {
    evs.iter().map(|e| e.data.clone()).collect()
}

/// A stream on a raw socket that will not be read until the test says so.
async fn sleeper(hub: &Hub, query: &str) -> SseStream {
    let mut s = SseStream::raw(hub.public, &format!("/v1/sse?{query}"), &[], RCVBUF).await;
    assert_eq!(s.status, 200);
    assert_eq!(s.next_event(WAIT).await.unwrap().event, "hub.connected");
    s
}

#[tokio::test]
async fn a_reader_that_stops_then_reads_on_gets_everything_still_in_history() {
    let hub = Hub::start(&[("HUB_HISTORY_LEN", "5000"), ("HUB_OUTBOX_LEN", "64")]).await;
    let ch = prefix("sleeper");
    let mut sleeping = sleeper(&hub, &format!("channel={ch}")).await;
    let (mut awake, _) = hub.connect(&format!("channel={ch}"), &[]).await;
    let sent = payloads("m", 3000, 2048);
    let reader = tokio::spawn(async move {
        let got = data(&messages(&mut awake, 3000).await);
        (got, awake)
    });
    let ids = hub.publish_many(&ch, &sent).await;
    let (got, _awake) = reader.await.unwrap();
    assert_eq!(got, sent, "the reading stream got everything as it came");
    // The sleeper fell far behind (its queue holds 64) and is still open.
    assert_eq!(hub.metric(SSE).await, 2.0);
    assert_eq!(hub.metric(CLOSED_SLOW).await, 0.0);
    // It reads on, on the same connection: every message, in order, exactly once.
    let got = messages(&mut sleeping, 3000).await;
    assert_eq!(data(&got), sent);
    let got_ids: Vec<String> = got.iter().map(|e| e.id.clone().unwrap()).collect();
    assert_eq!(got_ids, ids);
    assert!(hub.metric("hub_history_replayed_total").await > 0.0);
    // Then live again.
    hub.publish(&ch, None, json!("live"), true).await;
    assert_eq!(sleeping.next_message(WAIT).await.unwrap().data, "live");
}

#[tokio::test]
async fn a_reader_whose_position_left_history_is_reset_to_the_newest() {
    let hub = Hub::start(&[("HUB_HISTORY_LEN", "100"), ("HUB_OUTBOX_LEN", "16")]).await;
    let ch = prefix("reset");
    let mut sleeping = sleeper(&hub, &format!("channel={ch}")).await;
    let sent = payloads("m", 2000, 2048);
    hub.publish_many(&ch, &sent).await;
    // What its buffers held comes first, in order from the start; then hub.reset (history
    // holds only the last 100 and it stood before them); then nothing until the next message.
    let mut got = Vec::new();
    loop {
        let ev = sleeping.next_message(WAIT).await.expect("stream open");
        if ev.event == "hub.reset" {
            assert_eq!(ev.json()["channels"], json!([ch]));
            break;
        }
        got.push(ev.data);
    }
    assert!(got.len() < 1900, "it was behind: got {} first", got.len());
    assert_eq!(got, sent[..got.len()], "a prefix, in order");
    hub.publish(&ch, None, json!("after"), true).await;
    assert_eq!(sleeping.next_message(WAIT).await.unwrap().data, "after");
    assert_eq!(hub.metric(CLOSED_SLOW).await, 0.0);
}

/// Resumes from the 100th of 1,000 messages over SSE (`Last-Event-ID`) and WebSocket (`since`):
/// the 900 others come in order, exactly once. Returns both streams, to check live ones next.
async fn resume_900(hub: &Hub, ch: &str, ids: &[String], sent: &[String]) -> (SseStream, Ws) {
    let (mut s, connected) = hub
        .connect(
            &format!("channel={ch}"),
            &[("Last-Event-ID", ids[99].as_str())],
        )
        .await;
    assert_eq!(connected.id.as_deref(), Some(ids[99].as_str()));
    let got = messages(&mut s, 900).await;
    assert_eq!(data(&got), sent[100..]);
    let got_ids: Vec<String> = got.iter().map(|e| e.id.clone().unwrap()).collect();
    assert_eq!(got_ids, ids[100..]);

    let mut w = try_ws(hub.public, "", &[]).await.unwrap();
    send(
        &mut w,
        json!({"op": "subscribe", "channel": ch, "since": ids[99]}),
    )
    .await;
    assert_eq!(
        next(&mut w).await,
        json!({"type": "subscribed", "channel": ch})
    );
    for i in 100..1000 {
        let f = next(&mut w).await;
        assert_eq!(
            (&f["id"], &f["data"]),
            (&json!(ids[i]), &json!(sent[i])),
            "{f}"
        );
    }
    (s, w)
}

/// After the resumes, a live message reaches every resumed stream next.
async fn live_follows(publisher: &Hub, ch: &str, resumed: &mut [(SseStream, Ws)]) {
    let live = publisher.publish(ch, None, json!("live"), true).await;
    for (s, w) in resumed {
        let ev = s.next_message(WAIT).await.unwrap();
        assert_eq!(ev.id, Some(live.clone()), "{ev:?}");
        assert_eq!(next(w).await["id"], json!(live));
    }
}

#[tokio::test]
async fn a_resume_after_900_of_1000_missed_embedded() {
    for outbox in ["256", "16"] {
        let hub = Hub::start(&[("HUB_OUTBOX_LEN", outbox)]).await;
        let ch = prefix("resume900");
        let sent = payloads("r", 1000, 100);
        let ids = hub.publish_many(&ch, &sent).await;
        let mut resumed = [resume_900(&hub, &ch, &ids, &sent).await];
        live_follows(&hub, &ch, &mut resumed).await;
        assert_eq!(hub.metric(CLOSED_SLOW).await, 0.0, "outbox {outbox}");
    }
}

#[tokio::test]
async fn a_resume_after_900_of_1000_missed_redis() {
    let redis = Redis::start();
    let url = redis.url();
    let a = Hub::start(&[("HUB_REDIS_URL", url.as_str())]).await;
    let b = Hub::start(&[("HUB_REDIS_URL", url.as_str()), ("HUB_OUTBOX_LEN", "16")]).await;
    a.wait_ready(WAIT).await;
    b.wait_ready(WAIT).await;
    let ch = prefix("resume900r");
    let sent = payloads("r", 1000, 100);
    let ids = a.publish_many(&ch, &sent).await;
    let mut resumed = Vec::new();
    for hub in [&a, &b] {
        resumed.push(resume_900(hub, &ch, &ids, &sent).await);
        assert_eq!(hub.metric(CLOSED_SLOW).await, 0.0);
        // Bounded reads: several pages, not one read of all 900.
        let reads = hub.metric("hub_history_reads_total").await;
        assert!(reads >= 4.0, "paged reads: {reads}");
    }
    live_follows(&a, &ch, &mut resumed).await;
}

#[tokio::test]
async fn ephemeral_messages_a_reader_fell_behind_on_are_counted_lagged() {
    let hub = Hub::start(&[("HUB_OUTBOX_LEN", "16")]).await;
    let ch = prefix("lagged");
    let mut sleeping = sleeper(&hub, &format!("channel={ch}")).await;
    const N: usize = 2000;
    let blob = "e".repeat(2048);
    for i in 0..N {
        hub.publish(&ch, None, json!(format!("{i}-{blob}")), false)
            .await;
    }
    let marker = hub.publish(&ch, None, json!("end"), true).await;
    // Reads on: the ephemeral messages it still got, then the durable marker from history.
    let mut got = 0;
    loop {
        let ev = sleeping.next_message(WAIT).await.expect("stream open");
        if ev.data == "end" {
            assert_eq!(ev.id.as_deref(), Some(marker.as_str()));
            break;
        }
        got += 1;
    }
    let lagged = hub.metric(LAGGED).await;
    assert!(got < N && lagged > 0.0, "it fell behind: got {got}");
    assert_eq!(
        got as f64 + lagged,
        N as f64,
        "each one delivered or counted"
    );
    assert_eq!(hub.metric(SSE).await, 1.0);
}

#[tokio::test]
async fn a_reader_behind_on_two_channels_keeps_each_channels_order() {
    let hub = Hub::start(&[("HUB_HISTORY_LEN", "5000"), ("HUB_OUTBOX_LEN", "32")]).await;
    let p = prefix("two");
    let (a, b) = (format!("{p}.a"), format!("{p}.b"));
    let q = format!("channel={a}&channel={b}");
    let mut sleeping = sleeper(&hub, &q).await;
    let blob = "y".repeat(2000);
    for i in 0..1500 {
        hub.publish(&a, None, json!(format!("a-{i:04}-{blob}")), true)
            .await;
        hub.publish(&b, None, json!(format!("b-{i:04}-{blob}")), true)
            .await;
    }
    let got = messages(&mut sleeping, 3000).await;
    let of = |c: char| -> Vec<String> {
        got.iter()
            .filter(|e| e.data.starts_with(c))
            .map(|e| e.data[..6].to_string())
            .collect()
    };
    let want = |c: char| -> Vec<String> { (0..1500).map(|i| format!("{c}-{i:04}")).collect() };
    assert_eq!(of('a'), want('a'));
    assert_eq!(of('b'), want('b'));
    // The last cursor resumes exactly after everything seen.
    let last = got.last().unwrap().id.clone().unwrap();
    let (mut again, _) = hub.connect(&q, &[("Last-Event-ID", last.as_str())]).await;
    hub.publish(&b, None, json!("next"), true).await;
    assert_eq!(again.next_message(WAIT).await.unwrap().data, "next");
}

#[tokio::test]
async fn fifty_streams_that_read_nothing_leave_memory_bounded() {
    let hub = Hub::start(&[]).await;
    let ch = prefix("rss");
    let mut stuck = Vec::new();
    for _ in 0..50 {
        stuck.push(sleeper(&hub, &format!("channel={ch}")).await);
    }
    let before = hub.rss_kb();
    let sent = payloads("m", 2000, 2048);
    hub.publish_many(&ch, &sent).await;
    wait_until("fan-out settled", Duration::from_secs(5), || async {
        hub.metric("hub_messages_received_total{source=\"http\"}")
            .await
            == 2000.0
    })
    .await;
    let after = hub.rss_kb();
    // 2,000 x 2 KB went to 50 readers that took almost none: 200 MB had each kept its own
    // copies. The hub keeps the history (1,000 messages, ~4 MB framed) and 256 shared
    // references per reader.
    let grew_mb = after.saturating_sub(before) as f64 / 1024.0;
    assert!(
        grew_mb < 24.0,
        "RSS grew {grew_mb:.1} MB ({before} -> {after} KiB)"
    );
    assert_eq!(hub.metric(SSE).await, 50.0, "none closed");
    // Each still reads from where it stopped (history reaches back 1,000: the rest is reset).
    let first = stuck[0].next_message(WAIT).await.unwrap();
    assert_eq!(first.data, sent[0]);
}

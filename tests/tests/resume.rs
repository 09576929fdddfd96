//! Resume with `Last-Event-ID` (header, `last_event_id`, `lastEventId`): replay exactly once and
//! in order per channel, across several channels, and `hub.reset` when history no longer
//! reaches back or the id cannot be read.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use hub_tests::{prefix, Hub, SseStream, WAIT};
use serde_json::json;

async fn collect(s: &mut SseStream, n: usize) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while out.len() < n {
        let m = s.next_message(WAIT).await.expect("stream ended early");
        out.push((m.event.clone(), m.data.clone()));
    }
    out
}

#[tokio::test]
async fn every_form_of_the_id_resumes_exactly_once_in_order() {
    let hub = Hub::start(&[]).await;
    let ch = prefix("resume");
    for how in ["header", "last_event_id", "lastEventId"] {
        let (mut s, _) = hub.connect(&format!("channel={ch}"), &[]).await;
        hub.publish(&ch, None, json!(format!("{how}-0")), true)
            .await;
        let seen = s.next_message(WAIT).await.unwrap();
        let last = seen.id.clone().unwrap();
        drop(s);
        for i in 1..=5 {
            hub.publish(&ch, None, json!(format!("{how}-{i}")), true)
                .await;
        }
        let (mut r, connected) = match how {
            "header" => {
                hub.connect(
                    &format!("channel={ch}"),
                    &[("Last-Event-ID", last.as_str())],
                )
                .await
            }
            q => hub.connect(&format!("channel={ch}&{q}={last}"), &[]).await,
        };
        assert_eq!(
            connected.id.as_deref(),
            Some(last.as_str()),
            "starts from the asked position"
        );
        // Publish one more live while the replay is read: it must follow, once.
        hub.publish(&ch, None, json!(format!("{how}-6")), true)
            .await;
        let got: Vec<String> = collect(&mut r, 6)
            .await
            .into_iter()
            .map(|(_, d)| d)
            .collect();
        let want: Vec<String> = (1..=6).map(|i| format!("{how}-{i}")).collect();
        assert_eq!(got, want, "resume by {how}");
        // Nothing else (no duplicate) before the next live one.
        hub.publish(&ch, None, json!("after"), true).await;
        assert_eq!(r.next_message(WAIT).await.unwrap().data, "after");
    }
    assert!(hub.metric("hub_history_replayed_total").await >= 15.0);
}

#[tokio::test]
async fn several_channels_resume_each_from_its_own_position() {
    let hub = Hub::start(&[]).await;
    let p = prefix("multi");
    let (a, b, c) = (format!("{p}.a"), format!("{p}.b"), format!("{p}.c"));
    let q = format!("channel={a}&channel={b}&channel={c}");
    let (mut s, _) = hub.connect(&q, &[]).await;
    hub.publish(&a, None, json!("a1"), true).await;
    hub.publish(&b, None, json!("b1"), true).await;
    let _ = collect(&mut s, 2).await;
    // The stream's id after b1 covers a1 and b1 (and c at its start).
    let last = {
        hub.publish(&a, None, json!("a2"), true).await;
        s.next_message(WAIT).await.unwrap().id.unwrap()
    };
    drop(s);
    hub.publish(&c, None, json!("c1"), true).await;
    hub.publish(&b, None, json!("b2"), true).await;
    hub.publish(&a, None, json!("a3"), true).await;
    hub.publish(&c, None, json!("c2"), true).await;
    // Resume with the channels in another order: the same stream.
    let q2 = format!("channel={c}&channel={a}&channel={b}");
    let (mut r, _) = hub.connect(&q2, &[("Last-Event-ID", last.as_str())]).await;
    let got: Vec<String> = collect(&mut r, 4)
        .await
        .into_iter()
        .map(|(_, d)| d)
        .collect();
    let of = |prefix: char| {
        got.iter()
            .filter(|d| d.starts_with(prefix))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(of('a'), ["a3"]);
    assert_eq!(of('b'), ["b2"]);
    assert_eq!(of('c'), ["c1", "c2"]);
    hub.publish(&b, None, json!("live"), true).await;
    assert_eq!(
        r.next_message(WAIT).await.unwrap().data,
        "live",
        "no duplicates before live"
    );
}

#[tokio::test]
async fn reset_when_history_no_longer_reaches_back() {
    let hub = Hub::start(&[("HUB_HISTORY_LEN", "3")]).await;
    let ch = prefix("reset");
    let (mut s, _) = hub.connect(&format!("channel={ch}"), &[]).await;
    hub.publish(&ch, None, json!("m0"), true).await;
    let last = s.next_message(WAIT).await.unwrap().id.unwrap();
    drop(s);
    for i in 1..=5 {
        hub.publish(&ch, None, json!(format!("m{i}")), true).await;
    }
    let (mut r, _) = hub
        .connect(
            &format!("channel={ch}"),
            &[("Last-Event-ID", last.as_str())],
        )
        .await;
    let reset = r.next_message(WAIT).await.unwrap();
    assert_eq!(reset.event, "hub.reset");
    assert_eq!(reset.json(), json!({"channels": [ch]}));
    // Then live, nothing replayed.
    hub.publish(&ch, None, json!("live"), true).await;
    assert_eq!(r.next_message(WAIT).await.unwrap().data, "live");

    // Within the window: no reset.
    let (mut s, _) = hub.connect(&format!("channel={ch}"), &[]).await;
    hub.publish(&ch, None, json!("x0"), true).await;
    let last = s.next_message(WAIT).await.unwrap().id.unwrap();
    drop(s);
    hub.publish(&ch, None, json!("x1"), true).await;
    let (mut r, _) = hub
        .connect(
            &format!("channel={ch}"),
            &[("Last-Event-ID", last.as_str())],
        )
        .await;
    assert_eq!(r.next_message(WAIT).await.unwrap().data, "x1");
}

#[tokio::test]
async fn unreadable_ids_reset_every_channel() {
    let hub = Hub::start(&[]).await;
    let p = prefix("junk");
    let (a, b) = (format!("{p}.a"), format!("{p}.b"));
    for junk in ["garbage", "1-2", "deadbeef:1-0,2-0", "", "99999999999999-0"] {
        let (mut r, _) = hub
            .connect(
                &format!("channel={a}&channel={b}"),
                &[("Last-Event-ID", junk)],
            )
            .await;
        let reset = r.next_message(WAIT).await.unwrap();
        assert_eq!(reset.event, "hub.reset", "id {junk:?}");
        assert_eq!(reset.json(), json!({"channels": [a, b]}));
    }
    // One channel, an id from the future or from before this process: reset too.
    for junk in ["99999999999999-0", "1-0"] {
        let (mut r, _) = hub
            .connect(&format!("channel={a}"), &[("Last-Event-ID", junk)])
            .await;
        assert_eq!(
            r.next_message(WAIT).await.unwrap().event,
            "hub.reset",
            "id {junk:?}"
        );
    }
}

#[tokio::test]
async fn a_quiet_channel_resumes_without_reset() {
    let hub = Hub::start(&[]).await;
    let ch = prefix("quiet");
    let (s, first) = hub.connect(&format!("channel={ch}"), &[]).await;
    drop(s);
    let id = hub.publish(&ch, None, json!("first ever"), true).await;
    let (mut r, _) = hub
        .connect(
            &format!("channel={ch}"),
            &[("Last-Event-ID", first.id.as_deref().unwrap())],
        )
        .await;
    let m = r.next_message(WAIT).await.unwrap();
    assert_eq!(
        (m.id.as_deref(), m.data.as_str()),
        (Some(id.as_str()), "first ever")
    );
}

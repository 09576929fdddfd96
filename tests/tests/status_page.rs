//! The admin port's status page in a real browser (headless Chromium, driven over the DevTools
//! protocol): it loads with no console error, shows this node and a stream the test opened
//! within 2 s, updates when another opens, looks a channel's users up, disconnects a user with
//! the publish key, fits a phone's screen and is keyboard navigable; in Redis mode it shows the
//! other node, and stops showing it once that node is gone. A screenshot of each is kept in
//! `target/test-artefacts/`.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use hub_tests::browser::Chromium;
use hub_tests::cdp::Cdp;
use hub_tests::client::{hs256, now, SECRET};
use hub_tests::{Hub, Redis};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;

/// Where screenshots are kept (beside the build, so CI can collect them).
fn artefact(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("test-artefacts").join(name)
}

/// The text of an element of the page.
fn text_of(id: &str) -> String {
    format!("document.getElementById({}).innerText", json!(id))
}

async fn open_page(hub: &Hub) -> (Chromium, Cdp) {
    let browser = Chromium::open("about:blank", &["--remote-debugging-port=0"]);
    let mut cdp = Cdp::attach(&browser).await;
    cdp.navigate(&hub.admin_url("/")).await;
    (browser, cdp)
}

#[tokio::test]
async fn the_status_page_shows_one_node_live_and_acts_on_it() {
    let hub = Hub::start(&[
        ("HUB_NODE_ID", "page-node"),
        ("HUB_JWT_SECRET", SECRET),
        ("HUB_PUBLISH_KEY", "k3y"),
    ])
    .await;
    let token = hs256(json!({"sub": "ada", "exp": now() + 600, "channels": ["room:*"]}));
    let (mut first, _) = hub
        .connect(&format!("channel=room:status&token={token}"), &[])
        .await;

    let opened = std::time::Instant::now();
    let (_browser, mut cdp) = open_page(&hub).await;
    cdp.wait_for(
        &format!(
            "{}.includes('page-node (this one)') && {}.includes('room:status')",
            text_of("nodes"),
            text_of("top")
        ),
        Duration::from_secs(2).saturating_sub(opened.elapsed()) + Duration::from_millis(200),
        "the page shows the node and its channel",
    )
    .await;
    assert_eq!(cdp.eval(&text_of("c-streams")).await, "1");
    assert_eq!(cdp.eval(&text_of("c-nodes")).await, "1");

    // Another stream opens: the page shows it at its next refresh.
    let (_second, _) = hub.connect("channel=public:status-b", &[]).await;
    cdp.wait_for(
        &format!(
            "{} === '2' && {}.includes('public:status-b')",
            text_of("c-streams"),
            text_of("top")
        ),
        Duration::from_secs(5),
        "the page updates to 2 streams",
    )
    .await;

    // Rates: messages in and delivered per second, from the change between two refreshes.
    for k in 0..5 {
        let r = hub
            .http
            .post(hub.admin_url("/v1/publish"))
            .bearer_auth("k3y")
            .json(&json!({"channel": "public:status-b", "data": {"k": k}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }
    cdp.wait_for(
        "['c-in', 'c-out'].every(id => !['–', '0'].includes(document.getElementById(id).innerText))",
        Duration::from_secs(5),
        "the page shows messages in and delivered per second",
    )
    .await;

    // The presence box: the channel's user and stream count.
    cdp.eval(
        "document.getElementById('presence-channel').value = 'room:status';
         document.querySelector('#presence-form button').click(); true",
    )
    .await;
    cdp.wait_for(
        &format!(
            "{}.includes('ada') && {}.includes('1 user, 0 anonymous streams')",
            text_of("presence-out"),
            text_of("presence-out")
        ),
        Duration::from_secs(5),
        "the presence box lists the user",
    )
    .await;

    // Disconnect without the key is refused and shown; with it, the user's stream ends.
    cdp.eval(
        "document.getElementById('dc-by').value = 'sub';
         document.getElementById('dc-value').value = 'ada';
         document.querySelector('#disconnect-form button').click(); true",
    )
    .await;
    cdp.wait_for(
        &format!("{}.includes('Refused (401)')", text_of("dc-out")),
        Duration::from_secs(5),
        "a disconnect without the key is refused",
    )
    .await;
    cdp.eval(
        "document.getElementById('dc-key').value = 'k3y';
         document.getElementById('dc-reason').value = 'from-the-page';
         document.querySelector('#disconnect-form button').click(); true",
    )
    .await;
    let ended = loop {
        match first.next_event(Duration::from_secs(5)).await {
            Some(e) if e.event == "hub.disconnect" => break e,
            Some(_) => continue,
            None => panic!("the user's stream did not end after the page's disconnect"),
        }
    };
    assert_eq!(ended.json()["reason"], "from-the-page");
    cdp.wait_for(
        &format!("{}.includes('Sent to every node (202)')", text_of("dc-out")),
        Duration::from_secs(5),
        "the page says the disconnect was sent",
    )
    .await;
    cdp.wait_for(
        &format!("{}.includes('disconnected')", text_of("closed")),
        Duration::from_secs(5),
        "the close is listed by its reason",
    )
    .await;

    // Keyboard: every control is reachable by Tab (none taken out of the order) and labelled.
    let unlabelled = cdp
        .eval(
            "[...document.querySelectorAll('input, select, button, a, [tabindex]')]
               .filter(e => e.tabIndex < 0
                 || (e.matches('input, select') && !e.closest('label'))
                 || !(e.innerText || e.closest('label') || e.getAttribute('aria-labelledby')))
               .map(e => e.outerHTML.slice(0, 80))",
        )
        .await;
    assert_eq!(
        unlabelled,
        json!([]),
        "controls out of the tab order or unlabelled"
    );
    let mut reached = Vec::new();
    for _ in 0..30 {
        cdp.call(
            "Input.dispatchKeyEvent",
            json!({"type": "keyDown", "key": "Tab", "code": "Tab", "windowsVirtualKeyCode": 9}),
        )
        .await;
        cdp.call(
            "Input.dispatchKeyEvent",
            json!({"type": "keyUp", "key": "Tab", "code": "Tab", "windowsVirtualKeyCode": 9}),
        )
        .await;
        let id = cdp
            .eval("document.activeElement.id || document.activeElement.tagName")
            .await;
        reached.push(id.as_str().unwrap_or_default().to_string());
    }
    for id in ["presence-channel", "dc-by", "dc-value", "dc-key"] {
        assert!(
            reached.iter().any(|r| r == id),
            "Tab never reached #{id}: {reached:?}"
        );
    }

    cdp.screenshot(&artefact("status-page.png")).await;
    // A phone: nothing wider than its screen (the tables scroll inside their boxes).
    cdp.phone(Some(390)).await;
    cdp.wait_for(
        "document.documentElement.scrollWidth <= 390",
        Duration::from_secs(5),
        "the page fits a 390 px screen",
    )
    .await;
    cdp.screenshot(&artefact("status-page-phone.png")).await;
    cdp.phone(None).await;

    // Nothing went wrong in the page meanwhile (a call flushes the events still unread), but
    // the browser's own line for the 401 the test asked for.
    cdp.eval("true").await;
    let (refused, others): (Vec<String>, Vec<String>) = cdp
        .errors
        .iter()
        .cloned()
        .partition(|e| e.contains("status of 401") && e.contains("/v1/disconnect"));
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(others, Vec::<String>::new(), "the page logged errors");
}

#[tokio::test]
async fn the_status_page_shows_every_node_over_redis() {
    let redis = Redis::start();
    let url = redis.url();
    let a = Hub::start(&[("HUB_REDIS_URL", &url), ("HUB_NODE_ID", "node-a")]).await;
    let mut b = Hub::start(&[
        ("HUB_REDIS_URL", &url),
        ("HUB_NODE_ID", "node-b"),
        ("HUB_DRAIN_SECS", "0"),
    ])
    .await;
    a.wait_ready(Duration::from_secs(10)).await;
    b.wait_ready(Duration::from_secs(10)).await;
    let (_on_b, _) = b.connect("channel=public:on-b", &[]).await;
    let (_on_a, _) = a.connect("channel=public:on-b", &[]).await;

    let (_browser, mut cdp) = open_page(&a).await;
    // Node b's snapshot is written every 2 s: both nodes, and the channel read on both.
    cdp.wait_for(
        &format!(
            "{n}.includes('node-a (this one)') && {n}.includes('node-b') && {c} === '2'
             && {t}.includes('public:on-b')",
            n = text_of("nodes"),
            c = text_of("c-nodes"),
            t = text_of("top")
        ),
        Duration::from_secs(6),
        "the page shows both nodes",
    )
    .await;
    cdp.wait_for(
        &format!("{} === '2'", text_of("c-streams")),
        Duration::from_secs(6),
        "the page counts both nodes' streams",
    )
    .await;
    let top: Value = cdp
        .eval("[...document.querySelectorAll('#top tbody tr')][0].innerText")
        .await;
    assert!(
        top.as_str().unwrap().contains("public:on-b\t2\t2"),
        "the channel's readers summed over its two nodes: {top}"
    );
    cdp.screenshot(&artefact("status-page-redis.png")).await;

    // Node b stops: its lease runs out and the page stops showing it.
    b.terminate();
    b.wait_exit(Duration::from_secs(15)).await;
    cdp.wait_for(
        &format!("{} === '1'", text_of("c-nodes")),
        Duration::from_secs(12),
        "the stopped node leaves the page when its lease runs out",
    )
    .await;
    cdp.eval("true").await;
    assert_eq!(cdp.errors, Vec::<String>::new(), "the page logged errors");

    // The same figures as JSON, from either node.
    let status: Value = a
        .http
        .get(a.admin_url("/v1/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["node"], "node-a");
    assert_eq!(status["nodes"].as_array().unwrap().len(), 1, "{status}");
    assert_eq!(status["nodes"][0]["redis"]["up"], true);
}

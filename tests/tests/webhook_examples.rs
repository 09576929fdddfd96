//! The README's webhook receivers (`examples/webhooks/receiver.py` and `receiver.js`) against a
//! real hub: a request with a bad signature is refused, a channel's first reader makes the
//! receiver start a feed that publishes to it through the hub (the reader gets its ticks), and
//! the channel's vacancy (a heartbeat after the reader left) stops the feed.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use hub_tests::{free_port, wait_until, Hub, WAIT};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

const KEY: &str = "example-webhook-secret";

/// A receiver process; killed (by its PID) when dropped.
struct Receiver {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Receiver {
    fn start(program: &str, script: &str, port: u16, admin: u16) -> Receiver {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../examples/webhooks")
            .join(script);
        let mut child = Command::new(program)
            .arg(&path)
            .env("HUB_WEBHOOK_SECRET", KEY)
            .env("HUB_ADMIN_URL", format!("http://127.0.0.1:{admin}"))
            .env("PORT", port.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("{program} {}: {e}", path.display()));
        let out = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                l.lock().unwrap().push(line);
            }
        });
        Receiver { child, lines }
    }

    async fn wait_line(&self, line: &str) {
        wait_until(&format!("the receiver says {line:?}"), WAIT, || {
            let found = self.lines.lock().unwrap().iter().any(|l| l == line);
            async move { found }
        })
        .await;
    }
}

async fn the_receiver_starts_and_stops_a_feed(program: &str, script: &str) {
    let (port, admin) = (free_port(), free_port());
    let rx = Receiver::start(program, script, port, admin);
    rx.wait_line(&format!("listening {port}")).await;
    let url = format!("http://127.0.0.1:{port}/hub-events");
    hub_tests::install_crypto();
    let http = reqwest::Client::new();
    let bad = http
        .post(&url)
        .header("X-Hub-Signature", "sha256=00")
        .body(r#"{"events": []}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status().as_u16(), 401, "a bad signature is refused");

    let admin_bind = format!("127.0.0.1:{admin}");
    let hub = Hub::start(&[
        ("HUB_ADMIN_BIND", &admin_bind),
        ("HUB_WEBHOOK_URL", &url),
        ("HUB_WEBHOOK_SECRET", KEY),
        ("HUB_HEARTBEAT_SECS", "2"),
    ])
    .await;
    let ch = format!("public:ticker-{script}");
    let (mut s, _) = hub.connect(&format!("channel={ch}"), &[]).await;
    let m = s.next_message(WAIT).await.unwrap();
    assert!(m.json()["tick"].as_u64().is_some(), "{m:?}");
    rx.wait_line(&format!("started feed {ch}")).await;
    drop(s);
    rx.wait_line(&format!("stopped feed {ch}")).await;
    // Occupied and vacated, each answered 2xx.
    hub.wait_metric("hub_webhook_events_total{result=\"sent\"}", 2.0, WAIT)
        .await;
}

#[tokio::test]
async fn the_python_receiver() {
    the_receiver_starts_and_stops_a_feed("python3", "receiver.py").await;
}

#[tokio::test]
async fn the_node_receiver() {
    the_receiver_starts_and_stops_a_feed("node", "receiver.js").await;
}

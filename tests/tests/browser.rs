//! A real browser: headless Chromium loads a page from one origin that opens a plain
//! `EventSource` to the hub through nginx (`deploy/nginx/hub.conf`) on another origin. The page
//! reports what it receives back to the test's page server. Nodes restart under it; it must
//! reconnect on its own and end with every durable message exactly once, in order.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use hub_tests::{free_port, prefix, Hub, Nginx, Redis, WAIT};
use protocol::{publish, Envelope};
use serde_json::{json, Value};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PAGE: &str = r#"<!doctype html>
<meta charset="utf-8">
<title>hub in a browser</title>
<script>
let n = 0;
function report(kind, data, id) {
  fetch("/report", {method: "POST", body: JSON.stringify({n: n++, kind, data, id})});
}
const es = new EventSource("__HUB__/v1/sse?channel=__CHANNEL__");
es.addEventListener("hub.connected", e => report("connected", e.data, e.lastEventId));
es.addEventListener("hub.reconnect", e => report("reconnect", e.data, e.lastEventId));
es.addEventListener("hub.reset", e => report("reset", e.data, e.lastEventId));
es.onmessage = e => report("message", e.data, e.lastEventId);
es.onerror = () => report("error", String(es.readyState), "");
</script>
"#;

type Reports = Arc<Mutex<Vec<Value>>>;

/// The page's origin: serves the page at `/` and collects `POST /report` bodies.
async fn page_server(listener: tokio::net::TcpListener, page: String, reports: Reports) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            return;
        };
        let page = page.clone();
        let reports = reports.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let (head_end, len) = loop {
                let Ok(n) = sock.read(&mut chunk).await else {
                    return;
                };
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&chunk[..n]);
                if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    break (end + 4, len);
                }
            };
            while buf.len() < head_end + len {
                match sock.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let answer = if buf.starts_with(b"POST /report ") {
                if let Ok(v) = serde_json::from_slice::<Value>(&buf[head_end..head_end + len]) {
                    reports.lock().unwrap().push(v);
                }
                "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n".to_string()
            } else if buf.starts_with(b"GET / ") {
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{page}",
                    page.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into()
            };
            let _ = sock.write_all(answer.as_bytes()).await;
        });
    }
}

/// Headless Chromium in its own session and process group, stopped (with its helpers) when
/// dropped.
struct Chromium(Child);

impl Chromium {
    fn open(url: &str) -> Chromium {
        let profile = std::env::temp_dir().join(format!("hub-chromium-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&profile);
        let log = std::fs::File::create(profile.with_extension("log")).unwrap();
        // `setsid` gives the browser a session and process group of its own (same pid), away
        // from the terminal and the test runner's group.
        let child = Command::new("setsid")
            .arg("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--disable-crash-reporter",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(url)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start chromium (scripts/test.sh installs the Debian package)");
        Chromium(child)
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        // The browser and its helpers share the process group we gave it (`--` so that the
        // negative group id is not read as an option).
        let pgid = format!("-{}", self.0.id());
        let group = |sig: &str| {
            let _ = Command::new("kill")
                .args([sig, "--", pgid.as_str()])
                .status();
        };
        group("-TERM");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        group("-KILL");
        let _ = self.0.wait();
    }
}

fn of_kind(reports: &Reports, kind: &str) -> Vec<Value> {
    let mut all = reports.lock().unwrap().clone();
    all.sort_by_key(|v| v["n"].as_u64().unwrap_or(0));
    all.into_iter().filter(|v| v["kind"] == kind).collect()
}

async fn wait_messages(reports: &Reports, n: usize, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while of_kind(reports, "message").len() < n {
        assert!(
            Instant::now() < deadline,
            "the browser had {} of {n} messages; reports: {:?}",
            of_kind(reports, "message").len(),
            reports.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publishes `m<k>` for every k in `range`, durably, straight to Redis.
async fn publish_range(
    conn: &mut redis::aio::MultiplexedConnection,
    channel: &str,
    range: std::ops::Range<usize>,
) {
    for k in range {
        let env = Envelope {
            event: None,
            data: json!(format!("m{k}")),
        };
        publish::publish_durable(conn, channel, &env).await.unwrap();
    }
}

#[tokio::test]
async fn eventsource_in_chromium_survives_node_restarts_and_misses_nothing() {
    let redis = Redis::start();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", listener.local_addr().unwrap());
    // Fixed ports, so that a restarted node comes back where nginx expects it.
    let addrs: Vec<(String, String)> = (0..2)
        .map(|_| {
            (
                format!("127.0.0.1:{}", free_port()),
                format!("127.0.0.1:{}", free_port()),
            )
        })
        .collect();
    let url = redis.url();
    let start = |i: usize| {
        let (public, admin) = addrs[i].clone();
        let (url, origin) = (url.clone(), origin.clone());
        async move {
            let node = format!("node-{i}");
            let hub = Hub::start(&[
                ("HUB_REDIS_URL", url.as_str()),
                ("HUB_NODE_ID", node.as_str()),
                ("HUB_BIND", public.as_str()),
                ("HUB_ADMIN_BIND", admin.as_str()),
                // Only the page's origin may open streams from a browser.
                ("HUB_ALLOWED_ORIGINS", origin.as_str()),
                ("HUB_DRAIN_SECS", "1"),
                ("HUB_RETRY_MS", "500"),
            ])
            .await;
            hub.wait_ready(WAIT).await;
            hub
        }
    };
    let mut hubs = [start(0).await, start(1).await];
    let nginx = Nginx::start_hub_conf([hubs[0].public, hubs[1].public]);

    let ch = prefix("browser");
    let page = PAGE
        .replace("__HUB__", &format!("http://{}", nginx.addr))
        .replace("__CHANNEL__", &ch);
    let reports: Reports = Arc::default();
    let server = tokio::spawn(page_server(listener, page, reports.clone()));
    let _browser = Chromium::open(&format!("{origin}/"));

    let deadline = Instant::now() + Duration::from_secs(60);
    while of_kind(&reports, "connected").is_empty() {
        assert!(
            Instant::now() < deadline,
            "the page never connected; reports: {:?}",
            reports.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut conn = redis.conn().await;
    publish_range(&mut conn, &ch, 0..10).await;
    wait_messages(&reports, 10, WAIT).await;

    // Twice: stop the node that holds the browser's stream, publish while it is gone, start it
    // again. The browser reconnects through nginx to the other node with Last-Event-ID.
    for round in 0..2 {
        let mut holder = None;
        for (i, h) in hubs.iter().enumerate() {
            if h.metric(r#"hub_connections{transport="sse"}"#).await == 1.0 {
                holder = Some(i);
            }
        }
        let i = holder.expect("one node holds the browser's stream");
        hubs[i].terminate();
        assert!(hubs[i].wait_exit(WAIT).await.success());
        let from = 10 + 10 * round;
        publish_range(&mut conn, &ch, from..from + 10).await;
        hubs[i] = start(i).await;
        wait_messages(&reports, 20 + 10 * round, Duration::from_secs(30)).await;
    }

    let got: Vec<String> = of_kind(&reports, "message")
        .iter()
        .map(|v| v["data"].as_str().unwrap_or_default().to_string())
        .collect();
    let want: Vec<String> = (0..30).map(|i| format!("m{i}")).collect();
    assert_eq!(got, want, "every durable message exactly once, in order");
    assert!(
        of_kind(&reports, "connected").len() >= 3,
        "the browser reconnected on its own after each restart: {:?}",
        reports.lock().unwrap()
    );
    assert!(of_kind(&reports, "reset").is_empty(), "no history was lost");
    server.abort();
}

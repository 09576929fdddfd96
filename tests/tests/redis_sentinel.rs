//! Redis behind Sentinel: the primary is killed (SIGKILL) while durable messages flow; the
//! sentinel promotes the replica (and makes the old primary, once back, its replica), and the
//! hub follows without a restart: readiness goes down and up, its subscriptions come back, and
//! every message the publisher had acknowledged (FCALL, then `WAIT 1` confirming a replica has
//! it) reaches the open stream exactly once, in order.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use hub_tests::{prefix, signal, Hub, SentinelSet, WAIT};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a publisher that follows the sentinel got acknowledged, in order: a message counts only
/// when `WAIT 1` says a replica holds it. Every attempt has its own payload.
async fn publish_through_failover(
    sentinel_port: u16,
    ch: String,
    n: usize,
    acked_count: Arc<AtomicUsize>,
) -> (Vec<String>, HashSet<String>) {
    let (mut acked, mut attempts) = (Vec::new(), HashSet::new());
    let mut conn: Option<redis::aio::MultiplexedConnection> = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut attempt = 0;
    for i in 0..n {
        loop {
            assert!(Instant::now() < deadline, "publishing never got through");
            attempt += 1;
            let data = format!("m{i}.a{attempt}");
            if conn.is_none() {
                let port = hub_tests::redis_server::cli(
                    sentinel_port,
                    &["SENTINEL", "get-master-addr-by-name", "main"],
                )
                .lines()
                .nth(1)
                .and_then(|p| p.trim().parse::<u16>().ok());
                if let Some(port) = port {
                    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
                    conn = tokio::time::timeout(
                        Duration::from_secs(1),
                        client.get_multiplexed_async_connection(),
                    )
                    .await
                    .ok()
                    .and_then(Result::ok);
                }
            }
            let Some(c) = conn.as_mut() else {
                tokio::time::sleep(Duration::from_millis(100)).await; // waiting for a primary: retry pace
                continue;
            };
            attempts.insert(data.clone());
            let env = format!(r#"{{"data":"{data}"}}"#);
            let sent: redis::RedisResult<String> = redis::cmd("FCALL")
                .arg("hub_publish")
                .arg(1)
                .arg(&ch)
                .arg(&env)
                .query_async(c)
                .await;
            let replicated: redis::RedisResult<i64> = match sent {
                Ok(_) => redis::cmd("WAIT").arg(1).arg(1000).query_async(c).await,
                Err(e) => Err(e),
            };
            match replicated {
                Ok(n) if n >= 1 => {
                    acked.push(data);
                    acked_count.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Ok(_) => {} // not on a replica: not acknowledged; try again
                Err(_) => conn = None,
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await; // publishing pace, not a wait
    }
    (acked, attempts)
}

#[tokio::test]
async fn a_failover_is_followed_without_a_restart_and_loses_no_acknowledged_message() {
    let mut set = SentinelSet::start();
    let url = set.url();
    let hub = Hub::start(&[
        ("HUB_REDIS_URL", url.as_str()),
        ("HUB_HEARTBEAT_SECS", "1"),
        ("HUB_STALE_AFTER_SECS", "60"),
    ])
    .await;
    hub.wait_ready(WAIT).await;
    let ch = prefix("failover");
    let (mut stream, _) = hub.connect(&format!("channel={ch}"), &[]).await;

    // Readiness, watched all along.
    let dipped = Arc::new(AtomicBool::new(false));
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let (dipped, watching) = (dipped.clone(), watching.clone());
        let http = hub.http.clone();
        let readyz = hub.admin_url("/readyz");
        tokio::spawn(async move {
            while watching.load(Ordering::Relaxed) {
                let ok = http
                    .get(&readyz)
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 200);
                if !ok {
                    dipped.store(true, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(10)).await; // polling pace
            }
        })
    };

    const N: usize = 60;
    let acked_count = Arc::new(AtomicUsize::new(0));
    let publisher = tokio::spawn(publish_through_failover(
        set.sentinel_port,
        ch.clone(),
        N,
        acked_count.clone(),
    ));
    hub_tests::wait_until("15 acknowledged", WAIT, || async {
        acked_count.load(Ordering::Relaxed) >= 15
    })
    .await;
    let old = set.primary.port;
    signal(set.primary.pid().unwrap(), "KILL");
    hub_tests::wait_until("the sentinel promoted the replica", WAIT, || async {
        set.primary_port().is_some_and(|p| p != old)
    })
    .await;
    // The old primary comes back; the sentinel makes it a replica of the new one, so that
    // writes can be acknowledged by a replica again.
    set.primary.restart();
    let (acked, attempts) = publisher.await.unwrap();
    assert_eq!(acked.len(), N);

    // Every acknowledged message once, in order (unacknowledged attempts may appear once).
    let want: HashSet<&String> = acked.iter().collect();
    let mut got = Vec::new();
    let mut seen = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < acked.len() {
        assert!(Instant::now() < deadline, "got {got:?} of {acked:?}");
        let ev = stream
            .next_message(WAIT)
            .await
            .expect("the stream stayed open");
        if ev.event != "message" {
            continue; // a hub.reset: history lost what it had seen but not acknowledged
        }
        assert!(attempts.contains(&ev.data), "not published: {}", ev.data);
        assert!(seen.insert(ev.data.clone()), "twice: {}", ev.data);
        if want.contains(&ev.data) {
            got.push(ev.data);
        }
    }
    assert_eq!(got, acked, "in order");
    watching.store(false, Ordering::Relaxed);
    watcher.await.unwrap();
    assert!(
        dipped.load(Ordering::Relaxed),
        "readiness went down during the failover"
    );
    assert!(hub.is_ready().await, "and came back");
    assert!(hub.metric("hub_redis_reconnects_total").await >= 1.0);
    set.primary.stop();
}

/// Presence through a failover: the counts live in the primary and its replica; after the
/// sentinel promotes the replica the node reports its counts again and reads its channels'
/// users again, so the observer's list stays right: a user who left during the failover is
/// gone from it, one who comes after is a join, and the admin counts agree.
#[tokio::test]
async fn presence_follows_a_failover() {
    use hub_tests::client::{token, SECRET};
    let mut set = SentinelSet::start();
    let url = set.url();
    let hub = Hub::start(&[
        ("HUB_REDIS_URL", url.as_str()),
        ("HUB_JWT_SECRET", SECRET),
        ("HUB_HEARTBEAT_SECS", "2"),
    ])
    .await;
    hub.wait_ready(WAIT).await;
    let ch = format!("public:{}", prefix("sentpres"));
    let q = |sub: &str| format!("channel={ch}&token={}", token(sub, &["*"], 3600));
    let (_u1, _) = hub.connect(&q("u1"), &[]).await;
    let (u2, _) = hub.connect(&q("u2"), &[]).await;
    hub_tests::wait_until("u1, u2 counted", WAIT, || async {
        hub.presence(&ch).await["users"] == serde_json::json!({"u1": 1, "u2": 1})
    })
    .await;
    let (mut watcher, _) = hub
        .connect(&format!("{}&presence=true", q("watcher")), &[])
        .await;
    let mut list: std::collections::BTreeSet<String> = Default::default();
    watcher
        .follow_presence(&mut list, &["u1", "u2", "watcher"])
        .await;

    let old = set.primary.port;
    signal(set.primary.pid().unwrap(), "KILL");
    drop(u2);
    hub_tests::wait_until("the sentinel promoted the replica", WAIT, || async {
        set.primary_port().is_some_and(|p| p != old)
    })
    .await;
    hub.wait_ready(WAIT).await;
    let (_u3, _) = hub.connect(&q("u3"), &[]).await;
    watcher
        .follow_presence(&mut list, &["u1", "u3", "watcher"])
        .await;
    hub_tests::wait_until("counts on the new primary", WAIT, || async {
        hub.presence(&ch).await["users"] == serde_json::json!({"u1": 1, "u3": 1, "watcher": 1})
    })
    .await;
    set.primary.stop();
}

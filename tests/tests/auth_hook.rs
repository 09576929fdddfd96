//! The authorization hook (`HUB_AUTH_URL`) against a small backend this test runs: a grant
//! works like a token's claims (channels, `expires_at` as `exp`, WebSocket subscribes), 401 and
//! 403 are passed on, a slow, down or junk-answering backend is 503 (an EventSource is told to
//! come back), junk is logged once per kind, the concurrency bound answers at once, public
//! channels never ask, and a token or a cookie token skips the hook.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use hub_tests::client::{next, now, send, token, try_ws, SECRET};
use hub_tests::receiver::read_request;
use hub_tests::{wait_until, Hub, WAIT};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// What the backend answers.
#[derive(Clone)]
enum Answer {
    Grant(Value),
    Status(u16),
    /// 200 with a body that is not a grant.
    Junk(&'static str),
    /// The grant, after this long.
    Slow(Duration, Value),
}

#[derive(Clone)]
struct Backend {
    url: String,
    answer: Arc<Mutex<Answer>>,
    asked: Arc<Mutex<Vec<Value>>>,
}

impl Backend {
    async fn start(answer: Answer) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/auth", listener.local_addr().unwrap());
        let b = Backend {
            url,
            answer: Arc::new(Mutex::new(answer)),
            asked: Arc::new(Mutex::new(Vec::new())),
        };
        let me = b.clone();
        tokio::spawn(async move {
            while let Ok((io, _)) = listener.accept().await {
                let me = me.clone();
                tokio::spawn(async move { me.serve(io).await });
            }
        });
        b
    }

    fn set(&self, answer: Answer) {
        *self.answer.lock().unwrap() = answer;
    }

    fn asked(&self) -> Vec<Value> {
        self.asked.lock().unwrap().clone()
    }

    /// HTTP/1.1 with keep-alive, as the hub's pooled client speaks it.
    async fn serve(&self, mut io: TcpStream) {
        let mut buf = Vec::new();
        while let Some((_, body)) = read_request(&mut io, &mut buf).await {
            let body: Value = serde_json::from_slice(&body).unwrap();
            self.asked.lock().unwrap().push(body);
            let answer = self.answer.lock().unwrap().clone();
            let (status, text) = match answer {
                Answer::Grant(v) => (200, v.to_string()),
                Answer::Status(s) => (s, "{}".to_string()),
                Answer::Junk(t) => (200, t.to_string()),
                Answer::Slow(d, v) => {
                    tokio::time::sleep(d).await;
                    (200, v.to_string())
                }
            };
            let res = format!(
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{text}",
                text.len()
            );
            if io.write_all(res.as_bytes()).await.is_err() {
                return;
            }
        }
    }
}

fn grant(sub: &str, channels: &[&str]) -> Value {
    json!({"sub": sub, "channels": channels})
}

async fn hub_with(backend: &Backend, extra: &[(&str, &str)]) -> Hub {
    let mut env = vec![
        ("HUB_AUTH_URL", backend.url.as_str()),
        ("HUB_JWT_SECRET", SECRET),
        ("HUB_JWT_COOKIE", "hub_token"),
    ];
    env.extend_from_slice(extra);
    Hub::start(&env).await
}

#[tokio::test]
async fn a_grant_authorizes_like_a_token() {
    let backend = Backend::start(Answer::Grant(grant("42", &["room:*"]))).await;
    let hub = hub_with(&backend, &[]).await;
    let (mut s, connected) = hub
        .connect(
            "channel=room:1",
            &[
                ("cookie", "session=abc; theme=dark"),
                ("origin", "https://app.example"),
            ],
        )
        .await;
    assert_eq!(connected.json()["channels"], json!(["room:1"]));
    let asked = backend.asked();
    assert_eq!(asked.len(), 1);
    assert_eq!(
        asked[0],
        json!({
            "channels": ["room:1"],
            "transport": "sse",
            "remote_addr": "127.0.0.1",
            "headers": {"cookie": "session=abc; theme=dark", "origin": "https://app.example"}
        })
    );
    hub.publish("room:1", None, json!("hi"), true).await;
    assert_eq!(s.next_message(WAIT).await.unwrap().data, "hi");
    wait_until("the granted sub is present", WAIT, || async {
        hub.presence("room:1").await["users"] == json!({"42": 1})
    })
    .await;

    // A channel the grant does not hold: 403. Public channels never ask.
    assert_eq!(hub.sse("channel=secret", &[]).await.status, 403);
    let (p, _) = hub.connect("channel=public:x", &[]).await;
    drop(p);
    assert_eq!(backend.asked().len(), 2);
    // A token, or the cookie's token, is used instead of the hook; a bad one is 401.
    let t = token("7", &["room:*"], 600);
    let (x, _) = hub.connect(&format!("channel=room:1&token={t}"), &[]).await;
    drop(x);
    let cookie = format!("hub_token={t}");
    let (x, _) = hub.connect("channel=room:1", &[("cookie", &cookie)]).await;
    drop(x);
    assert_eq!(hub.sse("channel=room:1&token=junk", &[]).await.status, 401);
    assert_eq!(backend.asked().len(), 2, "no call with a token");
}

#[tokio::test]
async fn backend_refusals_pass_and_failures_are_503() {
    let backend = Backend::start(Answer::Status(401)).await;
    let hub = hub_with(&backend, &[("HUB_AUTH_TIMEOUT_MS", "300")]).await;
    let ask = || hub.sse("channel=room:1", &[]);
    assert_eq!(ask().await.status, 401);
    backend.set(Answer::Status(403));
    assert_eq!(ask().await.status, 403);
    for answer in [
        Answer::Status(500),
        Answer::Status(302),
        Answer::Junk("not json"),
        Answer::Junk(r#"{"channels":["room:*"]}"#),
        Answer::Junk(r#"{"sub":""}"#),
        Answer::Slow(Duration::from_secs(3), grant("1", &["*"])),
    ] {
        backend.set(answer);
        let started = Instant::now();
        let mut s = ask().await;
        let status = s.status;
        assert_eq!(status, 503, "{}", s.error_body().await);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
    // An EventSource is told to come back, as for any refusal that passes.
    let mut s = hub
        .sse("channel=room:1", &[("accept", "text/event-stream")])
        .await;
    assert_eq!(s.status, 200);
    let e = s.next_message(WAIT).await.unwrap();
    assert_eq!(
        (e.event.as_str(), e.json()["reason"].clone()),
        ("hub.reconnect", json!("unavailable"))
    );
    assert_eq!(
        hub.metric("hub_connections_rejected_total{reason=\"unavailable\"}")
            .await,
        7.0
    );
    // Junk is logged once per kind, however often it comes.
    backend.set(Answer::Junk("<html>"));
    for _ in 0..3 {
        assert_eq!(ask().await.status, 503);
    }
    let log = hub.log();
    assert_eq!(log.matches("kind=Junk").count(), 1, "{log}");
    assert_eq!(log.matches("kind=Timeout").count(), 1, "{log}");

    // A backend that is down.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/auth", closed.local_addr().unwrap());
    drop(closed);
    let down = Hub::start(&[("HUB_AUTH_URL", &url)]).await;
    assert_eq!(down.sse("channel=room:1", &[]).await.status, 503);
    // The node itself is fine.
    let (p, _) = down.connect("channel=public:ok", &[]).await;
    drop(p);
}

#[tokio::test]
async fn a_websocket_is_authorized_once_at_the_upgrade() {
    let backend = Backend::start(Answer::Grant(grant("9", &["room:*"]))).await;
    let hub = hub_with(&backend, &[]).await;
    let mut ws = try_ws(hub.public, "", &[("cookie", "session=s9")])
        .await
        .unwrap();
    send(&mut ws, json!({"op": "subscribe", "channel": "room:2"})).await;
    assert_eq!(
        next(&mut ws).await,
        json!({"type": "subscribed", "channel": "room:2"})
    );
    send(&mut ws, json!({"op": "subscribe", "channel": "other"})).await;
    assert_eq!(next(&mut ws).await["code"], 403);
    let asked = backend.asked();
    assert_eq!(asked.len(), 1);
    assert_eq!(
        asked[0],
        json!({"channels": [], "transport": "ws", "remote_addr": "127.0.0.1", "headers": {"cookie": "session=s9"}})
    );
    backend.set(Answer::Status(401));
    assert_eq!(try_ws(hub.public, "", &[]).await.err(), Some(401));
}

#[tokio::test]
async fn expires_at_ends_the_stream_and_a_revocation_by_sub_applies_to_grants() {
    let backend = Backend::start(Answer::Grant(
        json!({"sub": "3", "channels": ["room:*"], "expires_at": now() + 2}),
    ))
    .await;
    let hub = hub_with(&backend, &[]).await;
    let (mut s, _) = hub.connect("channel=room:1", &[]).await;
    let e = s.next_message(Duration::from_secs(5)).await.unwrap();
    assert_eq!(e.event, "hub.reconnect");
    assert_eq!(e.json()["reason"], "token_expired");
    // A grant already expired is 401.
    backend.set(Answer::Grant(
        json!({"sub": "3", "channels": ["*"], "expires_at": now() - 1}),
    ));
    assert_eq!(hub.sse("channel=room:1", &[]).await.status, 401);

    backend.set(Answer::Grant(grant("3", &["room:*"])));
    let (mut s, _) = hub.connect("channel=room:1", &[]).await;
    let res = hub
        .http
        .post(hub.admin_url("/v1/revoke"))
        .json(&json!({"sub": "3", "before": now() + 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 202);
    let e = s.next_message(Duration::from_secs(1)).await.unwrap();
    assert_eq!(
        (e.event.as_str(), e.json()),
        ("hub.disconnect", json!({"reason": "revoked"}))
    );
    // A grant made after `before` passes.
    let later = now() + 1;
    wait_until(
        "a grant after the revocation's instant",
        Duration::from_secs(5),
        || async { now() > later },
    )
    .await;
    let (s, _) = hub.connect("channel=room:1", &[]).await;
    drop(s);
}

/// A grant for a request with a credential is reused for the same request (a reconnect) for
/// `HUB_AUTH_CACHE_SECS`; another credential asks again; a disconnect of the sub forgets it.
#[tokio::test]
async fn a_reconnect_with_the_same_cookie_reuses_the_grant() {
    let backend = Backend::start(Answer::Grant(grant("8", &["room:*"]))).await;
    let hub = hub_with(&backend, &[]).await;
    let open = |cookie: &'static str| {
        let hub = &hub;
        async move {
            let (s, _) = hub.connect("channel=room:1", &[("cookie", cookie)]).await;
            drop(s);
        }
    };
    open("session=a").await;
    open("session=a").await;
    assert_eq!(backend.asked().len(), 1, "the reconnect reused the grant");
    open("session=b").await;
    assert_eq!(backend.asked().len(), 2, "another cookie asks");
    // The backend no longer grants; a disconnect of the sub makes the hub ask again.
    backend.set(Answer::Status(401));
    open("session=a").await;
    let res = hub
        .http
        .post(hub.admin_url("/v1/disconnect"))
        .json(&json!({"sub": "8"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 202);
    assert_eq!(
        hub.sse("channel=room:1", &[("cookie", "session=a")])
            .await
            .status,
        401
    );
    // Without the cache every request asks.
    backend.set(Answer::Grant(grant("8", &["room:*"])));
    let uncached = hub_with(&backend, &[("HUB_AUTH_CACHE_SECS", "0")]).await;
    let before = backend.asked().len();
    for _ in 0..2 {
        let (s, _) = uncached
            .connect("channel=room:1", &[("cookie", "session=a")])
            .await;
        drop(s);
    }
    assert_eq!(backend.asked().len(), before + 2);
}

/// `HUB_AUTH_CONCURRENCY` calls in flight and a bounded number waiting; more get 503 at once,
/// not a pile-up.
#[tokio::test]
async fn requests_beyond_the_concurrency_are_refused_at_once() {
    let backend = Backend::start(Answer::Slow(
        Duration::from_millis(1500),
        grant("1", &["*"]),
    ))
    .await;
    let hub = hub_with(
        &backend,
        &[
            ("HUB_AUTH_CONCURRENCY", "1"),
            ("HUB_AUTH_TIMEOUT_MS", "5000"),
        ],
    )
    .await;
    let started = Instant::now();
    // One in flight and 64 waiting (64 places per slot): of 70, five are refused at once.
    let asks = (0..70).map(|_| {
        let hub = &hub;
        async move {
            let s = hub.sse("channel=room:1", &[]).await;
            (s.status, started.elapsed())
        }
    });
    let answers = futures_util::future::join_all(asks).await;
    let quick_503 = answers
        .iter()
        .filter(|(status, t)| *status == 503 && *t < Duration::from_millis(700))
        .count();
    let granted = answers.iter().filter(|(status, _)| *status == 200).count();
    assert_eq!(quick_503, 5, "{answers:?}");
    assert!(granted >= 1, "{answers:?}");
    assert!(backend.asked().len() <= 65, "{}", backend.asked().len());
}

/// A client that goes away while the hook is being asked holds nothing: its call is dropped
/// and its slot given back at once (the only slot here), and no stream is counted.
#[tokio::test]
async fn a_client_gone_while_the_hook_is_asked_holds_nothing() {
    let backend = Backend::start(Answer::Slow(Duration::from_secs(3), grant("1", &["*"]))).await;
    let hub = hub_with(
        &backend,
        &[
            ("HUB_AUTH_CONCURRENCY", "1"),
            ("HUB_AUTH_TIMEOUT_MS", "10000"),
        ],
    )
    .await;
    let gone = hub_tests::raw_get(hub.public, "/v1/sse?channel=room:1", &[], None).await;
    wait_until("the hook is being asked", WAIT, || async {
        !backend.asked().is_empty()
    })
    .await;
    drop(gone);
    backend.set(Answer::Grant(grant("2", &["*"])));
    let started = Instant::now();
    let (s, _) = hub.connect("channel=room:1", &[]).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the gone client's slot was given back: {:?}",
        started.elapsed()
    );
    drop(s);
    wait_until("nothing held", WAIT, || async {
        let stats = hub.stats().await;
        stats["connections"]["total"] == 0 && stats["connections"]["admitted"] == 0
    })
    .await;
    assert_eq!(
        hub.metric("hub_connections_opened_total{transport=\"sse\"}")
            .await,
        1.0
    );
}

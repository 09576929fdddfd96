//! Redis behind TLS and passwords: `rediss://` with a private CA (`HUB_REDIS_CA_FILE`) carries
//! streams and publishes; a certificate that does not verify, or a TLS URL against a plaintext
//! server, never connects (the node stays not ready and says why); passwords and ACL users work
//! in the URL, and a wrong one keeps the node not ready. Certificates are made by openssl for
//! each run.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use hub_tests::{prefix, wait_until, Hub, Redis, TlsCerts, WAIT};
use serde_json::json;
use std::time::Duration;

/// A node that must stay not ready: checked for a few self-ping periods, with the reason in
/// its log.
async fn stays_not_ready(hub: &Hub, why: &str) {
    wait_until(&format!("the log says why: {why}"), WAIT, || async {
        hub.log().contains("Redis connection error")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await; // the node had time to connect: a span, not a wait
    assert!(
        !hub.is_ready().await,
        "{why}: ready without a verified connection"
    );
    assert_eq!(hub.metric("hub_redis_up").await, 0.0, "{why}");
}

#[tokio::test]
async fn tls_with_a_private_ca_and_a_password_carries_streams_and_publishes() {
    let certs = TlsCerts::make();
    let redis = Redis::start_tls(&certs, Some("s3cret"));
    let url = redis.url();
    assert!(url.starts_with("rediss://:s3cret@"), "{url}");
    let ca = certs.ca.to_string_lossy().into_owned();
    let hub = Hub::start(&[
        ("HUB_REDIS_URL", url.as_str()),
        ("HUB_REDIS_CA_FILE", ca.as_str()),
    ])
    .await;
    hub.wait_ready(WAIT).await;
    let ch = prefix("tls");
    let (mut s, _) = hub.connect(&format!("channel={ch}"), &[]).await;
    let id = hub.publish(&ch, None, json!("over tls"), true).await;
    let m = s.next_message(WAIT).await.unwrap();
    assert_eq!((m.id, m.data), (Some(id), "over tls".to_string()));
    // The message went through Redis: it is in the channel's history there.
    assert_eq!(redis.cli(&["XLEN", &format!("hub:hist:{{{ch}}}")]), "1");
}

#[tokio::test]
async fn a_certificate_that_does_not_verify_never_connects() {
    let certs = TlsCerts::make();
    let redis = Redis::start_tls(&certs, None);
    // The system's roots do not know the test CA.
    let url = redis.url();
    let hub = Hub::start(&[("HUB_REDIS_URL", url.as_str())]).await;
    stays_not_ready(&hub, "unknown CA").await;
    let ch = prefix("untrusted");
    assert_eq!(hub.sse(&format!("channel={ch}"), &[]).await.status, 503);
}

#[tokio::test]
async fn a_tls_url_against_a_plaintext_server_never_connects() {
    let certs = TlsCerts::make();
    let redis = Redis::start();
    let url = redis.url().replace("redis://", "rediss://");
    let ca = certs.ca.to_string_lossy().into_owned();
    let hub = Hub::start(&[
        ("HUB_REDIS_URL", url.as_str()),
        ("HUB_REDIS_CA_FILE", ca.as_str()),
    ])
    .await;
    stays_not_ready(&hub, "plaintext server").await;
    // Nothing reached the server in clear: it never saw the hub's library.
    assert_eq!(redis.cli(&["FUNCTION", "LIST"]), "");
}

#[tokio::test]
async fn passwords_and_acl_users_in_the_url() {
    let redis = Redis::start_with_password("pw");
    redis.cli(&[
        "ACL", "SETUSER", "hubnode", "on", ">nodepw", "~*", "&*", "+@all",
    ]);
    for (url, works) in [
        (redis.url(), true),
        (redis.url().replace(":pw@", "hubnode:nodepw@"), true),
        (redis.url().replace(":pw@", ":wrong@"), false),
    ] {
        let hub = Hub::start(&[("HUB_REDIS_URL", url.as_str())]).await;
        if works {
            hub.wait_ready(WAIT).await;
            let ch = prefix("acl");
            let (mut s, _) = hub.connect(&format!("channel={ch}"), &[]).await;
            hub.publish(&ch, None, json!("ok"), true).await;
            assert_eq!(s.next_message(WAIT).await.unwrap().data, "ok");
        } else {
            stays_not_ready(&hub, "wrong password").await;
        }
    }
}

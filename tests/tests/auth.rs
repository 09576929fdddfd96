//! Tokens against a real hub: HS256 with `HUB_JWT_SECRET`, RS256/ES256 with a PEM at
//! `HUB_JWT_PUBLIC_KEY`, header and query tokens, 401 versus 403 (granted whole or refused
//! whole), `alg: none` and algorithm confusion refused, per-user limits, and a stream closed
//! with `hub.reconnect` when its token expires. Keys are made by `openssl` for each run.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use hub_tests::client::{hs256, now, SECRET};
use hub_tests::{Hub, WAIT};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// Makes a key pair with openssl; returns (private PEM, public PEM path).
fn keypair(kind: &str) -> (Vec<u8>, PathBuf) {
    let dir = std::env::temp_dir().join(format!("hub-test-{}/keys-{kind}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let private = dir.join("private.pem");
    let public = dir.join("public.pem");
    let gen = match kind {
        "rsa" => vec![
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ],
        _ => vec![
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ],
    };
    let ok = Command::new("openssl")
        .args(&gen)
        .arg("-out")
        .arg(&private)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok, "openssl genpkey");
    let ok = Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&private)
        .arg("-out")
        .arg(&public)
        .status()
        .unwrap()
        .success();
    assert!(ok, "openssl pkey -pubout");
    (std::fs::read(&private).unwrap(), public)
}

async fn status(hub: &Hub, query: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut s = hub.sse(query, headers).await;
    let st = s.status;
    if st == 200 {
        return (st, Value::Null);
    }
    (st, serde_json::from_str(&s.error_body().await).unwrap())
}

#[tokio::test]
async fn hs256_grants_401_and_403() {
    let hub = Hub::start(&[("HUB_JWT_SECRET", SECRET)]).await;
    let exp = now() + 600;
    let token = hs256(json!({"sub": "42", "exp": exp, "channels": ["room:*", "news"]}));
    let bearer = format!("Bearer {token}");
    let auth = [("Authorization", bearer.as_str())];
    // Granted: own user channel, a pattern, an exact name, public; by header or by query.
    for q in [
        "channel=user:42",
        "channel=room:7&channel=news&channel=public:x",
    ] {
        assert_eq!(status(&hub, q, &auth).await.0, 200, "{q}");
        assert_eq!(
            status(&hub, &format!("{q}&token={token}"), &[]).await.0,
            200,
            "{q} with ?token="
        );
    }
    // Public channels need no token, and a bad token there is not held against them.
    assert_eq!(status(&hub, "channel=public:x", &[]).await.0, 200);
    assert_eq!(
        status(&hub, "channel=public:x&token=junk", &[]).await.0,
        200
    );
    // 401: missing, malformed, badly signed, expired (no leeway), without sub.
    let other_secret = encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "42", "exp": exp}),
        &EncodingKey::from_secret(b"another-secret-entirely!"),
    )
    .unwrap();
    let expired = hs256(json!({"sub": "42", "exp": now() - 5, "channels": ["*"]}));
    let no_sub = hs256(json!({"exp": exp, "channels": ["*"]}));
    for t in [
        None,
        Some("junk"),
        Some(other_secret.as_str()),
        Some(expired.as_str()),
        Some(no_sub.as_str()),
    ] {
        let q = match t {
            Some(t) => format!("channel=room:1&token={t}"),
            None => "channel=room:1".into(),
        };
        let (st, body) = status(&hub, &q, &[]).await;
        assert_eq!(
            (st, body["error"].as_str()),
            (401, Some("unauthorized")),
            "{t:?}"
        );
    }
    // 403: valid token, channel not granted; and the whole request is refused with it.
    for q in [
        "channel=user:43",
        "channel=secret",
        "channel=room:1&channel=rooms:1",
        "channel=newsroom",
    ] {
        let (st, body) = status(&hub, q, &auth).await;
        assert_eq!(
            (st, body["error"].as_str()),
            (403, Some("forbidden")),
            "{q}"
        );
    }
    assert_eq!(
        hub.metric(r#"hub_connections_rejected_total{reason="unauthorized"}"#)
            .await,
        5.0
    );
    assert_eq!(
        hub.metric(r#"hub_connections_rejected_total{reason="forbidden"}"#)
            .await,
        4.0
    );
    // A bad channel name is 400 before the token is looked at.
    assert_eq!(status(&hub, "channel=bad%20name", &[]).await.0, 400);
    assert!(!hub.log().contains(&token), "tokens never appear in logs");
}

#[tokio::test]
async fn rs256_and_es256_public_keys() {
    for (kind, alg) in [("rsa", Algorithm::RS256), ("ec", Algorithm::ES256)] {
        let (private, public) = keypair(kind);
        let public_path = public.to_str().unwrap().to_string();
        let hub = Hub::start(&[("HUB_JWT_PUBLIC_KEY", public_path.as_str())]).await;
        let key = match kind {
            "rsa" => EncodingKey::from_rsa_pem(&private).unwrap(),
            _ => EncodingKey::from_ec_pem(&private).unwrap(),
        };
        let claims = json!({"sub": "u1", "exp": now() + 600, "channels": ["room:*"]});
        let good = encode(&Header::new(alg), &claims, &key).unwrap();
        assert_eq!(
            status(&hub, &format!("channel=room:1&token={good}"), &[])
                .await
                .0,
            200,
            "{kind}"
        );
        // Algorithm confusion: an HS256 token whose secret is the public key is refused.
        let pem = std::fs::read(&public).unwrap();
        let confused = encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&pem),
        )
        .unwrap();
        assert_eq!(
            status(&hub, &format!("channel=room:1&token={confused}"), &[])
                .await
                .0,
            401,
            "{kind} confusion"
        );
        // alg: none, unsigned.
        use base64_like::b64;
        let none = format!(
            "{}.{}.",
            b64(br#"{"alg":"none","typ":"JWT"}"#),
            b64(claims.to_string().as_bytes())
        );
        assert_eq!(
            status(&hub, &format!("channel=room:1&token={none}"), &[])
                .await
                .0,
            401,
            "{kind} alg none"
        );
    }
}

/// Base64url without padding, enough to forge an unsigned token.
mod base64_like {
    pub fn b64(input: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in input.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..=chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    }
}

#[tokio::test]
async fn per_user_limit_is_429_and_exact() {
    let hub = Hub::start(&[
        ("HUB_JWT_SECRET", SECRET),
        ("HUB_MAX_CONNECTIONS_PER_USER", "2"),
        ("HUB_HEARTBEAT_SECS", "1"),
        ("HUB_STALE_AFTER_SECS", "5"),
    ])
    .await;
    let alice = hs256(json!({"sub": "alice", "exp": now() + 600}));
    let bob = hs256(json!({"sub": "bob", "exp": now() + 600}));
    let q = |t: &str| {
        format!(
            "channel=user:{}&token={t}",
            if t == alice { "alice" } else { "bob" }
        )
    };
    let (a1, _) = hub.connect(&q(&alice), &[]).await;
    let (_a2, _) = hub.connect(&q(&alice), &[]).await;
    let (st, body) = status(&hub, &q(&alice), &[]).await;
    assert_eq!((st, body["error"].as_str()), (429, Some("user_limit")));
    // Public streams with a token count for its user too.
    assert_eq!(
        status(&hub, &format!("channel=public:x&token={alice}"), &[])
            .await
            .0,
        429
    );
    // Another user is not affected.
    let (_b1, _) = hub.connect(&q(&bob), &[]).await;
    assert_eq!(
        hub.metric(r#"hub_connections_rejected_total{reason="user_limit"}"#)
            .await,
        2.0
    );
    // When one of alice's streams leaves, she may open one again (counts are exact).
    drop(a1);
    hub.wait_metric(
        r#"hub_connections{transport="sse"}"#,
        2.0,
        Duration::from_secs(5),
    )
    .await;
    let (_a3, _) = hub.connect(&q(&alice), &[]).await;
    assert_eq!(status(&hub, &q(&alice), &[]).await.0, 429);
}

#[tokio::test]
async fn a_stream_is_closed_when_its_token_expires() {
    let hub = Hub::start(&[("HUB_JWT_SECRET", SECRET), ("HUB_RETRY_MS", "1000")]).await;
    let token = hs256(json!({"sub": "7", "exp": now() + 2, "channels": ["room:*"]}));
    let (mut s, _) = hub
        .connect(&format!("channel=room:9&token={token}"), &[])
        .await;
    let ev = s
        .next_message(Duration::from_secs(6))
        .await
        .expect("hub.reconnect before the end");
    assert_eq!(ev.event, "hub.reconnect");
    assert_eq!(
        ev.json(),
        json!({"reason": "token_expired", "retry_ms": 1000})
    );
    assert!(s.next_event(WAIT).await.is_none(), "the stream ends");
    assert_eq!(
        hub.metric(r#"hub_connections_closed_total{transport="sse",reason="token_expired"}"#)
            .await,
        1.0
    );
    assert_eq!(hub.metric(r#"hub_connections{transport="sse"}"#).await, 0.0);
}

#[test]
fn bad_key_configuration_stops_the_hub_with_a_clear_line() {
    for (k, v) in [
        ("HUB_JWT_PUBLIC_KEY", "/nonexistent/key.pem"),
        ("HUB_JWT_SECRET", "short"),
    ] {
        let out = Command::new(hub_tests::binary("hub"))
            .env_clear()
            .env("HUB_BIND", "127.0.0.1:0")
            .env("HUB_ADMIN_BIND", "127.0.0.1:0")
            .env(k, v)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains(k), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[tokio::test]
async fn nbf_issuer_and_audience_are_checked() {
    // Without HUB_JWT_ISSUER / HUB_JWT_AUDIENCE: `nbf` is honoured, `iss` and `aud` are not
    // looked at (identity providers always set `aud`).
    let hub = Hub::start(&[("HUB_JWT_SECRET", SECRET)]).await;
    let exp = now() + 600;
    let q = |t: &str| format!("channel=room:1&token={t}");
    let later = hs256(json!({"sub": "1", "exp": exp, "nbf": now() + 300, "channels": ["*"]}));
    let (st, body) = status(&hub, &q(&later), &[]).await;
    assert_eq!(st, 401, "{body}");
    assert!(body["message"].as_str().unwrap().contains("nbf"), "{body}");
    let began = hs256(json!({"sub": "1", "exp": exp, "nbf": now() - 5, "channels": ["*"]}));
    assert_eq!(status(&hub, &q(&began), &[]).await.0, 200);
    let foreign = hs256(json!({"sub": "1", "exp": exp, "iss": "x", "aud": "y", "channels": ["*"]}));
    assert_eq!(status(&hub, &q(&foreign), &[]).await.0, 200);

    // With both set: a token for another service (or one naming neither) is refused.
    let hub = Hub::start(&[
        ("HUB_JWT_SECRET", SECRET),
        ("HUB_JWT_ISSUER", "https://auth.example"),
        ("HUB_JWT_AUDIENCE", "hub"),
    ])
    .await;
    let claims = |iss: Option<&str>, aud: Option<&str>| {
        let mut c = json!({"sub": "1", "exp": exp, "channels": ["*"]});
        if let Some(i) = iss {
            c["iss"] = i.into();
        }
        if let Some(a) = aud {
            c["aud"] = a.into();
        }
        hs256(c)
    };
    let ours = claims(Some("https://auth.example"), Some("hub"));
    assert_eq!(status(&hub, &q(&ours), &[]).await.0, 200);
    let several = hs256(
        json!({"sub": "1", "exp": exp, "iss": "https://auth.example", "aud": ["hub"], "channels": ["*"]}),
    );
    assert_eq!(status(&hub, &q(&several), &[]).await.0, 200);
    for (t, why) in [
        (claims(Some("https://evil.example"), Some("hub")), "iss"),
        (claims(Some("https://auth.example"), Some("billing")), "aud"),
        (claims(None, Some("hub")), "iss"),
        (claims(Some("https://auth.example"), None), "aud"),
    ] {
        let (st, body) = status(&hub, &q(&t), &[]).await;
        assert_eq!(st, 401, "{why}: {body}");
        assert!(
            body["message"].as_str().unwrap().contains(why),
            "{why}: {body}"
        );
    }
}

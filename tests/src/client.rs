//! Clients the tests share: HS256 tokens signed with [`SECRET`], and a WebSocket client that
//! speaks the hub's JSON frames.

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{connect_async, MaybeTlsStream, WebSocketStream};

use crate::WAIT;

/// The `HUB_JWT_SECRET` tests start hubs with.
pub const SECRET: &str = "a-test-secret-of-enough-length";

/// Unix time in seconds.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// An HS256 token over any claims, signed with [`SECRET`].
pub fn hs256(claims: Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("encode token")
}

/// A token for `sub` granting `channels`, valid for `ttl` seconds (negative: expired).
pub fn token(sub: &str, channels: &[&str], ttl: i64) -> String {
    hs256(json!({"sub": sub, "exp": now() as i64 + ttl, "channels": channels}))
}

pub type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens `ws://<public>/v1/ws<query>`; `Err(status)` when the upgrade is refused.
pub async fn try_ws(public: SocketAddr, query: &str, headers: &[(&str, &str)]) -> Result<Ws, u16> {
    let mut req = format!("ws://{public}/v1/ws{query}")
        .into_client_request()
        .expect("request");
    for (k, v) in headers {
        let name: tokio_tungstenite::tungstenite::http::HeaderName =
            k.parse().expect("header name");
        req.headers_mut()
            .insert(name, v.parse().expect("header value"));
    }
    match connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(WsError::Http(res)) => Err(res.status().as_u16()),
        Err(e) => panic!("websocket connect: {e}"),
    }
}

/// Sends one JSON text frame.
pub async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.expect("send");
}

/// The next text frame as JSON (pings are answered by the client library and skipped).
pub async fn next(ws: &mut Ws) -> Value {
    loop {
        let m = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame in time")
            .expect("socket open")
            .expect("frame");
        match m {
            Message::Text(t) => return serde_json::from_str(&t).expect("JSON frame"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// Subscribes and waits for `subscribed`.
pub async fn subscribe(ws: &mut Ws, ch: &str) {
    send(ws, json!({"op": "subscribe", "channel": ch})).await;
    assert_eq!(next(ws).await, json!({"type": "subscribed", "channel": ch}));
}

//! The backend's authorization hook (`HUB_AUTH_URL`): a stream request that carries no token
//! is POSTed there and the answer grants it like a token's claims, passes on 401/403, or (for
//! anything else, or no answer within `HUB_AUTH_TIMEOUT_MS`) refuses it as unavailable.
//!
//! One pooled client; at most `HUB_AUTH_CONCURRENCY` calls in flight and a bounded few waiting
//! for one, beyond which a request is refused at once (a reconnect storm must not pile up
//! here). It never retries: the refused client comes back on its own schedule.

use crate::auth::Claims;
use crate::domain::Transport;
use crate::refusal::{Kind, Refusal};
use protocol::ChannelName;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// Requests that may wait for a call slot, per slot: a burst a few times the concurrency is
/// smoothed over; beyond it the answer is an immediate 503, which an EventSource survives.
const WAITING_PER_SLOT: usize = 4;
/// Largest answer read from the backend (a grant is a `sub` and some patterns).
const MAX_ANSWER: usize = 64 * 1024;
/// Longest `sub` a grant may name.
const MAX_SUB: usize = 256;

/// What the hub tells the backend about a stream request.
#[derive(Debug, Serialize)]
pub struct Ask<'a> {
    pub channels: Vec<&'a str>,
    pub transport: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote_addr: Option<String>,
    pub headers: AskHeaders<'a>,
}

/// The request headers the backend may decide on (only those present).
#[derive(Debug, Default, Serialize)]
pub struct AskHeaders<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cookie: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authorization: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<&'a str>,
}

impl<'a> Ask<'a> {
    pub fn new(
        channels: &'a [ChannelName],
        transport: Transport,
        remote: Option<SocketAddr>,
        headers: AskHeaders<'a>,
    ) -> Ask<'a> {
        Ask {
            channels: channels.iter().map(|c| c.as_str()).collect(),
            transport: transport.as_str(),
            remote_addr: remote.map(|a| a.ip().to_string()),
            headers,
        }
    }
}

/// A grant as the backend writes it.
#[derive(Debug, Deserialize)]
struct Answer {
    sub: String,
    #[serde(default)]
    channels: Vec<String>,
    #[serde(default)]
    expires_at: Option<u64>,
}

/// Why a call failed, each logged once (then counted by the refusals' metric only).
#[derive(Debug, Clone, Copy)]
enum Failure {
    Busy = 0,
    Timeout = 1,
    Unreachable = 2,
    Status = 3,
    Junk = 4,
}

pub struct AuthHook {
    client: reqwest::Client,
    url: reqwest::Url,
    timeout: Duration,
    slots: Semaphore,
    waiting: AtomicUsize,
    max_waiting: usize,
    noted: [AtomicBool; 5],
}

/// A granted request: the claims the backend gave and their expiry.
pub struct Granted {
    pub claims: Arc<Claims>,
    pub expires_at: Option<u64>,
}

impl AuthHook {
    /// The hook of a checked configuration, `None` without `HUB_AUTH_URL`.
    pub fn from_config(config: &crate::config::Config) -> anyhow::Result<Option<AuthHook>> {
        let Some(url) = &config.auth_url else {
            return Ok(None);
        };
        let url = reqwest::Url::parse(url)?;
        // The process's rustls provider (ring, as the hub's other TLS); already set is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let concurrency = config.auth_concurrency as usize;
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(concurrency)
            .connect_timeout(Duration::from_millis(config.auth_timeout_ms))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Some(AuthHook {
            client,
            url,
            timeout: Duration::from_millis(config.auth_timeout_ms),
            slots: Semaphore::new(concurrency),
            waiting: AtomicUsize::new(0),
            max_waiting: concurrency * WAITING_PER_SLOT,
            noted: Default::default(),
        }))
    }

    fn fail(&self, kind: Failure, detail: impl std::fmt::Display) -> Refusal {
        if !self.noted[kind as usize].swap(true, Ordering::Relaxed) {
            tracing::warn!(?kind, %detail, "the authorization hook failed (logged once per kind)");
        }
        Refusal::new(
            Kind::Unavailable,
            "the authorization backend did not answer in time; retry shortly",
        )
    }

    /// Asks the backend. Cancel-safe: a client that goes away drops the call and its slot.
    pub async fn ask(&self, ask: &Ask<'_>) -> Result<Granted, Refusal> {
        let deadline = Instant::now() + self.timeout;
        let _slot = match self.slots.try_acquire() {
            Ok(slot) => slot,
            Err(_) => {
                if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.max_waiting {
                    self.waiting.fetch_sub(1, Ordering::AcqRel);
                    return Err(self.fail(
                        Failure::Busy,
                        "every call slot and waiting place is taken (HUB_AUTH_CONCURRENCY)",
                    ));
                }
                struct Waiting<'a>(&'a AtomicUsize);
                impl Drop for Waiting<'_> {
                    fn drop(&mut self) {
                        self.0.fetch_sub(1, Ordering::AcqRel);
                    }
                }
                let _waiting = Waiting(&self.waiting);
                match tokio::time::timeout_at(deadline.into(), self.slots.acquire()).await {
                    Ok(Ok(slot)) => slot,
                    _ => {
                        return Err(self.fail(
                            Failure::Busy,
                            "no call slot freed within HUB_AUTH_TIMEOUT_MS",
                        ))
                    }
                }
            }
        };
        let call = async {
            let mut res = self
                .client
                .post(self.url.clone())
                .json(ask)
                .send()
                .await
                .map_err(|e| self.fail(Failure::Unreachable, e))?;
            let status = res.status().as_u16();
            match status {
                200 => {}
                401 => {
                    return Err(Refusal::unauthorized(
                        "the authorization backend refused this request (401)",
                    ))
                }
                403 => {
                    return Err(Refusal::forbidden(
                        "the authorization backend refused this request (403)",
                    ))
                }
                other => return Err(self.fail(Failure::Status, format!("status {other}"))),
            }
            let mut body = Vec::new();
            while let Some(chunk) = res
                .chunk()
                .await
                .map_err(|e| self.fail(Failure::Unreachable, e))?
            {
                if body.len() + chunk.len() > MAX_ANSWER {
                    return Err(
                        self.fail(Failure::Junk, format!("an answer over {MAX_ANSWER} bytes"))
                    );
                }
                body.extend_from_slice(&chunk);
            }
            let answer: Answer = serde_json::from_slice(&body).map_err(|e| {
                self.fail(Failure::Junk, format!("an answer that is not a grant: {e}"))
            })?;
            if answer.sub.is_empty() || answer.sub.len() > MAX_SUB {
                return Err(self.fail(Failure::Junk, "a grant whose sub is empty or too long"));
            }
            let now = crate::auth::now_secs();
            if answer.expires_at.is_some_and(|e| e <= now) {
                return Err(Refusal::unauthorized(
                    "the authorization backend's grant has already expired",
                ));
            }
            Ok(Granted {
                claims: Arc::new(Claims {
                    sub: answer.sub,
                    exp: answer.expires_at.unwrap_or(u64::MAX),
                    channels: answer.channels,
                    jti: None,
                    // Revocations by `sub` + `before` apply to grants made before `before`.
                    iat: Some(now),
                }),
                expires_at: answer.expires_at,
            })
        };
        match tokio::time::timeout_at(deadline.into(), call).await {
            Ok(r) => r,
            Err(_) => Err(self.fail(Failure::Timeout, "no answer within HUB_AUTH_TIMEOUT_MS")),
        }
    }
}

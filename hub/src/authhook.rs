//! The backend's authorization hook (`HUB_AUTH_URL`): a stream request that carries no token
//! is POSTed there and the answer grants it like a token's claims, passes on 401/403, or (for
//! anything else, or no answer within `HUB_AUTH_TIMEOUT_MS`) refuses it as unavailable.
//!
//! One pooled client, driven by a thread of its own (the HTTP workers may be busy with a large
//! fan-out; a call's answer must not wait for them); at most `HUB_AUTH_CONCURRENCY` calls in
//! flight and a bounded number waiting for one (each at most the timeout), beyond which a
//! request is refused at once (a reconnect storm must not pile up here). It never retries:
//! the refused client comes back on its own schedule.
//!
//! A grant for a request that carries a credential (a cookie, an `Authorization` header) is
//! reused for the same request (same credential, channels, transport, origin and address) for
//! `HUB_AUTH_CACHE_SECS`, at most until its `expires_at`: a reconnect storm of browsers that
//! send the same cookie again does not become a storm of calls. A disconnect or a revocation of
//! the grant's `sub` forgets its entries, so the backend is asked again.

use crate::auth::Claims;
use crate::domain::Transport;
use crate::refusal::{Kind, Refusal};
use protocol::ChannelName;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// Requests that may wait for a call slot, per slot (4,096 at the default concurrency): a
/// reconnect storm's burst is served in turn within the timeout instead of refused and retried
/// seconds later; beyond it (or past the timeout) the answer is 503, which an EventSource
/// survives. A waiting request holds a few hundred bytes.
const WAITING_PER_SLOT: usize = 64;
/// Largest answer read from the backend (a grant is a `sub` and some patterns).
const MAX_ANSWER: usize = 64 * 1024;
/// Longest `sub` a grant may name.
const MAX_SUB: usize = 256;
/// Grants kept for reuse at most (a few hundred bytes each); when full, expired ones are
/// dropped, and if none had expired the new grant is not kept.
const CACHE_MAX: usize = 100_000;

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
    /// The runtime of the calls (its thread ends when the hook is dropped).
    calls: tokio::runtime::Handle,
    _stop: tokio::sync::oneshot::Sender<()>,
    slots: Arc<Semaphore>,
    /// Calls taken on and not finished (in flight, or waiting for a slot).
    queued: Arc<AtomicUsize>,
    max_waiting: usize,
    concurrency: usize,
    /// Moving average of a call's duration, microseconds.
    call_us: AtomicU64,
    noted: [AtomicBool; 5],
    /// Grants by request (see the module's doc); `cache_for` zero: none kept.
    cache: parking_lot::Mutex<std::collections::HashMap<String, Cached>>,
    cache_for: Duration,
}

/// A grant kept for reuse until `until`.
struct Cached {
    granted: Granted,
    until: Instant,
}

/// A granted request: the claims the backend gave and their expiry.
#[derive(Clone)]
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
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let calls = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("hub-auth".into())
            .spawn(move || {
                let _ = rt.block_on(stopped);
            })?;
        Ok(Some(AuthHook {
            client,
            url,
            timeout: Duration::from_millis(config.auth_timeout_ms),
            calls,
            _stop: stop,
            slots: Arc::new(Semaphore::new(concurrency)),
            queued: Arc::new(AtomicUsize::new(0)),
            max_waiting: concurrency * WAITING_PER_SLOT,
            concurrency,
            call_us: AtomicU64::new(0),
            noted: Default::default(),
            cache: Default::default(),
            cache_for: Duration::from_secs(config.auth_cache_secs),
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

    /// The key a request's grant is kept under: `None` without a credential (nothing tells
    /// such requests apart) or with the cache off.
    fn cache_key(&self, ask: &Ask<'_>) -> Option<String> {
        if self.cache_for.is_zero()
            || (ask.headers.cookie.is_none() && ask.headers.authorization.is_none())
        {
            return None;
        }
        // JSON of the whole ask: every part the backend decided on, unambiguously delimited.
        serde_json::to_string(ask).ok()
    }

    fn cached(&self, key: &str) -> Option<Granted> {
        let mut cache = self.cache.lock();
        let hit = cache.get(key)?;
        if hit.until > Instant::now() {
            return Some(hit.granted.clone());
        }
        cache.remove(key);
        None
    }

    fn keep(&self, key: String, granted: &Granted) {
        let mut until = Instant::now() + self.cache_for;
        if let Some(exp) = granted.expires_at {
            let left = exp.saturating_sub(crate::auth::now_secs());
            until = until.min(Instant::now() + Duration::from_secs(left));
        }
        let mut cache = self.cache.lock();
        if cache.len() >= CACHE_MAX {
            let now = Instant::now();
            cache.retain(|_, c| c.until > now);
            if cache.len() >= CACHE_MAX {
                return;
            }
        }
        cache.insert(
            key,
            Cached {
                granted: granted.clone(),
                until,
            },
        );
    }

    /// Forgets the kept grants of `sub` (it was disconnected or revoked: the backend decides
    /// again).
    pub fn forget(&self, sub: &str) {
        self.cache.lock().retain(|_, c| c.granted.claims.sub != sub);
    }

    /// Drops kept grants that expired (at each sweep).
    pub fn prune(&self) {
        let now = Instant::now();
        self.cache.lock().retain(|_, c| c.until > now);
    }

    /// Authorizes a request: a kept grant of the same request, or the backend's answer.
    /// Cancel-safe: a client that goes away drops the call and its slot.
    pub async fn ask(&self, ask: &Ask<'_>) -> Result<Granted, Refusal> {
        let key = self.cache_key(ask);
        if let Some(hit) = key.as_deref().and_then(|k| self.cached(k)) {
            return Ok(hit);
        }
        let granted = self.call(ask).await?;
        if let Some(key) = key {
            self.keep(key, &granted);
        }
        Ok(granted)
    }

    /// One call to the backend.
    async fn call(&self, ask: &Ask<'_>) -> Result<Granted, Refusal> {
        let deadline = Instant::now() + self.timeout;
        // Calls taken on (in flight or waiting for a slot). The wait one can expect: those
        // beyond the slots, served a slot's worth at a time, each batch taking a call's usual
        // time. One that would time out waiting is refused now (it comes back when the queue
        // has drained) rather than after the whole timeout.
        let queued = Queued::join(&self.queued);
        let ahead = queued.ahead.saturating_sub(self.concurrency) as u64;
        let expected = Duration::from_micros(
            (ahead / self.concurrency as u64).saturating_mul(self.call_us.load(Ordering::Relaxed)),
        );
        if queued.ahead >= self.concurrency + self.max_waiting || expected >= self.timeout {
            return Err(self.fail(
                Failure::Busy,
                "every call slot is taken and the wait would outlast HUB_AUTH_TIMEOUT_MS (HUB_AUTH_CONCURRENCY)",
            ));
        }
        let body = serde_json::to_vec(ask).unwrap_or_default();
        let request = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        // The whole call runs on the hook's own thread, its slot taken and given back there:
        // a slot is held for the backend's answer only, not until a busy HTTP worker gets
        // round to reading it. Aborted if this request goes away first.
        let slots = self.slots.clone();
        let call = AbortOnDrop(self.calls.spawn(async move {
            let _queued = queued;
            let Ok(Ok(_slot)) =
                tokio::time::timeout_at(deadline.into(), slots.acquire_owned()).await
            else {
                return (
                    Called::Failed(
                        Failure::Busy,
                        "no call slot freed within HUB_AUTH_TIMEOUT_MS".into(),
                    ),
                    Duration::ZERO,
                );
            };
            let sent = Instant::now();
            let called = send(request).await;
            (called, sent.elapsed())
        }));
        let answer = match tokio::time::timeout_at(deadline.into(), call).await {
            Ok(Ok((answer, took))) => {
                if !took.is_zero() {
                    // A moving average of how long a call takes (an eighth of each new one).
                    let took = took.as_micros().min(u128::from(u32::MAX)) as u64;
                    let avg = self.call_us.load(Ordering::Relaxed);
                    self.call_us
                        .store(avg - avg / 8 + took / 8, Ordering::Relaxed);
                }
                answer
            }
            Ok(Err(join)) => return Err(self.fail(Failure::Unreachable, join)),
            Err(_) => {
                return Err(self.fail(Failure::Timeout, "no answer within HUB_AUTH_TIMEOUT_MS"))
            }
        };
        let answer = match answer {
            Called::Answer(a) => a,
            Called::Status(401) => {
                return Err(Refusal::unauthorized(
                    "the authorization backend refused this request (401)",
                ))
            }
            Called::Status(403) => {
                return Err(Refusal::forbidden(
                    "the authorization backend refused this request (403)",
                ))
            }
            Called::Status(other) => {
                return Err(self.fail(Failure::Status, format!("status {other}")))
            }
            Called::Failed(kind, detail) => return Err(self.fail(kind, detail)),
        };
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
    }
}

/// What one call to the backend came to.
enum Called {
    Answer(Answer),
    Status(u16),
    Failed(Failure, String),
}

/// One call, on the hook's thread: the status, and for a 200 the grant read bounded.
async fn send(request: reqwest::RequestBuilder) -> Called {
    let mut res = match request.send().await {
        Ok(res) => res,
        Err(e) => return Called::Failed(Failure::Unreachable, e.to_string()),
    };
    let status = res.status().as_u16();
    if status != 200 {
        return Called::Status(status);
    }
    let mut body = Vec::new();
    loop {
        match res.chunk().await {
            Ok(Some(chunk)) if body.len() + chunk.len() > MAX_ANSWER => {
                return Called::Failed(Failure::Junk, format!("an answer over {MAX_ANSWER} bytes"))
            }
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) => break,
            Err(e) => return Called::Failed(Failure::Unreachable, e.to_string()),
        }
    }
    match serde_json::from_slice(&body) {
        Ok(a) => Called::Answer(a),
        Err(e) => Called::Failed(Failure::Junk, format!("an answer that is not a grant: {e}")),
    }
}

/// One call counted in `AuthHook::queued` while it lives.
struct Queued {
    count: Arc<AtomicUsize>,
    /// How many were counted before this one.
    ahead: usize,
}

impl Queued {
    fn join(count: &Arc<AtomicUsize>) -> Queued {
        Queued {
            ahead: count.fetch_add(1, Ordering::AcqRel),
            count: count.clone(),
        }
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A task on the hook's runtime, aborted when whoever awaits it goes away.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> std::future::Future for AbortOnDrop<T> {
    type Output = Result<T, tokio::task::JoinError>;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx)
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

//! Webhooks: sends the channel and member events (`channel_occupied`, `channel_vacated`,
//! `member_added`, `member_removed`) to `HUB_WEBHOOK_URL` in signed batches, at least once.
//!
//! The events are recorded where presence decides them (the Redis functions, or the embedded
//! table: [`queue`]); this module only takes them in order and sends them. It never touches a
//! stream or the registry, and runs on a thread of its own, so a slow or dead receiver slows
//! nothing else; what waits is bounded by `HUB_WEBHOOK_MAX_PENDING` where it is recorded.

pub mod queue;

use crate::broker::{BrokerError, RedisBroker};
use crate::metrics::{Metrics, WebhookResult};
use hmac::{Hmac, Mac};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use crate::webhook_events::{Event, Taken};
pub use queue::MemoryQueue;

/// Events per batch at most.
pub const BATCH: usize = 100;
/// How long a batch may take to get its 2xx.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the source is looked at while nothing waits (batches go out at least once a
/// second while events wait).
const POLL: Duration = Duration::from_millis(250);
/// The first retry's delay; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How long the Redis sender's lock lasts without renewal (renewed at every look, at least
/// every second): a dead sender's events go out from another node within it.
pub const LOCK_MS: u64 = 10_000;
/// A receiver's answer body read at most (it is not used; reading frees the connection).
const MAX_ANSWER: usize = 64 * 1024;

/// Where the events are recorded.
pub enum Source {
    Memory(Arc<MemoryQueue>),
    Redis(Arc<RedisBroker>),
}

impl Source {
    async fn take(&self, node: &str, count: usize) -> Result<Taken, BrokerError> {
        match self {
            Source::Memory(q) => Ok(q.take(count)),
            Source::Redis(b) => {
                if !b.is_up() {
                    return Err(BrokerError::Unexpected("Redis is not connected".into()));
                }
                b.webhook_take(node, LOCK_MS, count).await
            }
        }
    }

    /// Removes a batch that is done; returns how many of it were still waiting (the bound may
    /// have dropped, and counted, some of it meanwhile).
    async fn ack(&self, events: &[Event]) -> Result<u64, BrokerError> {
        match self {
            Source::Memory(q) => Ok(q.ack()),
            Source::Redis(b) => b.webhook_ack(events).await,
        }
    }
}

/// The sender of one node.
pub struct Sender {
    source: Source,
    client: reqwest::Client,
    url: reqwest::Url,
    secret: Option<Vec<u8>>,
    retry_for: Duration,
    node: String,
    metrics: Arc<Metrics>,
}

/// Stops the sender's thread when dropped.
pub struct Running {
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Sender {
    /// The sender of a checked configuration; `None` without `HUB_WEBHOOK_URL`.
    pub fn from_config(
        config: &crate::config::Config,
        source: Source,
        node: String,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Option<Sender>> {
        let Some(url) = &config.webhook_url else {
            return Ok(None);
        };
        let url = reqwest::Url::parse(url)?;
        // The process's rustls provider (ring, as the hub's other TLS); already set is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(1)
            .connect_timeout(SEND_TIMEOUT)
            .timeout(SEND_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Some(Sender {
            source,
            client,
            url,
            secret: config
                .webhook_secret
                .as_ref()
                .map(|s| s.as_bytes().to_vec()),
            retry_for: Duration::from_secs(config.webhook_retry_secs),
            node,
            metrics,
        }))
    }

    /// Starts sending on a thread of its own until the returned handle is dropped.
    pub fn start(self) -> anyhow::Result<Running> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("hub-webhooks".into())
            .spawn(move || {
                rt.block_on(async move {
                    tokio::select! {
                        _ = stopped => {}
                        _ = self.run() => {}
                    }
                })
            })?;
        Ok(Running { _stop: stop })
    }

    /// Takes batches in order and sends each until it is acknowledged or given up.
    async fn run(&self) {
        loop {
            let taken = match self.look(BATCH).await {
                Some(t) => t,
                None => {
                    tokio::time::sleep(FIRST_BACKOFF).await;
                    continue;
                }
            };
            let full = taken.events.len() >= BATCH;
            if taken.held && !taken.events.is_empty() {
                self.deliver(taken.events).await;
            }
            if !full {
                tokio::time::sleep(POLL).await;
            }
        }
    }

    /// One look at the source (also renews the Redis lock): counts what was dropped, sets the
    /// pending gauge. `None` if the source could not be read (logged at debug; retried).
    async fn look(&self, count: usize) -> Option<Taken> {
        match self.source.take(&self.node, count).await {
            Ok(t) => {
                if t.dropped > 0 {
                    tracing::warn!(
                        events = t.dropped,
                        "webhooks: events dropped, the oldest beyond HUB_WEBHOOK_MAX_PENDING"
                    );
                    self.metrics
                        .webhook(WebhookResult::Dropped)
                        .increment(t.dropped);
                }
                self.metrics.webhook_pending.set(t.pending as f64);
                Some(t)
            }
            Err(e) => {
                tracing::debug!(error = %e, "webhooks: reading the events failed; retried");
                None
            }
        }
    }

    /// Sends one batch until a 2xx, retrying with the same ids (1 s doubling to 60 s) for up
    /// to `HUB_WEBHOOK_RETRY_SECS`; then it is dropped. A sender that loses the lock meanwhile
    /// stops: the batch is the new holder's (claimed unacknowledged).
    async fn deliver(&self, events: Vec<Event>) {
        let n = events.len() as u64;
        let body = match serde_json::to_vec(&serde_json::json!({ "events": &events })) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "webhooks: a batch could not be written");
                return;
            }
        };
        let signature = self.secret.as_deref().map(|k| sign(k, &body));
        let first = Instant::now();
        let mut backoff = FIRST_BACKOFF;
        let mut noted = false;
        let given_up = loop {
            match self.post(&body, signature.as_deref()).await {
                Ok(()) => {
                    self.metrics.webhook(WebhookResult::Sent).increment(n);
                    break false;
                }
                Err(why) => {
                    if !noted {
                        tracing::warn!(%why, events = n, "webhooks: a batch was not accepted; sending it again with backoff");
                        noted = true;
                    }
                }
            }
            if first.elapsed() + backoff > self.retry_for {
                tracing::warn!(
                    events = n,
                    "webhooks: a batch was dropped after HUB_WEBHOOK_RETRY_SECS of retries"
                );
                break true;
            }
            // Wait, renewing the lock every second; a lost lock hands the batch over.
            let until = Instant::now() + backoff;
            while Instant::now() < until {
                tokio::time::sleep((until - Instant::now()).min(Duration::from_secs(1))).await;
                if let Some(t) = self.look(0).await {
                    if !t.held {
                        tracing::info!("webhooks: another node sends now; it has this batch");
                        return;
                    }
                }
            }
            self.metrics.webhook(WebhookResult::Retried).increment(n);
            backoff = (backoff * 2).min(MAX_BACKOFF);
        };
        // Acknowledged (sent or given up); a failed acknowledgement means a later resend.
        for attempt in 0..5 {
            match self.source.ack(&events).await {
                Ok(still) => {
                    if given_up {
                        // Those the bound dropped meanwhile were counted then.
                        self.metrics
                            .webhook(WebhookResult::Dropped)
                            .increment(still);
                    }
                    return;
                }
                Err(e) if attempt == 4 => {
                    tracing::warn!(error = %e, "webhooks: acknowledging a batch failed; it may be sent again")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }

    async fn post(&self, body: &[u8], signature: Option<&str>) -> Result<(), String> {
        let mut req = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_vec());
        if let Some(s) = signature {
            req = req.header("X-Hub-Signature", s);
        }
        let mut answer = req.send().await.map_err(|e| e.to_string())?;
        let status = answer.status();
        // Read (bounded) so the connection is reused.
        let mut read = 0;
        while let Ok(Some(chunk)) = answer.chunk().await {
            read += chunk.len();
            if read > MAX_ANSWER {
                break;
            }
        }
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("status {status}"))
        }
    }
}

/// `sha256=<hex HMAC-SHA256 of body>`.
pub fn sign(key: &[u8], body: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut mac = match Hmac::<sha2::Sha256>::new_from_slice(key) {
        Ok(m) => m,
        // HMAC takes a key of any length.
        Err(_) => return String::new(),
    };
    mac.update(body);
    let mut out = String::from("sha256=");
    for b in mac.finalize().into_bytes() {
        let _ = write!(out, "{b:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_the_rfc_4231_hmac_sha256() {
        // RFC 4231 test case 2.
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn an_event_is_written_as_the_contract_says() {
        let e = Event {
            id: "1-0".into(),
            kind: "member_added".into(),
            channel: "room:1".into(),
            sub: Some("alice".into()),
            time_ms: 1,
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap_or_default(),
            r#"{"id":"1-0","type":"member_added","channel":"room:1","sub":"alice","time_ms":1}"#
        );
        let v = Event {
            sub: None,
            kind: "channel_vacated".into(),
            ..e
        };
        assert!(!serde_json::to_string(&v)
            .unwrap_or_default()
            .contains("sub"));
    }
}

//! The node: one hub process's configuration, registry, broker and metrics, composed.
//!
//! It owns the flows that need several parts at once: opening a stream (admit, register,
//! subscribe, recover, start), publishing, closing, draining. Transports and HTTP handlers call
//! it; it never parses HTTP.

use crate::auth::Auth;
use crate::broker::{Broker, LocalBroker, RedisBroker};
use crate::config::{Config, Origins};
use crate::http::error::ApiError;
use crate::metrics::{CloseReason, Metrics, RejectReason, Source, Transport};
use crate::registry::Registry;
use crate::session::{Session, Start};
use crate::transport;
use protocol::{ChannelName, Envelope, StreamId};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// A refused stream: the answer, and the reason it is counted under.
#[derive(Debug)]
pub struct Rejection {
    pub reason: RejectReason,
    pub error: ApiError,
}

/// What a transport asks for when a stream opens.
pub struct OpenRequest {
    pub transport: Transport,
    /// Validated, sorted, deduplicated.
    pub channels: Vec<ChannelName>,
    pub envelope: bool,
    /// `Last-Event-ID` (or its query-parameter forms), as sent.
    pub last_event_id: Option<String>,
    pub user: Option<Arc<str>>,
    /// The token's `exp`, when a token was used.
    pub expires_at: Option<u64>,
}

/// Shared by `Arc` (actix `web::Data`) with every handler and background task.
pub struct Node {
    pub config: Config,
    pub name: String,
    pub origins: Origins,
    pub metrics: Arc<Metrics>,
    pub auth: Auth,
    pub registry: Arc<Registry>,
    pub broker: Broker,
    draining: AtomicBool,
    /// SSE bodies and WebSocket tasks still alive: a stopping node lets them flush first.
    transports: Arc<AtomicUsize>,
    pub started: Instant,
}

/// Keeps one transport counted in `Node::live_transports` while it lives.
pub struct TransportGuard(Arc<AtomicUsize>);

impl Drop for TransportGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Closes a stream that is being opened if the opening is abandoned (error or cancellation).
struct OpenGuard<'a> {
    registry: &'a Registry,
    session: Option<Arc<Session>>,
}

impl OpenGuard<'_> {
    /// The stream is started: its transport owns it from now on.
    fn disarm(mut self) {
        self.session = None;
    }

    /// The opening failed on the hub's side.
    fn fail(mut self) {
        if let Some(s) = self.session.take() {
            self.registry.close(&s, CloseReason::Error);
        }
    }
}

impl Drop for OpenGuard<'_> {
    /// Dropped while armed: the client went away during the opening.
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            self.registry.close(&s, CloseReason::Client);
        }
    }
}

impl Node {
    /// Builds the node for an already checked configuration; in Redis mode connects to Redis
    /// and starts the broker's background tasks (so it must run inside the runtime).
    pub async fn new(config: Config) -> anyhow::Result<Arc<Node>> {
        let origins = config.origins().map_err(anyhow::Error::msg)?;
        let auth = Auth::from_config(&config).map_err(anyhow::Error::msg)?;
        let name = config.node_name();
        let metrics = Arc::new(Metrics::new());
        metrics.connections_max.set(config.max_connections as f64);
        let broker = match &config.redis_url {
            None => {
                metrics.redis_up.set(1.0);
                let registry = Arc::new(Registry::new(metrics.clone(), config.retry_ms, None));
                Broker::Local(LocalBroker::new(
                    registry,
                    config.history_len as usize,
                    config.history_ttl_secs,
                ))
            }
            Some(url) => {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                let registry = Arc::new(Registry::new(metrics.clone(), config.retry_ms, Some(tx)));
                let redis = RedisBroker::connect(
                    url,
                    &name,
                    registry,
                    config.history_len,
                    config.history_ttl_secs,
                    config.max_message_bytes,
                )
                .await?;
                redis.spawn(rx);
                Broker::Redis(redis)
            }
        };
        let registry = broker.registry().clone();
        Ok(Arc::new(Node {
            name,
            origins,
            metrics,
            auth,
            registry,
            broker,
            draining: AtomicBool::new(false),
            transports: Arc::new(AtomicUsize::new(0)),
            started: Instant::now(),
            config,
        }))
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Counts a transport (SSE body, WebSocket task) as alive until the guard is dropped.
    pub fn track_transport(&self) -> TransportGuard {
        self.transports.fetch_add(1, Ordering::AcqRel);
        TransportGuard(self.transports.clone())
    }

    /// Transports still alive (still writing, or not yet dropped by the HTTP server).
    pub fn live_transports(&self) -> usize {
        self.transports.load(Ordering::Acquire)
    }

    /// Turns `/readyz` to 503 and refuses new streams from now on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Whether this node accepts streams now.
    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.broker.is_up()
    }

    /// Counts and returns a refusal.
    pub fn reject(&self, reason: RejectReason, error: ApiError) -> Rejection {
        self.metrics.rejected(reason).increment(1);
        Rejection { reason, error }
    }

    /// Opens a stream: admits it, registers it (so nothing published from now on is missed),
    /// recovers history for `Last-Event-ID`, and queues `hub.connected`, any `hub.reset`, the
    /// replay, then what arrived meanwhile.
    pub async fn open(&self, req: OpenRequest) -> Result<Arc<Session>, Rejection> {
        if self.is_draining() {
            return Err(self.reject(
                RejectReason::Draining,
                ApiError::unavailable(
                    "draining",
                    "this node is shutting down; connect to another",
                    1,
                ),
            ));
        }
        if !self.broker.is_up() {
            // Counted as capacity: the node cannot take streams now; /readyz says the same.
            return Err(self.reject(
                RejectReason::Capacity,
                ApiError::unavailable(
                    "broker_unavailable",
                    "this node has lost its broker; connect to another",
                    2,
                ),
            ));
        }
        let admitted = self.registry.try_admit(
            self.config.max_connections as usize,
            req.user.as_ref(),
            self.config.max_connections_per_user as usize,
        );
        match admitted {
            Ok(()) => {}
            Err(RejectReason::UserLimit) => {
                return Err(self.reject(
                    RejectReason::UserLimit,
                    ApiError::new(
                        actix_web::http::StatusCode::TOO_MANY_REQUESTS,
                        "user_limit",
                        format!(
                            "this user already holds {} streams on this node (HUB_MAX_CONNECTIONS_PER_USER)",
                            self.config.max_connections_per_user
                        ),
                    ),
                ))
            }
            Err(reason) => {
                return Err(self.reject(
                    reason,
                    ApiError::unavailable("capacity", "this node holds its maximum number of streams", 5),
                ))
            }
        }
        let mut session = Session::new(
            self.registry.next_seq(),
            req.transport,
            req.channels,
            req.envelope,
            req.user,
            self.config.outbox_len as usize,
            self.registry.clock.now(),
        );
        session.expires_at = req.expires_at;
        let session = Arc::new(session);
        // From here until the stream is handed to its transport, a client that goes away (actix
        // drops this future) must not leave the stream admitted or registered.
        let guard = OpenGuard {
            registry: &self.registry,
            session: Some(session.clone()),
        };
        self.registry.register(&session);
        let channels = session.channels();
        if let Err(e) = self.broker.subscribe(&channels).await {
            tracing::warn!(error = %e, "subscribe failed; refusing stream");
            guard.fail();
            return Err(self.reject(
                RejectReason::Capacity,
                ApiError::unavailable("broker_unavailable", e.to_string(), 2),
            ));
        }

        // An id that cannot be read for these channels resets every channel.
        let asked = req
            .last_event_id
            .as_deref()
            .map(|id| session.decode_cursor(id));
        let n = channels.len();
        let mut positions = Vec::with_capacity(n);
        let mut replay = Vec::new();
        let mut reset = Vec::new();
        for (i, ch) in channels.iter().enumerate() {
            let since: Option<StreamId> = asked.as_ref().and_then(|a| a.as_ref().map(|p| p[i]));
            let rec = match self.broker.recover(ch, since).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, channel = %ch, "history unavailable; refusing stream");
                    guard.fail();
                    return Err(self.reject(
                        RejectReason::Capacity,
                        ApiError::unavailable("broker_unavailable", e.to_string(), 2),
                    ));
                }
            };
            let unreadable = matches!(asked, Some(None));
            if rec.reset || unreadable {
                reset.push(ch.clone());
                positions.push(rec.tail);
            } else {
                positions.push(since.unwrap_or(rec.tail));
                replay.extend(rec.replay);
            }
        }
        guard.disarm();
        let head = transport::opening_frames(self, &session, &positions, &reset);
        match session.start(Start {
            head,
            positions,
            replay,
        }) {
            Ok(replayed) => self.metrics.history_replayed.increment(replayed as u64),
            Err(_) => {
                tracing::info!(connection_id = %session.id, "closing stream: replay overflowed its outbox");
                self.registry.close(&session, CloseReason::Slow);
            }
        }
        Ok(session)
    }

    /// Publishes through the broker.
    pub async fn publish(
        &self,
        channel: ChannelName,
        env: &Envelope,
        durable: bool,
        source: Source,
    ) -> Result<String, ApiError> {
        self.broker
            .publish(channel, env, durable, source)
            .await
            .map_err(|e| ApiError::unavailable("broker_unavailable", e.to_string(), 2))
    }

    /// Closes a stream (no-op if already closed).
    pub fn close(&self, session: &Arc<Session>, reason: CloseReason) {
        self.registry.close(session, reason);
    }
}

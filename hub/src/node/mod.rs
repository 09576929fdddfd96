//! The node: one hub process's configuration, registry, broker, catch-up and metrics.
//!
//! It owns the registry and the broker as siblings and the flows that need both: opening a
//! stream (admit, register, start its channels), starting a channel (subscribe if it is the
//! first local reader, read its position, resume or reset, go live), closing (unsubscribe the
//! channels that lost their last reader), publishing and draining. Transports call it; it never
//! parses HTTP or renders a frame.

mod build;
mod control;

use crate::addresses::{AddressPlace, Addresses};
use crate::auth::Auth;
use crate::broker::Broker;
use crate::channels::Registry;
use crate::config::{Config, Origins};
use crate::domain::{CloseReason, RejectReason, Transport};
use crate::metrics::{Metrics, Source};
use crate::refusal::Refusal;
use crate::stream::{Item, Session, SessionInit, StartAt};
use protocol::{ChannelName, Envelope, StreamId};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

/// Locks that order a channel's subscribe and unsubscribe at the broker: enough stripes that
/// unrelated channels rarely wait on each other.
const STRIPES: usize = 64;
/// At a limit, how long a new stream waits for a place being released before it is refused.
/// A client that closes a stream and opens another at once (a reload, churn at the cap) can be
/// faster than the server sees its close; its old place is released within milliseconds.
const ADMIT_WAIT: Duration = Duration::from_millis(500);
/// Streams that may wait for a place at once; beyond, refusals are immediate (a flood at the
/// cap must not hold a thousand requests open).
const ADMIT_WAITERS: usize = 256;

/// What a transport asks for when a stream opens.
pub struct OpenRequest {
    pub transport: Transport,
    /// Validated, sorted, deduplicated (empty for a WebSocket, which subscribes later).
    pub channels: Vec<ChannelName>,
    pub envelope: bool,
    /// `Last-Event-ID` (or its query-parameter forms), as sent.
    pub last_event_id: Option<String>,
    pub user: Option<Arc<str>>,
    /// The token's `exp`, when a token was used.
    pub expires_at: Option<u64>,
    /// The token's `jti` and `iat` (a hook's grant: when it was granted), for revocations.
    pub token: Option<Arc<crate::revocations::TokenId>>,
    /// The connection's socket, when actix recorded it.
    pub socket: Option<crate::peer::PeerSocket>,
    /// `rewind=N`: each channel starts with its last N durable messages (0: none). Ignored
    /// with a `last_event_id`.
    pub rewind: usize,
    /// `presence=true`: `hub.join`/`hub.leave` of every channel.
    pub presence: bool,
    /// One stream of an HTTP/2 connection (see `Session::is_multiplexed`).
    pub multiplexed: bool,
    /// The place the client's address holds for this stream (see [`Node::admit_address`]).
    pub place: Option<AddressPlace>,
}

/// Where a channel of a stream should start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// From now on.
    Fresh,
    /// After this position (a resume): everything history still has after it, then live.
    After(StreamId),
    /// The client's position cannot be read: `hub.reset`, then from now on.
    Reset,
    /// The channel's last `n` durable messages (fewer if history holds fewer), then live.
    Rewind(usize),
}

/// Shared by `Arc` (actix `web::Data`) with every handler and background task.
pub struct Node {
    pub config: Config,
    /// Client addresses and their limits (`HUB_MAX_STREAMS_PER_IP`, `HUB_CONNECT_RATE_PER_IP`).
    pub addresses: Arc<Addresses>,
    /// Where held refusals wait for their answer (a thread of its own), while a per-address
    /// limit is on.
    pub held: Option<crate::held::HeldAnswers>,
    pub name: String,
    pub origins: Origins,
    pub metrics: Arc<Metrics>,
    pub auth: Auth,
    /// The backend's authorization hook (`HUB_AUTH_URL`), when set.
    pub hook: Option<crate::authhook::AuthHook>,
    pub registry: Arc<Registry>,
    pub broker: Arc<Broker>,
    /// Where streams that are behind ask the catch-up for history (by sequence number).
    pub(crate) refill: UnboundedSender<u64>,
    /// Channels that lost their last local reader, for the unsubscriber.
    emptied: UnboundedSender<ChannelName>,
    stripes: Box<[tokio::sync::Mutex<()>]>,
    draining: AtomicBool,
    /// Openings waiting for a place (see [`ADMIT_WAIT`]).
    admit_waiters: AtomicUsize,
    /// SSE bodies and WebSocket tasks still alive: a stopping node lets them flush first.
    transports: Arc<AtomicUsize>,
    tasks: Arc<crate::tasks::Tasks>,
    pub started: Instant,
    /// HTTP publishes per channel, for namespaces with a `publish_rate`.
    pub publishes: crate::ratelimit::Buckets<ChannelName>,
    /// Presence as the embedded broker keeps it (unused in Redis mode).
    pub presence: Arc<crate::presence::Store>,
}

/// Keeps one transport counted in `Node::live_transports` while it lives.
pub struct TransportGuard(Arc<AtomicUsize>);

impl Drop for TransportGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An admitted stream. Whoever holds it (the opening, then the transport) holds the stream:
/// dropping it closes the stream (reason `client`, unless it was closed for another reason), so
/// a client that goes away at any point releases everything it held.
pub struct StreamGuard {
    /// Given back when the stream ends (boxed: most streams have none, and the guard lives in
    /// every stream's task).
    _place: Option<Box<AddressPlace>>,
    node: Arc<Node>,
    pub session: Arc<Session>,
}

impl StreamGuard {
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Closes the stream for `reason` now (the guard's drop is then a no-op).
    pub fn close(&self, reason: CloseReason) {
        self.node.close(&self.session, reason);
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.node.close(&self.session, CloseReason::Client);
    }
}

fn stripe_of(channel: &str) -> usize {
    channel
        .bytes()
        .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize))
        % STRIPES
}

impl Node {
    /// Runs a background task until [`Node::stop`].
    pub fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(task);
    }

    /// Stops the node's background tasks and the broker's.
    pub fn stop(&self) {
        self.tasks.stop();
        self.broker.shutdown();
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

    /// Counts a refused stream under its reason and returns the refusal.
    pub fn refuse(&self, refusal: Refusal) -> Refusal {
        if let Some(reason) = refusal.reason() {
            self.metrics.rejected(reason).increment(1);
        }
        refusal
    }

    /// Opens a stream: admits it, registers it and starts its channels (subscribed before
    /// anything is read, so nothing published from then on is missed). `hub.connected` (or, for
    /// a WebSocket, nothing) is queued first, then any `hub.reset`; a resume continues through
    /// the catch-up at the client's pace.
    pub async fn open(self: &Arc<Self>, req: OpenRequest) -> Result<StreamGuard, Refusal> {
        if self.is_draining() {
            return Err(self.refuse(Refusal::draining()));
        }
        if !self.broker.is_up() {
            return Err(self.refuse(Refusal::unavailable()));
        }
        // A channel at its namespace's max_readers: refused before anything is taken (the
        // registry checks again under the channel's lock, for streams that race here).
        for ch in &req.channels {
            let max = self.config.namespaces.of(ch).max_readers;
            if max > 0 && self.registry.reader_count(ch) as u64 >= max {
                return Err(self.refuse(Refusal::channel_limit(ch.as_str(), max)));
            }
        }
        match self.admit(req.user.as_ref()).await {
            Ok(()) => {}
            Err(RejectReason::UserLimit) => {
                return Err(self.refuse(Refusal::new(
                    crate::refusal::Kind::UserLimit,
                    format!(
                        "this user already holds {} streams on this node (HUB_MAX_CONNECTIONS_PER_USER)",
                        self.config.max_connections_per_user
                    ),
                )))
            }
            Err(_) => return Err(self.refuse(Refusal::capacity())),
        }
        let session = Arc::new(Session::new(
            SessionInit {
                seq: self.registry.next_seq(),
                transport: req.transport,
                envelope: req.envelope,
                user: req.user,
                expires_at: req.expires_at,
                capacity: self.config.outbox_len as usize,
                now: self.registry.clock.now(),
                refill: Some(self.refill.clone()),
                socket: req.socket,
                multiplexed: req.multiplexed,
            },
            req.channels.clone(),
        ));
        // From here on the guard holds the stream: an error or a client that goes away while
        // the channels start releases it.
        let stream = StreamGuard {
            _place: req.place.map(Box::new),
            node: self.clone(),
            session,
        };
        if req.presence {
            stream.session.want_presence(None);
        }
        self.registry.register(&stream.session);
        if let Err(r) = self.hold_token(&stream.session, req.token) {
            stream.close(CloseReason::Error);
            return Err(self.refuse(r));
        }
        let want: Vec<(ChannelName, Want)> = match &req.last_event_id {
            None => req
                .channels
                .iter()
                .map(|c| {
                    let w = match req.rewind {
                        0 => Want::Fresh,
                        n => Want::Rewind(n),
                    };
                    (c.clone(), w)
                })
                .collect(),
            Some(id) => match stream.session.decode_cursor(id) {
                Some(positions) => req
                    .channels
                    .iter()
                    .cloned()
                    .zip(positions.into_iter().map(Want::After))
                    .collect(),
                None => req
                    .channels
                    .iter()
                    .map(|c| (c.clone(), Want::Reset))
                    .collect(),
            },
        };
        let head = |positions: &[StreamId]| match req.transport {
            Transport::Sse => vec![Item::Opened(Box::new(positions.to_vec()))],
            Transport::Ws => Vec::new(),
        };
        if let Err(r) = self.start_channels(&stream.session, want, head).await {
            // Closed by the node meanwhile (a drain): already counted as closed, not refused.
            let closed = stream.session.close_reason().is_some();
            stream.close(CloseReason::Error);
            return Err(if closed { r } else { self.refuse(r) });
        }
        Ok(stream)
    }

    /// The client's address of a stream request (`forwarded`: its `X-Forwarded-For` headers,
    /// joined) and a place for it under the per-address limits; refused (and counted) beyond
    /// them. Nothing is looked at when no per-address limit is on.
    pub fn admit_address(
        &self,
        remote: Option<std::net::SocketAddr>,
        forwarded: Option<&str>,
    ) -> Result<Option<AddressPlace>, Refusal> {
        if !self.addresses.limits() {
            return Ok(None);
        }
        let client = self.addresses.client(remote, forwarded.as_slice());
        self.addresses
            .admit(client, Instant::now())
            .map_err(|r| self.refuse(Refusal::address(r)))
    }

    /// Takes a place for a stream of `user`; at a limit, waits up to [`ADMIT_WAIT`] for one
    /// being released (at most [`ADMIT_WAITERS`] openings wait at once). Cancel-safe: a place
    /// is taken only by `try_admit`, which does not await.
    async fn admit(&self, user: Option<&Arc<str>>) -> Result<(), RejectReason> {
        let max = self.config.max_connections as usize;
        let per_user = self.config.max_connections_per_user as usize;
        let first = self.registry.try_admit(max, user, per_user);
        if first.is_ok() {
            return first;
        }
        if self.admit_waiters.fetch_add(1, Ordering::AcqRel) >= ADMIT_WAITERS {
            self.admit_waiters.fetch_sub(1, Ordering::AcqRel);
            return first;
        }
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let _waiting = Waiting(&self.admit_waiters);
        let deadline = tokio::time::Instant::now() + ADMIT_WAIT;
        loop {
            let released = self.registry.releases().notified();
            tokio::pin!(released);
            // Interest first, then the check: a release in between is not missed.
            released.as_mut().enable();
            let again = self.registry.try_admit(max, user, per_user);
            if again.is_ok() {
                return again;
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                return self.registry.try_admit(max, user, per_user);
            }
        }
    }

    /// The one routine that starts channels on a stream (SSE opening, WebSocket subscribe):
    /// makes the stream a reader of each (subscribing at the broker, under the channel's stripe
    /// lock, those whose subscription is not confirmed yet), reads the latest position of those
    /// that start fresh or reset, then queues `head` and starts them in one step (see
    /// `Session::start`).
    /// On error the caller closes the stream or drops the channel. Cancel-safe: the registry
    /// holds nothing the stream's close does not release.
    pub async fn start_channels(
        self: &Arc<Self>,
        session: &Arc<Session>,
        want: Vec<(ChannelName, Want)>,
        head: impl FnOnce(&[StreamId]) -> Vec<Item>,
    ) -> Result<(), Refusal> {
        let names: Vec<ChannelName> = want.iter().map(|(c, _)| c.clone()).collect();
        let namespaces = &self.config.namespaces;
        let unconfirmed = self
            .registry
            .add_channels(session, &names, |c| namespaces.of(c).max_readers)
            .map_err(|full| {
                Refusal::channel_limit(full.as_str(), namespaces.of(full.as_str()).max_readers)
            })?;
        if session.close_reason().is_some() {
            // Closed meanwhile: the registry took it off again; channels left without a reader
            // are unsubscribed.
            let emptied = names
                .into_iter()
                .filter(|c| !self.registry.has_readers(c))
                .collect();
            self.forget(emptied);
            return Err(match session.close_reason() {
                Some(CloseReason::Shutdown) => Refusal::draining(),
                _ => Refusal::unavailable(),
            });
        }
        if self.broker.subscribes() && !unconfirmed.is_empty() {
            // Only a channel's first readers get here (later ones find it confirmed and never
            // wait): under the stripe locks, so that an unsubscribe cannot cross, the first
            // subscribes and the others find it done.
            let _order = self.lock_stripes(&unconfirmed).await;
            let todo: Vec<ChannelName> = unconfirmed
                .into_iter()
                .filter(|c| !self.registry.is_subscribed(c))
                .collect();
            if !todo.is_empty() {
                if let Err(e) = self.broker.subscribe(&todo).await {
                    tracing::warn!(error = %e, "subscribe failed; refusing");
                    return Err(Refusal::unavailable());
                }
                for c in &todo {
                    self.registry.confirm_subscribed(c);
                }
            }
        }
        // Observers start from the users present over every node: the channel's first one
        // has them read (its log knows only what this node heard since it had readers).
        let observed: Vec<ChannelName> = want
            .iter()
            .filter(|(c, _)| session.presence_cursor(c).is_some())
            .map(|(c, _)| c.clone())
            .collect();
        self.seed_presence(observed);
        let mut starts = Vec::with_capacity(want.len());
        for (channel, w) in want {
            let at = match w {
                Want::After(p) => StartAt::Resume(p),
                Want::Rewind(n) => {
                    let from = self.broker.rewind_point(&channel, n).await.map_err(|e| {
                        tracing::warn!(channel = %channel, error = %e, "reading where to rewind to failed; refusing");
                        Refusal::unavailable()
                    })?;
                    StartAt::Resume(from)
                }
                Want::Fresh | Want::Reset => {
                    let tail = self.broker.tail(&channel).await.map_err(|e| {
                        tracing::warn!(channel = %channel, error = %e, "reading the channel's position failed; refusing");
                        Refusal::unavailable()
                    })?;
                    if w == Want::Reset {
                        StartAt::Reset(tail)
                    } else {
                        StartAt::Live(tail)
                    }
                }
            };
            starts.push((channel, at));
        }
        let fed = session.start(&starts, head);
        if fed.lagged > 0 {
            self.metrics
                .dropped(crate::metrics::DropReason::Lagged)
                .increment(fed.lagged as u64);
        }
        Ok(())
    }

    /// Has the users of these channels read for their observers (see [`crate::presence::seed`]).
    pub fn seed_presence(&self, channels: Vec<ChannelName>) {
        crate::presence::seed(&self.registry, &self.presence, &self.tasks, channels);
    }

    /// Takes a stream off a channel (WebSocket unsubscribe, or a channel that failed to start).
    pub fn drop_channel(&self, session: &Session, channel: &ChannelName) {
        if self.registry.remove_channel(session, channel) {
            self.forget(vec![channel.clone()]);
        }
    }

    /// The stripe locks of these channels, taken in order (no deadlock between two openers).
    /// Only a broker that subscribes needs them.
    async fn lock_stripes(&self, channels: &[ChannelName]) -> Vec<tokio::sync::MutexGuard<'_, ()>> {
        if !self.broker.subscribes() {
            return Vec::new();
        }
        let mut idx: Vec<usize> = channels.iter().map(|c| stripe_of(c)).collect();
        idx.sort_unstable();
        idx.dedup();
        let mut guards = Vec::with_capacity(idx.len());
        for i in idx {
            guards.push(self.stripes[i].lock().await);
        }
        guards
    }

    /// Channels that lost their last local reader: the broker stops receiving them.
    fn forget(&self, channels: Vec<ChannelName>) {
        if self.broker.subscribes() {
            for ch in channels {
                let _ = self.emptied.send(ch);
            }
        }
    }

    /// Publishes through the broker.
    pub async fn publish(
        &self,
        channel: ChannelName,
        env: &Envelope,
        durable: bool,
        source: Source,
        key: Option<&str>,
    ) -> Result<String, Refusal> {
        self.broker
            .publish(channel, env, durable, source, key)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "publish failed");
                Refusal::unavailable()
            })
    }

    /// Closes a stream (no-op if already closed).
    pub fn close(&self, session: &Arc<Session>, reason: CloseReason) {
        self.close_saying(session, reason, None);
    }

    /// Closes a stream with the backend's reason (a disconnect, a revocation).
    pub fn close_saying(
        &self,
        session: &Arc<Session>,
        reason: CloseReason,
        note: Option<Arc<str>>,
    ) {
        if let Some(emptied) = self.registry.close_saying(session, reason, note) {
            self.forget(emptied);
        }
    }
}

/// Unsubscribes channels that lost their last local reader, unless one came back meanwhile:
/// the check and the unsubscribe happen under the channel's stripe lock, the same lock a first
/// reader subscribes under, so the two never cross.
pub(super) async fn unsubscriber(node: Arc<Node>, mut emptied: UnboundedReceiver<ChannelName>) {
    while let Some(ch) = emptied.recv().await {
        let _order = node.stripes[stripe_of(&ch)].lock().await;
        if !node.registry.has_readers(&ch) {
            node.broker.unsubscribe(&ch).await;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
    use super::*;
    use clap::Parser as _;

    /// Issue 21, defect 5: a release woke only the first waiter, which may be a user still at
    /// its own limit, while another opening, which the place would admit, waited the whole
    /// `ADMIT_WAIT` and was refused.
    #[tokio::test]
    async fn a_released_place_goes_to_a_waiter_it_can_admit() {
        let config = Config::try_parse_from([
            "hub",
            "--max-connections",
            "2",
            "--max-connections-per-user",
            "1",
        ])
        .unwrap();
        let node = Node::new(config).await.unwrap();
        let (alice, bob, carol): (Arc<str>, Arc<str>, Arc<str>) =
            ("alice".into(), "bob".into(), "carol".into());
        node.admit(Some(&alice)).await.unwrap();
        node.admit(Some(&bob)).await.unwrap();
        // Alice waits first (at her own limit), then carol (the node is full).
        let waiting = |n: usize| {
            let node = node.clone();
            async move {
                while node.admit_waiters.load(Ordering::Acquire) < n {
                    tokio::task::yield_now().await;
                }
            }
        };
        let alice_again = tokio::spawn({
            let (node, alice) = (node.clone(), alice.clone());
            async move { node.admit(Some(&alice)).await }
        });
        waiting(1).await;
        let carol_in = tokio::spawn({
            let (node, carol) = (node.clone(), carol.clone());
            async move { node.admit(Some(&carol)).await }
        });
        waiting(2).await;
        node.registry.release(Some(&bob));
        let admitted = tokio::time::timeout(ADMIT_WAIT / 2, carol_in).await;
        assert!(
            matches!(admitted, Ok(Ok(Ok(())))),
            "carol takes bob's place at once: {admitted:?}"
        );
        assert_eq!(
            alice_again.await.unwrap(),
            Err(RejectReason::UserLimit),
            "alice stays at her limit"
        );
        node.stop();
    }
}

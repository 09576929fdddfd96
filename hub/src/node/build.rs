//! Building a node: its registry, broker and presence store (which broker runs is decided
//! here once), the webhook sender, and the background tasks (catch-up, presence reporter,
//! conflation flusher, unsubscriber). Nothing here runs per stream.

use super::{unsubscriber, Node, STRIPES};
use crate::auth::Auth;
use crate::broker::{Broker, LocalBroker, RedisBroker, Sink};
use crate::catchup;
use crate::channels::Registry;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::presence::{MemoryPresence, Store};
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;
use std::time::Instant;

impl Node {
    /// Builds the node for an already checked configuration; in Redis mode starts connecting to
    /// Redis without waiting for it (the node is not ready until Redis answers). Starts the
    /// background tasks (catch-up, unsubscriber, broker), so it must run inside the runtime;
    /// [`Node::stop`] ends them.
    pub async fn new(config: Config) -> anyhow::Result<Arc<Node>> {
        let origins = config.origins().map_err(anyhow::Error::msg)?;
        let auth = Auth::from_config(&config).map_err(anyhow::Error::msg)?;
        let hook = crate::authhook::AuthHook::from_config(&config)?;
        let name = config.node_name();
        let metrics = Arc::new(Metrics::new());
        metrics.connections_max.set(config.max_connections as f64);
        let registry = Arc::new(Registry::new(metrics.clone()));
        registry.start_lanes()?;
        let sink: Arc<dyn Sink> = registry.clone();
        // The broker and the presence store, siblings: which broker runs is decided here once.
        let (broker, presence, source) = match &config.redis_url {
            None => {
                metrics.redis_up.set(1.0);
                let broker = Broker::Local(LocalBroker::with_namespaces(
                    sink,
                    metrics.clone(),
                    config.history_len as usize,
                    config.history_ttl_secs,
                    config.idempotency_secs,
                    config.namespaces.clone(),
                ));
                let queue = config.webhook_url.is_some().then(|| {
                    Arc::new(crate::webhooks::MemoryQueue::new(
                        config.namespaces.clone(),
                        config.webhook_max_pending as usize,
                    ))
                });
                let store = Store::Memory(MemoryPresence::with_webhooks(queue.clone()));
                (broker, store, queue.map(crate::webhooks::Source::Memory))
            }
            Some(url) => {
                let redis = RedisBroker::start(url, &config, &name, sink, metrics.clone())?;
                let source = crate::webhooks::Source::Redis(redis.clone());
                (
                    Broker::Redis(redis.clone()),
                    Store::Redis(redis),
                    Some(source),
                )
            }
        };
        // Webhooks: sent from a thread of their own, stopped with the node's tasks.
        let webhooks = match source {
            Some(source) => crate::webhooks::Sender::from_config(
                &config,
                source,
                name.clone(),
                metrics.clone(),
            )?,
            None => None,
        };
        let (refill, refill_rx) = catchup::channel();
        let (emptied, emptied_rx) = tokio::sync::mpsc::unbounded_channel();
        let addresses = Arc::new(crate::addresses::Addresses::new(
            config.trusted_proxies().map_err(anyhow::Error::msg)?,
            config.max_streams_per_ip,
            config.connect_rate_per_ip,
            held_budget(config.max_connections),
        ));
        let held = if addresses.limits() {
            Some(crate::held::HeldAnswers::start(addresses.clone())?)
        } else {
            None
        };
        let node = Arc::new(Node {
            addresses,
            held,
            name,
            origins,
            metrics,
            auth,
            hook,
            registry,
            broker: Arc::new(broker),
            refill,
            emptied,
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            draining: AtomicBool::new(false),
            admit_waiters: AtomicUsize::new(0),
            transports: Arc::new(AtomicUsize::new(0)),
            tasks: Arc::new(crate::tasks::Tasks::new()),
            started: Instant::now(),
            presence: Arc::new(presence),
            publishes: Default::default(),
            config,
        });
        let catchup = Arc::new(catchup::CatchUp {
            registry: node.registry.clone(),
            broker: node.broker.clone(),
            metrics: node.metrics.clone(),
            refill: node.refill.clone(),
            tasks: node.tasks.clone(),
            namespaces: node.config.namespaces.clone(),
        });
        node.spawn(catchup::run(catchup, refill_rx));
        let reporter = Arc::new(crate::presence::Reporter {
            registry: node.registry.clone(),
            store: node.presence.clone(),
            metrics: node.metrics.clone(),
            node: node.name.clone(),
            grace: node.config.heartbeat_secs,
            tasks: node.tasks.clone(),
        });
        node.spawn(crate::presence::run(reporter));
        if let Some(due) = node.registry.conflate(&node.config.namespaces) {
            node.spawn(crate::channels::conflate::flusher(
                node.registry.clone(),
                due,
            ));
        }
        if let Some(sender) = webhooks {
            let running = sender.start()?;
            node.spawn(async move {
                let _running = running;
                std::future::pending::<()>().await
            });
        }
        node.spawn(unsubscriber(node.clone(), emptied_rx));
        if let Broker::Redis(redis) = &*node.broker {
            let handler: Arc<dyn crate::broker::redis::ControlHandler> = node.clone();
            redis.set_control_handler(Arc::downgrade(&handler));
        }
        Ok(node)
    }
}

/// Refusals a node may hold back at once (`Addresses::hold`): each holds a socket, so the
/// open-files limit beyond `HUB_MAX_CONNECTIONS` streams and a reserve for everything else
/// (Redis, webhooks, the admin port, refusals answered at once), at most 16,384.
fn held_budget(max_connections: u64) -> usize {
    const RESERVE: u64 = 1024;
    let files = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(0, |(soft, _)| soft);
    let budget = files.saturating_sub(max_connections.saturating_add(RESERVE));
    usize::try_from(budget.min(16_384)).unwrap_or(0)
}

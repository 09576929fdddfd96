//! Keeping the Redis side whole: the subscriber's receive loop, resubscribing after a
//! reconnection (and sharded subscriptions after slot moves), and the self-ping through
//! pub/sub that notices a subscription that died silently.

use super::*;

impl RedisBroker {
    /// Messages may have been lost: readers must check history before taking live messages
    /// again, and reads in flight cannot vouch for live delivery.
    pub(super) fn lost_messages(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.sink.fall_behind();
    }

    /// Delivers pub/sub messages in the order they arrive. After a reconnection every reader
    /// falls behind before any message of the new connection is delivered (so none can jump a
    /// gap), and the channels are subscribed again beside this loop.
    pub(super) async fn receive_loop(
        self: Arc<Self>,
        mut messages: tokio::sync::broadcast::Receiver<fred::types::Message>,
        mut reconnects: tokio::sync::broadcast::Receiver<fred::types::config::Server>,
    ) {
        loop {
            tokio::select! {
                biased;
                r = reconnects.recv() => {
                    match r {
                        Ok(server) => tracing::info!(%server, "subscriber connected; subscribing"),
                        Err(RecvError::Lagged(_)) => {}
                        Err(RecvError::Closed) => return,
                    }
                    if self.connected_once.swap(true, Ordering::AcqRel) {
                        self.metrics.redis_reconnects.increment(1);
                    }
                    self.set_up(false);
                    self.revocations_read.store(false, Ordering::Release);
                    self.whole.store(false, Ordering::Release);
                    self.lost_messages();
                    let me = self.clone();
                    // Kept until it finishes: a later reconnection prunes it.
                    self.tasks.spawn(async move { me.resubscribe().await });
                }
                m = messages.recv() => match m {
                    Ok(m) => {
                        if let Some(bytes) = m.value.as_bytes() {
                            self.on_message(&m.channel, bytes);
                        }
                    }
                    Err(RecvError::Lagged(n)) => {
                        tracing::warn!(lost = n, "pub/sub messages were lost in a burst; readers catch up from history");
                        self.lost_messages();
                    }
                    Err(RecvError::Closed) => return,
                },
            }
        }
    }

    /// Subscribes every channel with local readers (and the self-ping) again after a
    /// reconnection, retrying until it succeeds or another reconnection takes over; then the
    /// subscriptions are whole again and readers that fell behind catch up.
    pub(super) async fn resubscribe(&self) {
        let epoch = self.epoch.load(Ordering::Acquire);
        loop {
            let _one = self.resubscribing.lock().await;
            if self.epoch.load(Ordering::Acquire) != epoch {
                return; // a newer reconnection resubscribes
            }
            let mut names = self.names(&self.sink.channels());
            names.push(CONTROL_CHANNEL.to_string());
            names.push(self.ping_channel.clone());
            // Subscribed to the control channel first, then the revocations read: whatever is
            // revoked from then on is heard, whatever was revoked before is read.
            // With webhooks, their stream exists before the node reports presence (it is
            // what makes the presence functions record events).
            let subscribed = match self.subscribe_raw(&names).await {
                Ok(()) if self.webhooks => match self.webhook_group().await {
                    Ok(()) => self.read_revocations().await,
                    Err(e) => Err(e),
                },
                Ok(()) => self.read_revocations().await,
                Err(e) => Err(e),
            };
            match subscribed {
                Ok(()) => {
                    self.revocations_read.store(true, Ordering::Release);
                    if self.epoch.load(Ordering::Acquire) == epoch {
                        self.set_whole();
                        // Readers that asked for history meanwhile were left behind: ask again.
                        self.sink.fall_behind();
                        tracing::info!(channels = (names.len() - 2) / 3, "resubscribed");
                        // Prove the subscription now: the ping loop's last ping may have gone
                        // out before it was in place, and a starting node would wait for the
                        // next one (a second longer refusing streams as unavailable).
                        if let Err(e) = within("PUBLISH ping", self.ping()).await {
                            tracing::debug!(error = %e, "ping publish failed");
                        }
                    }
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "resubscribe failed; retrying");
                }
            }
            drop(_one);
            tokio::time::sleep(RESUBSCRIBE_RETRY).await;
        }
    }

    /// Cluster mode: re-issues shard subscriptions (a slot migration drops them silently)
    /// when the slot map changes (read every [`SLOT_CHECK_EVERY`]), and, in case a change
    /// went unseen, every channel's once per [`SHARD_RESUBSCRIBE_EVERY`]: a slice of them at
    /// each check, so that no moment carries them all.
    ///
    /// Whatever was published to a dropped one is lost to this node, so the readers of the
    /// channels re-issued first start checking their position against history (buffering
    /// live messages, so none jumps the gap), the subscriptions are re-issued, and once they
    /// are in place the catch-up reads what each reader may have missed: one shared read per
    /// channel. (Re-issuing every channel at once every 30 s held the live messages of every
    /// reader behind 10,000 history reads per node: seconds at 100,000 streams on 10,000
    /// channels, BENCHMARKS.md section 23.)
    pub(super) async fn shard_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(SLOT_CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The slot map as of the last check (the subscriber's routing table when it connected,
        // before the first): fred may refresh its table by itself (a MOVED answer to a new
        // subscription) without moving the subscriptions made before.
        let mut seen: Option<String> = None;
        // Where the periodic pass is in the sorted channel list (the next slice starts after it).
        let mut after: Option<String> = None;
        let slices =
            (SHARD_RESUBSCRIBE_EVERY.as_secs() / SLOT_CHECK_EVERY.as_secs()).max(1) as usize;
        loop {
            tick.tick().await;
            if !self.is_up() {
                continue; // a reconnection resubscribes and checks everything anyway
            }
            let before = format!("{:?}", self.sub.cached_cluster_state());
            let reference = seen.take().unwrap_or(before);
            let moved = match self.sub.sync_cluster().await {
                Ok(()) => {
                    let now = format!("{:?}", self.sub.cached_cluster_state());
                    let moved = now != reference;
                    seen = Some(now);
                    moved
                }
                Err(e) => {
                    tracing::debug!(error = %e, "reading the cluster's slot map failed");
                    seen = Some(reference);
                    false
                }
            };
            let mut channels = self.sink.channels();
            let _one = self.resubscribing.lock().await;
            self.whole.store(false, Ordering::Release);
            let reissued = if moved {
                tracing::info!("the cluster's slot map changed: re-issuing shard subscriptions");
                self.lost_messages();
                &channels[..]
            } else {
                channels.sort_unstable();
                let slice = next_slice(&channels, after.as_deref(), slices);
                after = slice.last().map(|c| c.to_string());
                self.sink.fall_behind_on(slice);
                slice
            };
            let mut names = self.names(reissued);
            names.push(CONTROL_CHANNEL.to_string());
            if let Err(e) = self.subscribe_raw(&names).await {
                tracing::warn!(error = %e, "re-issuing shard subscriptions failed");
            }
            self.set_whole();
        }
    }

    /// The subscriptions of the current epoch are in place again.
    pub(super) fn set_whole(&self) {
        self.whole.store(true, Ordering::Release);
        self.whole_again.notify_waiters();
    }

    /// Resolves once the subscriptions are whole (at once if they are), or after `limit`.
    pub async fn wait_whole(&self, limit: Duration) {
        let again = self.whole_again.notified();
        tokio::pin!(again);
        again.as_mut().enable();
        if self.whole.load(Ordering::Acquire) {
            return;
        }
        let _ = tokio::time::timeout(limit, again).await;
    }

    /// Publishes a ping to itself every second; declares the subscription down (and forces a
    /// reconnection) when none came back for `PING_DEADLINE`.
    /// Publishes one self-ping on this node's ping channel (it comes back through the
    /// subscription, see `on_message`).
    async fn ping(&self) -> Result<i64, fred::error::Error> {
        if self.cluster {
            self.client
                .spublish::<i64, _, _>(self.ping_channel.clone(), "ping")
                .await
        } else {
            self.client
                .publish::<i64, _, _>(self.ping_channel.clone(), "ping")
                .await
        }
    }

    pub(super) async fn ping_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(PING_EVERY);
        let mut forced_at: Option<Instant> = None;
        let mut waiting_since = Instant::now();
        loop {
            tick.tick().await;
            if let Err(e) = self.ping().await {
                tracing::debug!(error = %e, "ping publish failed");
            }
            let now = self.started.elapsed().as_millis() as u64;
            // Before the first ping arrives, the age counts from start-up.
            let last = self.last_ping.load(Ordering::Acquire);
            let age = Duration::from_millis(now.saturating_sub(last));
            let fresh = age < PING_DEADLINE;
            self.set_up(fresh && last > 0 && self.sub.is_connected());
            if !self.is_up() && waiting_since.elapsed() >= WAITING_LOG_EVERY {
                waiting_since = Instant::now();
                tracing::warn!("Redis does not answer (or the hub functions are not loaded): this node is not ready");
            }
            if self.is_up() {
                waiting_since = Instant::now();
            }
            if !fresh
                && self.sub.is_connected()
                && forced_at.is_none_or(|t| t.elapsed() > PING_DEADLINE)
            {
                tracing::warn!(silent_for = ?age, "the subscription delivers nothing; reconnecting it");
                forced_at = Some(Instant::now());
                if let Err(e) = self.sub.force_reconnection().await {
                    tracing::warn!(error = %e, "forced reconnection failed");
                }
            }
        }
    }
}

/// The next of `slices` slices of the sorted `channels`: those after `after` (from the start
/// when none is, or none is left after it), at least one, so that every channel comes round
/// once per pass however channels come and go.
fn next_slice<'a>(
    channels: &'a [ChannelName],
    after: Option<&str>,
    slices: usize,
) -> &'a [ChannelName] {
    let start = match after {
        Some(a) => channels.partition_point(|c| c.as_str() <= a),
        None => 0,
    };
    let start = if start >= channels.len() { 0 } else { start };
    let len = channels.len().div_ceil(slices.max(1)).max(1);
    &channels[start..(start + len).min(channels.len())]
}

#[cfg(test)]
mod slice_tests {
    use super::*;

    #[test]
    fn every_channel_comes_round_once_per_pass() {
        let all: Vec<ChannelName> = (0..100)
            .map(|i| ChannelName::new(&format!("public:c{i:03}")).unwrap())
            .collect();
        let mut after: Option<String> = None;
        let mut seen = Vec::new();
        for _ in 0..15 {
            let s = next_slice(&all, after.as_deref(), 15);
            assert!(!s.is_empty() && s.len() <= 7);
            after = s.last().map(|c| c.to_string());
            seen.extend(s.iter().cloned());
        }
        assert_eq!(
            seen, all,
            "15 slices of 7 cover 100 channels once, in order"
        );
        // Then it starts over.
        assert_eq!(next_slice(&all, after.as_deref(), 15)[0], all[0]);
        // A channel gone since (the last one taken) does not stop the pass.
        let fewer: Vec<ChannelName> = all
            .iter()
            .filter(|c| c.as_str() != "public:c006")
            .cloned()
            .collect();
        assert_eq!(
            next_slice(&fewer, Some("public:c006"), 15)[0].as_str(),
            "public:c007"
        );
        assert!(next_slice(&[], None, 15).is_empty());
    }
}

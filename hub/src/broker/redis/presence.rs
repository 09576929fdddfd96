//! Presence over Redis: each node's counts per channel and user (`hub_presence`), its lease
//! that lets survivors drop a dead node's counts, the users of a channel over every node, and
//! the `join`/`leave` notifications heard on `hub:pres:` channels.

use super::*;

/// The sorted set of presence leases (node -> expiry by Redis's clock).
pub(super) const PRESENCE_NODES: &str = "hub:presence:nodes";

/// The channels a node has presence counts on (a set; what a survivor clears when it dies).
pub(super) fn presence_channels_key(node: &str) -> String {
    format!("hub:presence:chans:{{{node}}}")
}

impl RedisBroker {
    pub(super) fn presence_name(&self, channel: &str) -> String {
        if self.cluster {
            format!("{PRESENCE_PREFIX}{{{channel}}}")
        } else {
            format!("{PRESENCE_PREFIX}{channel}")
        }
    }

    /// `{"type":"join"|"leave","sub":"..."}` from `hub_presence`, to the readers that asked.
    pub(super) fn on_presence(&self, channel: ChannelName, payload: &[u8]) {
        #[derive(serde::Deserialize)]
        struct Ev {
            #[serde(rename = "type")]
            kind: String,
            sub: String,
        }
        match serde_json::from_slice::<Ev>(payload) {
            Ok(ev) if ev.kind == "join" || ev.kind == "leave" => {
                self.sink.presence(&Arc::new(crate::stream::PresenceEvent {
                    channel,
                    sub: Arc::from(ev.sub),
                    join: ev.kind == "join",
                }))
            }
            _ => {
                self.metrics.dropped(DropReason::Malformed).increment(1);
                tracing::warn!(channel = %channel, "dropped a presence event that is not one");
            }
        }
    }

    /// Sets this node's presence counts of one channel (`anonymous`: `None` if unchanged),
    /// through `FCALL hub_presence`; `join`/`leave` go out from the function.
    pub async fn presence_set(
        &self,
        channel: &str,
        node: &str,
        anonymous: Option<u32>,
        users: &[(Arc<str>, u32)],
    ) -> Result<(), BrokerError> {
        let mut args = Vec::with_capacity(2 + 2 * users.len());
        args.push(node.to_string());
        args.push(anonymous.map_or_else(|| "-".to_string(), |n| n.to_string()));
        for (u, n) in users {
            args.push(u.to_string());
            args.push(n.to_string());
        }
        let _: i64 = within(
            "FCALL hub_presence",
            self.client
                .fcall("hub_presence", vec![channel.to_string()], args),
        )
        .await?;
        within(
            "SADD",
            self.client
                .sadd::<i64, _, _>(presence_channels_key(node), channel.to_string()),
        )
        .await?;
        Ok(())
    }

    /// Renews this node's presence lease (`lease_ms`) and removes the counts of nodes whose
    /// lease ran out (their `leave`s go out from the function). Returns the nodes removed.
    pub async fn presence_lease(
        &self,
        node: &str,
        lease_ms: u64,
    ) -> Result<Vec<String>, BrokerError> {
        let dead: Vec<String> = within(
            "FCALL hub_presence_lease",
            self.client.fcall(
                "hub_presence_lease",
                vec![PRESENCE_NODES.to_string()],
                vec![node.to_string(), lease_ms.to_string()],
            ),
        )
        .await?;
        for d in &dead {
            self.presence_forget(d).await?;
        }
        Ok(dead)
    }

    /// Removes every count a node left (a dead node, or this one's from before a restart).
    pub async fn presence_forget(&self, node: &str) -> Result<(), BrokerError> {
        let key = presence_channels_key(node);
        let channels: Vec<String> = within("SMEMBERS", self.client.smembers(key.clone())).await?;
        for ch in channels {
            let _: i64 = within(
                "FCALL hub_presence_drop",
                self.client
                    .fcall("hub_presence_drop", vec![ch], vec![node.to_string()]),
            )
            .await?;
        }
        within("DEL", self.client.del::<i64, _>(key)).await?;
        within(
            "ZREM",
            self.client
                .zrem::<i64, _, _>(PRESENCE_NODES, node.to_string()),
        )
        .await?;
        Ok(())
    }

    /// A channel's users (streams per `sub`) and anonymous streams over every node.
    pub async fn presence_read(
        &self,
        channel: &str,
    ) -> Result<(Vec<(String, u64)>, u64), BrokerError> {
        let flat: Vec<String> = within(
            "FCALL_RO hub_presence_read",
            self.client.fcall_ro(
                "hub_presence_read",
                vec![channel.to_string()],
                Vec::<String>::new(),
            ),
        )
        .await?;
        let mut users = Vec::new();
        let mut anonymous = 0;
        for pair in flat.chunks(2) {
            let [field, n] = pair else { break };
            let n: u64 = n.parse().unwrap_or(0);
            match field.strip_prefix('=') {
                Some(sub) => users.push((sub.to_string(), n)),
                None => anonymous += n,
            }
        }
        Ok((users, anonymous))
    }
}

//! Every node's status in Redis, for the admin page: each node keeps its snapshot under a key
//! that expires unless renewed (its status lease, `hub:{status}:node:<name>`) and names itself
//! in the set `hub:{status}:nodes`; a reader takes every snapshot still there and forgets the
//! names whose lease ran out. One hash tag: every key in one slot of a cluster (one MGET).

use super::*;

/// The names of the nodes that wrote a snapshot (some may be gone: their key expired).
const STATUS_NODES: &str = "hub:{status}:nodes";

fn status_key(node: &str) -> String {
    format!("hub:{{status}}:node:{node}")
}

impl RedisBroker {
    /// Keeps this node's snapshot for `lease` (renewed by the next call).
    pub async fn status_put(
        &self,
        node: &str,
        json: String,
        lease: Duration,
    ) -> Result<(), BrokerError> {
        within(
            "SET status",
            self.client.set::<Value, _, _>(
                status_key(node),
                json,
                Some(fred::types::Expiration::PX(lease.as_millis() as i64)),
                None,
                false,
            ),
        )
        .await?;
        within(
            "SADD status",
            self.client
                .sadd::<i64, _, _>(STATUS_NODES, node.to_string()),
        )
        .await?;
        Ok(())
    }

    /// Every snapshot whose lease has not run out (as JSON); the names of those that ran out
    /// are removed from the set.
    pub async fn status_all(&self) -> Result<Vec<String>, BrokerError> {
        let names: Vec<String> =
            within("SMEMBERS status", self.client.smembers(STATUS_NODES)).await?;
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = names.iter().map(|n| status_key(n)).collect();
        let values: Vec<Option<String>> = within("MGET status", self.client.mget(keys)).await?;
        let mut live = Vec::with_capacity(values.len());
        let mut gone = Vec::new();
        for (name, value) in names.into_iter().zip(values) {
            match value {
                Some(v) => live.push(v),
                None => gone.push(name),
            }
        }
        if !gone.is_empty() {
            within(
                "SREM status",
                self.client.srem::<i64, _, _>(STATUS_NODES, gone),
            )
            .await?;
        }
        Ok(live)
    }
}

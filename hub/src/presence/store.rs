//! Where presence counts live: in memory for the embedded broker, or in Redis (through the
//! Redis broker's `hub_presence` functions). A sibling of the registry and the broker under the
//! node: nothing outside this module asks which broker runs to read or write presence.

use crate::broker::{BrokerError, RedisBroker};
use crate::channels::PresenceCount;
use crate::stream::PresenceEvent;
use crate::webhooks::MemoryQueue;
use parking_lot::Mutex;
use protocol::ChannelName;
use std::collections::HashMap;
use std::sync::Arc;

/// The presence store of a node.
pub enum Store {
    /// One node: the table is the truth, changes become events at once.
    Memory(MemoryPresence),
    /// Every node's counts in Redis, each under its lease.
    Redis(Arc<RedisBroker>),
}

impl Store {
    /// A channel's users (streams per `sub`) and anonymous streams, over every node.
    pub async fn read(&self, channel: &str) -> Result<Table, BrokerError> {
        match self {
            Store::Memory(m) => Ok(m.read(channel)),
            Store::Redis(b) => {
                let (users, anonymous) = b.presence_read(channel).await?;
                Ok(Table {
                    users: users
                        .into_iter()
                        .map(|(u, n)| (Arc::from(u), u32::try_from(n).unwrap_or(u32::MAX)))
                        .collect(),
                    anonymous: u32::try_from(anonymous).unwrap_or(u32::MAX),
                })
            }
        }
    }

    /// A channel's users when they can be had without waiting (the embedded table); `None`
    /// when they must be read from elsewhere.
    pub fn users_now(&self, channel: &str) -> Option<Vec<Arc<str>>> {
        match self {
            Store::Memory(m) => Some(m.read(channel).users.into_keys().collect()),
            Store::Redis(_) => None,
        }
    }
}

/// A channel's users (streams per `sub`) and anonymous streams.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Table {
    pub users: HashMap<Arc<str>, u32>,
    pub anonymous: u32,
}

/// The embedded broker's presence: the reported counts, from which `join`/`leave` follow, and
/// the webhook events (when a queue is given).
#[derive(Default)]
pub struct MemoryPresence {
    tables: Mutex<HashMap<Arc<str>, Table>>,
    webhooks: Option<Arc<MemoryQueue>>,
}

impl MemoryPresence {
    /// Presence that also records webhook events in `webhooks`.
    pub fn with_webhooks(webhooks: Option<Arc<MemoryQueue>>) -> MemoryPresence {
        MemoryPresence {
            tables: Mutex::default(),
            webhooks,
        }
    }

    /// Applies one count; the `join`/`leave` it makes, if any. A channel's first stream and
    /// its last one, and a user's, are webhook events (recorded under the table's lock, so in
    /// the order they happened).
    pub(super) fn apply(&self, c: &PresenceCount) -> Option<Arc<PresenceEvent>> {
        let mut tables = self.tables.lock();
        let occupied_before = tables.contains_key(&c.channel);
        let table = tables.entry(c.channel.clone()).or_default();
        let event = match &c.sub {
            None => {
                table.anonymous = c.streams;
                None
            }
            Some(sub) => {
                let before = if c.streams > 0 {
                    table.users.insert(sub.clone(), c.streams)
                } else {
                    table.users.remove(sub)
                };
                let was = before.unwrap_or(0) > 0;
                let is = c.streams > 0;
                (was != is)
                    .then(|| ChannelName::new(&c.channel).ok())
                    .flatten()
                    .map(|channel| {
                        Arc::new(PresenceEvent {
                            channel,
                            sub: sub.clone(),
                            join: is,
                        })
                    })
            }
        };
        let occupied = !(table.users.is_empty() && table.anonymous == 0);
        if !occupied {
            tables.remove(&c.channel);
        }
        if let Some(q) = &self.webhooks {
            let member = event.as_ref().map(|e| (&*e.sub, e.join));
            q.record(&c.channel, occupied_before, occupied, member);
        }
        event
    }

    pub fn read(&self, channel: &str) -> Table {
        self.tables.lock().get(channel).cloned().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(ch: &str, sub: Option<&str>, streams: u32) -> PresenceCount {
        PresenceCount {
            channel: Arc::from(ch),
            sub: sub.map(Arc::from),
            streams,
        }
    }

    #[test]
    fn joins_and_leaves_follow_a_users_count_crossing_zero() {
        let p = MemoryPresence::default();
        let ev = p.apply(&count("c", Some("u"), 1)).unwrap();
        assert!(ev.join && &*ev.sub == "u" && ev.channel.as_str() == "c");
        assert!(
            p.apply(&count("c", Some("u"), 2)).is_none(),
            "a second stream"
        );
        assert!(
            p.apply(&count("c", None, 3)).is_none(),
            "anonymous are never named"
        );
        assert_eq!(p.read("c").users.get("u"), Some(&2));
        assert_eq!(p.read("c").anonymous, 3);
        assert!(!p.apply(&count("c", Some("u"), 0)).unwrap().join);
        assert!(
            p.apply(&count("c", Some("u"), 0)).is_none(),
            "a repeat changes nothing"
        );
        p.apply(&count("c", None, 0));
        assert_eq!(p.read("c"), Table::default());
        assert!(p.tables.lock().is_empty(), "an empty channel is forgotten");
    }
}

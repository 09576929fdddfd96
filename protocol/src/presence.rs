//! Reading a channel's presence from Rust services, over the `redis` crate: the same answer as
//! the hub's `GET /v1/presence`, straight from Redis (`FCALL_RO hub_presence_read`), summed over
//! every node. Read-only; it never writes presence (only hubs report counts). Feature `redis`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), protocol::publish::PublishError> {
//! let client = redis::Client::open("redis://127.0.0.1:6379/")?;
//! let mut conn = client.get_multiplexed_async_connection().await?;
//! let here = protocol::presence::read(&mut conn, "doc:7").await?;
//! println!("{} users, {} anonymous", here.users.len(), here.anonymous);
//! # Ok(()) }
//! ```

use crate::channel;
use crate::publish::PublishError;
use redis::aio::ConnectionLike;
use std::collections::BTreeMap;

/// Who is on a channel: streams per user (`sub`), and streams without a token.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Presence {
    pub users: BTreeMap<String, u64>,
    pub anonymous: u64,
}

/// `FCALL_RO hub_presence_read 1 <channel>`: the channel's users over every node. Works the
/// same against a Redis Cluster connection (routed by the channel's key slot).
pub async fn read<C: ConnectionLike>(
    conn: &mut C,
    channel: &str,
) -> Result<Presence, PublishError> {
    channel::validate(channel)?;
    let flat: Vec<String> = redis::cmd("FCALL_RO")
        .arg("hub_presence_read")
        .arg(1)
        .arg(channel)
        .query_async(conn)
        .await?;
    Ok(parse(&flat))
}

/// The function's answer: field/value pairs, `=<sub>` per user and the anonymous count under
/// any other field; counts of 0 (or unreadable) are no one.
fn parse(flat: &[String]) -> Presence {
    let mut p = Presence::default();
    for pair in flat.chunks_exact(2) {
        let n: u64 = pair[1].parse().unwrap_or(0);
        match pair[0].strip_prefix('=') {
            Some(sub) if n > 0 => {
                p.users.insert(sub.to_string(), n);
            }
            Some(_) => {}
            None => p.anonymous += n,
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_functions_answer_reads_as_users_and_anonymous() {
        let flat: Vec<String> = ["", "3", "=42", "2", "=77", "1", "=gone", "0", "=odd", "x"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let p = parse(&flat);
        assert_eq!(p.anonymous, 3);
        assert_eq!(
            p.users,
            BTreeMap::from([("42".to_string(), 2), ("77".to_string(), 1)])
        );
        assert_eq!(parse(&[]), Presence::default());
    }
}

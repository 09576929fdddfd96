//! Wire types shared by the hub, its tests, load generators and Rust publishers.
//!
//! Nothing here does I/O but the Redis helpers behind the `redis` feature. The map:
//! - [`channel`]: channel-name validation ([`ChannelName`]).
//! - [`envelope`]: the publish envelope `{"event", "data"}` and the HTTP publish body.
//! - [`sse`]: Server-Sent Events framing (`id:`, `event:`, `retry:`, multi-line `data:`, comments).
//! - [`position`]: a message's position in its channel ([`StreamId`]) and the SSE cursor that
//!   combines the positions of several channels into one `id:`.
//! - [`ws`]: WebSocket framing of server frames, built once and shared.
//! - [`idempotency`]: what an idempotency key of a durable publish may be.
//! - `publish` (feature `redis`): `publish_durable` (and `publish_durable_once`, with an
//!   idempotency key) / `publish_ephemeral` for Rust services.
//! - `presence` (feature `redis`): `read`, a channel's users over every node, from Redis.

pub mod channel;
pub mod envelope;
pub mod idempotency;
pub mod position;
#[cfg(feature = "redis")]
pub mod presence;
#[cfg(feature = "redis")]
pub mod publish;
pub mod sse;
pub mod ws;

pub use channel::{ChannelError, ChannelName};
pub use envelope::{Envelope, EnvelopeError, PublishRequest};
pub use position::{Cursor, StreamId};

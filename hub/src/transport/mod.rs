//! Transports: how a session's frames reach a client, over SSE or WebSocket.
//!
//! Each transport builds its own opening and closing frames and its response body; the node
//! and registry call through here so they never format a wire frame themselves.

pub mod sse;
pub mod ws;

use crate::metrics::{CloseReason, Transport};
use crate::node::Node;
use crate::session::Session;
use bytes::Bytes;
use protocol::{ChannelName, StreamId};

/// Frames written before anything else: `hub.connected`, then `hub.reset` for `reset` channels.
pub fn opening_frames(
    node: &Node,
    session: &Session,
    positions: &[StreamId],
    reset: &[ChannelName],
) -> Vec<Bytes> {
    match session.transport {
        Transport::Sse => sse::opening_frames(node, session, positions, reset),
        Transport::Ws => Vec::new(),
    }
}

/// `hub.reset` for channels whose history no longer reaches the stream's position, carrying
/// the stream's new position.
pub fn reset_frame(session: &Session, positions: &[StreamId], reset: &[ChannelName]) -> Bytes {
    match session.transport {
        Transport::Sse => sse::reset_frame(session, positions, reset),
        Transport::Ws => ws::reset_frame(reset),
    }
}

/// The frame that tells a client why its stream ends, if the reason has one.
pub fn last_frame(session: &Session, reason: CloseReason, retry_ms: u64) -> Option<Bytes> {
    match session.transport {
        Transport::Sse => sse::last_frame(session, reason, retry_ms),
        Transport::Ws => ws::last_frame(reason),
    }
}

//! What a stream queues for its transport (messages, hub events, replies to a WebSocket
//! client) and what offering it a message did. Plain data: no lock, no I/O; the transport
//! decides how each item looks on the wire.

use crate::domain::CloseReason;
use crate::message::Message;
use bytes::Bytes;
use protocol::{ChannelName, StreamId};
use std::sync::Arc;

/// Something a transport writes; the transport decides how it looks on the wire.
#[derive(Debug, Clone)]
pub enum Item {
    /// The stream started; the position of each channel, in the stream's channel order.
    Opened(Box<Vec<StreamId>>),
    /// A message (shared by every stream that gets it).
    Message(Arc<Message>),
    /// History no longer reached these channels' positions: each continues from the new one.
    Reset(Box<Vec<(ChannelName, StreamId)>>),
    /// Keep-alive (SSE comment, WebSocket ping).
    Heartbeat,
    /// An answer to the client (WebSocket); boxed, so that every item stays small.
    Reply(Box<Reply>),
    /// A user's first stream on a channel opened, or its last one closed, on some node.
    Presence(Arc<PresenceEvent>),
    /// Who is on a channel when a stream starts observing it (its changes follow).
    Present(Box<PresenceState>),
    /// The backend ended the stream (a disconnect or a revocation), with its reason: just
    /// before [`Item::End`].
    Disconnect(Arc<str>),
    /// The last item: why the stream ends.
    End(CloseReason),
    /// What a [`super::DirectSink`] could not write of a frame: written as it is, before anything else.
    Raw(Bytes),
}

/// `join`/`leave` of a user on a channel (shared by every stream that gets it).
#[derive(Debug, PartialEq, Eq)]
pub struct PresenceEvent {
    pub channel: ChannelName,
    pub sub: Arc<str>,
    pub join: bool,
}

/// The users on a channel (over every node) when an observer starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceState {
    pub channel: ChannelName,
    /// Sorted; shared by the observers that start while nothing changes.
    pub users: Arc<[Arc<str>]>,
}

/// Answers to a WebSocket client's frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Subscribed(ChannelName),
    Unsubscribed(ChannelName),
    /// A WebSocket's token was replaced; its new expiry.
    Refreshed(u64),
    Error {
        code: u16,
        message: String,
        channel: Option<String>,
    },
}

/// What happened to a live message offered to a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    Queued,
    /// Written to the socket through the stream's [`super::DirectSink`] (all of it, or its rest queued):
    /// the caller counts the delivery.
    Written,
    /// Not for this stream now: already delivered (an older position), not subscribed, left to
    /// history because the reader is behind, or the stream is ending.
    Skipped,
    /// An ephemeral message this reader fell behind on: lost to it (counted `lagged`).
    Lagged,
    /// A presence change left for the catch-up, which feeds it from the channel's log when
    /// the observer has room (see [`super::Session::offer_presence`]).
    Behind,
}

/// A reply or hub event did not fit even in the control slack: the client sends but does not
/// read. The caller closes the stream as slow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

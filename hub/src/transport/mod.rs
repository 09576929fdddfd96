//! Transports: how a stream's items reach a client, over SSE or WebSocket.
//!
//! Each transport checks its own request, opens the stream through the node, and renders the
//! session's items ([`crate::stream::Item`]) in its own wire format. Nothing below the
//! transports (node, registry, session) formats a wire frame.

pub mod sse;
pub mod ws;

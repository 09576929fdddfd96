//! Transports: how a stream's items reach a client, over SSE or WebSocket.
//!
//! Each transport checks its own request, opens the stream through the node, and renders the
//! stream's items ([`crate::stream::Item`]) in its own wire format; [`socket`] writes a body to
//! a bare socket when the public port's front serves it. Nothing below the transports (node,
//! channels, stream) formats a wire frame.

pub mod credentials;
pub mod socket;
pub mod sse;
pub mod sse_body;
pub mod ws;
mod ws_commands;
pub mod ws_frames;

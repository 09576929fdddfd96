//! Presence: who is on each channel over every node, and its `join`/`leave` events.
//!
//! - [`store`]: where counts live (memory, or Redis through the broker).
//! - [`report`]: the once-a-second reporter of this node's counts, and the reading of a
//!   channel's users for its observers ([`seed`]).
//!
//! The registry (`channels`) keeps each channel's counts and its log of joins and leaves
//! (`channels::presence_log`) under the channel's lock, where they are written; this module
//! moves them between the registry and the store. It holds no stream and never blocks one.

pub mod report;
pub mod store;

pub use report::{run, seed, Reporter};
pub use store::{MemoryPresence, Store, Table};

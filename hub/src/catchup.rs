//! The catch-up: history reads for readers that are behind (a resume, a reader that fell more
//! than its queue behind, every reader after the broker may have lost messages), and presence
//! changes for observers behind on their channel's presence log.
//!
//! Streams ask by sequence number when they have room (see `Session::poll_item`); one task
//! takes every request waiting, groups the readers by channel and serves each group with pages
//! read from the group's oldest position, each of `c` = min([`PAGE`], the roomiest reader's
//! room) messages at most (`XRANGE ... COUNT c` in Redis): a page serves every reader whose
//! position lies inside it, and the next read starts at the oldest reader it did not reach.
//! **Cost bound:** one round costs at most `ceil(HUB_HISTORY_LEN / c) + 1` reads of at most `c`
//! messages per channel, however many readers the channel has: 1,000 readers of one channel
//! that fell behind together cost one read per page, not 1,000 (measured in the sleepers
//! scenario, BENCHMARKS.md). A reader takes only what fits in its queue, so its memory does not
//! grow with how far behind it is. It never writes to sockets or holds a lock across a read.

use crate::broker::Broker;
use crate::channels::Registry;
use crate::metrics::Metrics;
use crate::namespaces::Namespaces;
use crate::stream::{PageView, Session};
use crate::tasks::Tasks;
use futures_util::StreamExt;
use protocol::{ChannelName, StreamId};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

/// Most messages per history read (the `COUNT`); a read asks for no more than the roomiest
/// reader of its group can take.
pub const PAGE: usize = 256;
/// Channels read at once: bounds the reads in flight at the broker.
const CONCURRENCY: usize = 16;
/// Requests taken in one round (the rest wait for the next).
const BATCH: usize = 4096;
/// Pause before readers whose read failed (or that waited for the broker) ask again.
const RETRY: Duration = Duration::from_millis(500);
/// Reads of one channel that fail in a row before its readers are given `hub.reset` and go
/// on live: a key of the wrong type (or any lasting error) must not keep them waiting forever.
const GIVE_UP_AFTER: u32 = 3;

/// The channel streams ask on. Unbounded but holding at most one entry per open stream: a
/// stream asks again only after its request was taken (`Session::begin_reads` clears it).
pub fn channel() -> (UnboundedSender<u64>, UnboundedReceiver<u64>) {
    tokio::sync::mpsc::unbounded_channel()
}

/// What the catch-up works with: the node's registry and broker, its metrics, the channel
/// streams ask on, and the node's task list (retries run there). Built by the node; holds no
/// reference back to it.
pub struct CatchUp {
    pub registry: Arc<Registry>,
    pub broker: Arc<Broker>,
    pub metrics: Arc<Metrics>,
    pub refill: UnboundedSender<u64>,
    pub tasks: Arc<Tasks>,
    /// A conflated channel's readers jump to its newest message (`conflate_ms`).
    pub namespaces: Namespaces,
}

/// One reader of one channel in a round.
struct Reader {
    session: Arc<Session>,
    pos: StreamId,
    token: u64,
    room: usize,
}

/// Serves requests until the node stops (the task is aborted then).
pub async fn run(ctx: Arc<CatchUp>, mut requests: UnboundedReceiver<u64>) {
    let mut batch = Vec::with_capacity(64);
    // Failed reads in a row, per channel (only channels failing now are in it).
    let failing: Failing = parking_lot::Mutex::new(HashMap::new());
    loop {
        if requests.recv_many(&mut batch, BATCH).await == 0 {
            return;
        }
        // Closed meanwhile: nothing to do.
        let sessions: Vec<Arc<Session>> = batch
            .drain(..)
            .filter_map(|seq| ctx.registry.get(seq))
            .collect();
        // Presence changes come from the node's own log: no broker needed.
        for session in &sessions {
            ctx.registry.pump_presence(session);
        }
        // While the broker's subscriptions are not whole, no read could take a reader live:
        // hold the requests until they are.
        let Some(epoch) = ctx.broker.live_epoch() else {
            ctx.broker.wait_whole(RETRY).await;
            for session in &sessions {
                let _ = ctx.refill.send(session.seq);
            }
            continue;
        };
        let mut groups: HashMap<ChannelName, Vec<Reader>> = HashMap::new();
        for session in sessions {
            for r in session.begin_reads() {
                groups.entry(r.channel).or_default().push(Reader {
                    session: session.clone(),
                    pos: r.after,
                    token: r.token,
                    room: r.room,
                });
            }
        }
        futures_util::stream::iter(groups)
            .for_each_concurrent(CONCURRENCY, |(channel, readers)| {
                serve(&ctx, channel, readers, epoch, &failing)
            })
            .await;
    }
}

type Failing = parking_lot::Mutex<HashMap<ChannelName, u32>>;

/// Serves one channel's readers with as few page reads as their positions allow.
async fn serve(
    ctx: &Arc<CatchUp>,
    channel: ChannelName,
    mut readers: Vec<Reader>,
    epoch: u64,
    failing: &Failing,
) {
    // A conflated channel's readers want only its newest message: whoever is before it
    // reads from just before it, and is never reset for what it skipped.
    let conflated = ctx.namespaces.of(channel.as_str()).conflate_ms > 0;
    if conflated {
        match ctx.broker.rewind_point(&channel, 1).await {
            Ok(jump) => {
                for r in &mut readers {
                    r.pos = r.pos.max(jump);
                }
            }
            Err(e) => {
                tracing::debug!(channel = %channel, error = %e, "conflation: the newest position could not be read; reading on")
            }
        }
    }
    readers.sort_by_key(|r| r.pos);
    // A page as large as the roomiest reader can take (no reader takes more in one round).
    let count = readers
        .iter()
        .map(|r| r.room)
        .max()
        .unwrap_or(1)
        .clamp(1, PAGE);
    let mut next = 0;
    let mut again = Vec::new();
    while next < readers.len() {
        let after = readers[next].pos;
        ctx.metrics.history_reads.increment(1);
        let page = match ctx.broker.read(&channel, after, count).await {
            Ok(p) => {
                failing.lock().remove(&channel);
                p
            }
            Err(e) => {
                let failures = if e.answered() {
                    let mut f = failing.lock();
                    let n = f.entry(channel.clone()).or_insert(0);
                    *n += 1;
                    *n
                } else {
                    0 // a timeout or a lost connection: retried, not held against the channel
                };
                if failures >= GIVE_UP_AFTER {
                    failing.lock().remove(&channel);
                    tracing::warn!(channel = %channel, error = %e, "history cannot be read; its readers get hub.reset and go on live");
                    ctx.metrics.history_unreadable.increment(1);
                    for r in &readers[next..] {
                        r.session.give_up_read(&channel, r.token);
                    }
                    return;
                }
                tracing::warn!(channel = %channel, error = %e, "history read failed; readers retry");
                let mut lagged = 0;
                for r in &readers[next..] {
                    lagged += r.session.abort_read(&channel, r.token);
                }
                count_lagged(ctx, lagged);
                retry_later(ctx, readers[next..].iter().map(|r| r.session.seq).collect());
                return;
            }
        };
        let live_ok = ctx.broker.live_epoch() == Some(epoch);
        // The page covers positions up to its last entry (or, for an empty page, the reader
        // it was read for). Readers before the floor are reset; all of them are served.
        let end = page.last.unwrap_or(after);
        let view = PageView {
            entries: &page.entries,
            last: page.last,
            tail: page.tail,
            floor: if conflated {
                StreamId::ZERO
            } else {
                page.floor
            },
            more: page.more,
            live_ok,
        };
        let (mut replayed, mut lagged) = (0, 0);
        // Readers inside the page are served; one exactly at the end of a full page is left
        // for the next read, which starts at its position.
        let inside = |pos: StreamId| pos < end || (pos == end && !page.more) || pos < page.floor;
        while next < readers.len() && inside(readers[next].pos) {
            let r = &readers[next];
            let fed = r.session.feed(&channel, r.token, &view);
            replayed += fed.replayed;
            lagged += fed.lagged;
            if fed.again {
                again.push(r.session.seq);
            }
            next += 1;
        }
        if !page.more {
            // The page reached the tail: readers after it are at the tail too (or ahead of it,
            // and reset by the same page).
            while next < readers.len() {
                let r = &readers[next];
                let fed = r.session.feed(&channel, r.token, &view);
                lagged += fed.lagged;
                if fed.again {
                    again.push(r.session.seq);
                }
                next += 1;
            }
        }
        ctx.metrics.history_replayed.increment(replayed as u64);
        count_lagged(ctx, lagged);
    }
    for seq in again {
        let _ = ctx.refill.send(seq);
    }
}

fn count_lagged(ctx: &CatchUp, lagged: usize) {
    if lagged > 0 {
        ctx.metrics
            .dropped(crate::metrics::DropReason::Lagged)
            .increment(lagged as u64);
    }
}

/// Asks again for these streams after a pause (a failed read must not spin).
fn retry_later(ctx: &Arc<CatchUp>, seqs: Vec<u64>) {
    let refill = ctx.refill.clone();
    ctx.tasks.spawn(async move {
        tokio::time::sleep(RETRY).await;
        for seq in seqs {
            let _ = refill.send(seq);
        }
    });
}

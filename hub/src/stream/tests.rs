//! The stream's unit tests: queue, reading, presence cursors and direct writes together.

use super::*;
use crate::domain::Transport;
use crate::message::Message;
use bytes::Bytes;
use parking_lot::Mutex;
use protocol::Envelope;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Instant;

fn chan(s: &str) -> ChannelName {
    ChannelName::new(s).unwrap()
}

fn id(n: u64) -> StreamId {
    StreamId::new(n, 0)
}

fn msg(c: &str, pos: Option<u64>, data: &str) -> Arc<Message> {
    let env = Envelope {
        event: None,
        data: data.into(),
    };
    Arc::new(Message::new(chan(c), pos.map(id), &env, Instant::now()))
}

fn session(channels: &[&str], cap: usize) -> Session {
    Session::new(
        SessionInit {
            seq: 1,
            transport: Transport::Sse,
            envelope: false,
            user: None,
            expires_at: None,
            capacity: cap,
            now: 0,
            refill: None,
            socket: None,
            multiplexed: false,
        },
        channels.iter().map(|c| chan(c)).collect(),
    )
}

/// What the transport would get now: data of messages, `reset`, `opened`, `hb`, `end`.
fn drain(s: &Session) -> Vec<String> {
    let mut cx = Context::from_waker(Waker::noop());
    let mut out = vec![];
    while let Poll::Ready(Some(item)) = s.poll_item(&mut cx) {
        out.push(match item {
            Item::Message(m) => m.data_json.trim_matches('"').to_string(),
            Item::Opened(_) => "opened".into(),
            Item::Reset(_) => "reset".into(),
            Item::Heartbeat => "hb".into(),
            Item::Reply(_) => "reply".into(),
            Item::Presence(p) => format!("{}:{}", if p.join { "join" } else { "leave" }, p.sub),
            Item::Present(p) => format!("present:{}", p.users.join(",")),
            Item::End(_) => "end".into(),
            Item::Disconnect(note) => format!("disconnect {note}"),
            Item::Raw(b) => format!("raw:{}", String::from_utf8_lossy(&b)),
        });
    }
    out
}

fn live(channels: &[&str], cap: usize) -> Session {
    let s = session(channels, cap);
    let starts: Vec<_> = channels
        .iter()
        .map(|c| (chan(c), StartAt::Live(StreamId::ZERO)))
        .collect();
    s.start(&starts, |_| vec![Item::Opened(Box::default())]);
    assert_eq!(drain(&s), ["opened"]);
    s
}

fn page<'a>(entries: &'a [Arc<Message>], tail: u64, more: bool) -> PageView<'a> {
    PageView {
        entries,
        last: entries.last().and_then(|m| m.position),
        tail: id(tail),
        floor: StreamId::ZERO,
        more,
        live_ok: true,
    }
}

#[test]
fn live_messages_during_the_start_follow_it_exactly_once() {
    let s = session(&["a"], 16);
    // 2 and 3 arrive while the start reads the tail (2).
    assert_eq!(s.offer(&msg("a", Some(2), "two")), Offer::Queued);
    assert_eq!(s.offer(&msg("a", Some(3), "three")), Offer::Queued);
    assert!(drain(&s).is_empty(), "nothing before the start");
    s.start(&[(chan("a"), StartAt::Live(id(2)))], |p| {
        assert_eq!(p, [id(2)]);
        vec![Item::Opened(Box::new(p.to_vec()))]
    });
    assert_eq!(drain(&s), ["opened", "three"]);
    assert_eq!(s.offer(&msg("a", Some(3), "dup")), Offer::Skipped);
}

#[test]
fn a_full_queue_falls_behind_and_history_takes_it_back_live() {
    let s = live(&["a"], 4);
    for n in 1..=4 {
        assert_eq!(s.offer(&msg("a", Some(n), "x")), Offer::Queued);
    }
    // The fifth does not fit: the reader falls behind; durable left to history, an
    // ephemeral one lost.
    assert_eq!(s.offer(&msg("a", Some(5), "x")), Offer::Skipped);
    assert_eq!(s.offer(&msg("a", None, "e")), Offer::Lagged);
    assert_eq!(s.offer(&msg("a", Some(6), "x")), Offer::Skipped);
    assert_eq!(s.queued(), 4, "the queue never grows past its capacity");
    assert_eq!(drain(&s).len(), 4);
    // Reading: live 7 arrives during the read and is merged after it.
    let reads = s.begin_reads();
    assert_eq!(reads.len(), 1);
    let (from, token) = (reads[0].after, reads[0].token);
    assert_eq!((from, reads[0].room), (id(4), 4));
    assert_eq!(s.offer(&msg("a", Some(7), "seven")), Offer::Queued);
    let entries = [msg("a", Some(5), "five"), msg("a", Some(6), "six")];
    let fed = s.feed("a", token, &page(&entries, 6, false));
    assert_eq!((fed.replayed, fed.again, fed.reset), (2, false, false));
    assert_eq!(drain(&s), ["five", "six", "seven"]);
    // Live again.
    assert_eq!(s.offer(&msg("a", Some(8), "eight")), Offer::Queued);
}

#[test]
fn a_reader_takes_only_what_fits_and_asks_again() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut s = session(&["a"], 4);
    s.refill = Some(tx);
    s.start(&[(chan("a"), StartAt::Resume(id(0)))], |_| Vec::new());
    assert_eq!(rx.try_recv(), Ok(1), "a resume asks for history at once");
    let entries: Vec<_> = (1..=10).map(|n| msg("a", Some(n), "x")).collect();
    let token = s.begin_reads()[0].token;
    let fed = s.feed("a", token, &page(&entries, 10, false));
    assert_eq!((fed.replayed, fed.again), (4, false), "4 fit; no room yet");
    assert_eq!(drain(&s).len(), 4);
    assert_eq!(rx.try_recv(), Ok(1), "asked again once drained");
    let read = s.begin_reads()[0].clone();
    let token = read.token;
    assert_eq!(read.after, id(4));
    let fed = s.feed("a", token, &page(&entries, 10, false));
    assert_eq!(fed.replayed, 4);
}

#[test]
fn a_reader_before_the_floor_is_reset_to_the_tail() {
    let s = session(&["a"], 8);
    s.start(&[(chan("a"), StartAt::Resume(id(1)))], |_| Vec::new());
    let token = s.begin_reads()[0].token;
    let entries = [msg("a", Some(5), "five")];
    let fed = s.feed(
        "a",
        token,
        &PageView {
            entries: &entries,
            last: Some(id(5)),
            tail: id(5),
            floor: id(3),
            more: false,
            live_ok: true,
        },
    );
    assert!(fed.reset);
    assert_eq!(drain(&s), ["reset"]);
    assert_eq!(s.position_of("a"), Some(id(5)));
    assert_eq!(s.offer(&msg("a", Some(6), "six")), Offer::Queued);
}

#[test]
fn a_read_that_cannot_vouch_for_live_leaves_the_reader_behind() {
    let s = session(&["a"], 8);
    s.start(&[(chan("a"), StartAt::Resume(id(1)))], |_| Vec::new());
    let token = s.begin_reads()[0].token;
    assert_eq!(s.offer(&msg("a", None, "e")), Offer::Queued);
    let fed = s.feed(
        "a",
        token,
        &PageView {
            live_ok: false,
            ..page(&[], 1, false)
        },
    );
    assert_eq!(fed.lagged, 1, "the buffered ephemeral message is lost");
    assert_eq!(s.begin_reads().len(), 1, "still behind");
}

#[test]
fn a_stale_token_is_ignored() {
    let s = session(&["a"], 8);
    s.start(&[(chan("a"), StartAt::Resume(id(1)))], |_| Vec::new());
    let token = s.begin_reads()[0].token;
    assert_eq!(s.abort_read("a", token), 0);
    let entries = [msg("a", Some(2), "two")];
    assert_eq!(
        s.feed("a", token, &page(&entries, 2, false)),
        Fed::default()
    );
    assert!(drain(&s).is_empty());
}

#[test]
fn a_sleeping_reader_that_fell_behind_gives_back_its_durable_messages() {
    let s = live(&["a"], 4);
    s.offer(&msg("a", Some(1), "one"));
    s.offer(&msg("a", None, "e"));
    let mut cx = Context::from_waker(Waker::noop());
    assert!(matches!(
        s.poll_item(&mut cx),
        Poll::Ready(Some(Item::Message(_)))
    ));
    s.took(5);
    for n in 2..=4 {
        assert_eq!(s.offer(&msg("a", Some(n), "x")), Offer::Queued);
    }
    s.trim_if_idle(10);
    assert_eq!(s.queued(), 4, "not behind yet: nothing given back");
    assert_eq!(
        s.offer(&msg("a", Some(5), "five")),
        Offer::Skipped,
        "falls behind"
    );
    s.trim_if_idle(4);
    assert_eq!(s.queued(), 4, "took something since: kept");
    s.trim_if_idle(10);
    assert_eq!(drain(&s), ["e"], "the ephemeral one stays");
    let read = s.begin_reads()[0].clone();
    assert_eq!(read.after, id(1), "rewound to what was taken");
}

/// Issue 21, defect 3: a sleeper's queue was trimmed while another of its channels had a
/// history read in flight; the channel rewound but kept the read, whose page began after
/// the old position, so the messages between were never delivered.
#[test]
fn a_trim_while_a_read_is_in_flight_loses_nothing() {
    let s = live(&["a", "b"], 8);
    for n in 1..=6 {
        s.offer(&msg("a", Some(n), &format!("a{n}")));
    }
    s.offer(&msg("b", Some(1), "b1"));
    s.offer(&msg("a", Some(7), "a7"));
    assert_eq!(
        s.offer(&msg("a", Some(8), "a8")),
        Offer::Skipped,
        "a falls behind"
    );
    let mut cx = Context::from_waker(Waker::noop());
    assert!(
        matches!(s.poll_item(&mut cx), Poll::Ready(Some(_))),
        "a1 taken"
    );
    s.took(1);
    // A reconnection to the broker: b must check its position too.
    s.fall_behind();
    let reads = s.begin_reads();
    let read = |c: &str| {
        reads
            .iter()
            .find(|r| r.channel.as_str() == c)
            .cloned()
            .unwrap()
    };
    let (ra, rb) = (read("a"), read("b"));
    assert_eq!((ra.after, rb.after), (id(7), id(1)));
    // a's page fills the queue and leaves it behind; b's read is still under way.
    let a8 = [msg("a", Some(8), "a8")];
    s.feed("a", ra.token, &page(&a8, 9, true));
    // The reader sleeps: its durable messages are given back.
    s.trim_if_idle(5);
    // b's read lands with what followed b1.
    let history_b = [msg("b", Some(1), "b1"), msg("b", Some(2), "b2")];
    s.feed("b", rb.token, &page(&history_b[1..], 2, false));
    // The catch-up goes on until nothing is behind; collect what b gets.
    let history_a: Vec<_> = (1..=9)
        .map(|n| msg("a", Some(n), &format!("a{n}")))
        .collect();
    let mut got = Vec::new();
    for _ in 0..10 {
        got.extend(drain(&s));
        for r in s.begin_reads() {
            let h: &[Arc<Message>] = if r.channel.as_str() == "a" {
                &history_a
            } else {
                &history_b
            };
            let from = h.partition_point(|m| m.position <= Some(r.after));
            let tail = h.last().and_then(|m| m.position).unwrap().ms;
            s.feed(r.channel.as_str(), r.token, &page(&h[from..], tail, false));
        }
    }
    got.extend(drain(&s));
    let b: Vec<_> = got.iter().filter(|d| d.starts_with('b')).cloned().collect();
    assert_eq!(
        b,
        ["b1", "b2"],
        "every message of b once, in order: {got:?}"
    );
    let a: Vec<_> = got.iter().filter(|d| d.starts_with('a')).cloned().collect();
    let want: Vec<_> = (2..=9).map(|n| format!("a{n}")).collect();
    assert_eq!(a, want, "every message of a after what was taken");
}

#[test]
fn a_reader_that_must_check_its_position_buffers_live_messages_meanwhile() {
    let s = live(&["a"], 8);
    s.offer(&msg("a", Some(1), "one"));
    s.fall_behind();
    // Until the read lands, live messages wait (an ephemeral one is not lost).
    assert_eq!(s.offer(&msg("a", None, "e")), Offer::Queued);
    assert_eq!(s.offer(&msg("a", Some(3), "three")), Offer::Queued);
    let read = s.begin_reads()[0].clone();
    assert_eq!(read.after, id(1));
    assert!(s.begin_reads().is_empty(), "one read at a time");
    // History had 2 (lost live across the reconnection) and 3.
    let entries = [msg("a", Some(2), "two"), msg("a", Some(3), "three")];
    let fed = s.feed("a", read.token, &page(&entries, 3, false));
    assert_eq!((fed.replayed, fed.lagged), (2, 0));
    assert_eq!(drain(&s), ["one", "two", "three", "e"]);
}

#[test]
fn heartbeats_only_on_an_idle_started_stream() {
    let s = session(&["a"], 4);
    assert!(!s.push_heartbeat(), "not before the start");
    s.start(&[(chan("a"), StartAt::Live(id(0)))], |_| Vec::new());
    assert!(s.push_heartbeat());
    assert!(!s.push_heartbeat(), "not while something is queued");
    assert_eq!(drain(&s), ["hb"]);
}

#[test]
fn replies_have_a_bounded_slack() {
    let s = live(&["a"], 2);
    for _ in 0..2 + CONTROL_SLACK {
        assert_eq!(s.push_reply(Reply::Subscribed(chan("a"))), Ok(()));
    }
    assert_eq!(s.push_reply(Reply::Subscribed(chan("a"))), Err(Full));
}

#[test]
fn presence_events_reach_only_channels_that_asked_and_a_full_queue_falls_behind() {
    let s = live(&["a", "b"], 4);
    drain(&s);
    let ev = |c: &str, join: bool| {
        Arc::new(PresenceEvent {
            channel: chan(c),
            sub: Arc::from("u"),
            join,
        })
    };
    assert_eq!(s.offer_presence(&ev("a", true), 1), Offer::Skipped);
    s.want_presence(Some("a"));
    assert!(s.presence_start("a", 1) && !s.presence_start("b", 0));
    // Owed the users present first: a change waits behind them.
    assert_eq!(s.offer_presence(&ev("a", true), 2), Offer::Behind);
    assert_eq!(s.presence_room("a"), Some((1, 4, true)));
    s.presence_fed("a", 1, Some(Arc::from(vec![Arc::from("v")])), vec![], 1, 2);
    assert_eq!(s.presence_room("a"), Some((1, 3, false)));
    s.presence_fed("a", 1, None, vec![ev("a", true)], 2, 2);
    assert_eq!(drain(&s), ["present:v", "join:u"]);
    assert_eq!(s.offer_presence(&ev("b", true), 1), Offer::Skipped);
    assert_eq!(s.presence_cursor("a"), Some(2));
    assert_eq!(s.presence_cursor("b"), None);
    // A full queue: the change is left to the log, and so is every later one.
    for i in 0..4 {
        s.offer(&msg("a", Some(i + 1), "m"));
    }
    assert_eq!(s.offer_presence(&ev("a", false), 3), Offer::Behind);
    assert_eq!(s.presence_room("a"), None, "no room yet");
    assert_eq!(drain(&s).len(), 4);
    assert_eq!(s.presence_due(), [chan("a")]);
    assert_eq!(s.presence_room("a"), Some((2, 4, false)));
    s.presence_fed("a", 2, None, vec![ev("a", false)], 3, 3);
    assert_eq!(drain(&s), ["leave:u"]);
    assert!(s.presence_due().is_empty(), "caught up");
    assert_eq!(s.offer_presence(&ev("a", true), 4), Offer::Queued);
    assert_eq!(drain(&s), ["join:u"], "queued directly again");
}

/// A socket that takes what the test scripts, and keeps what it took.
#[derive(Default)]
struct Script {
    takes: Mutex<VecDeque<usize>>,
    wrote: Mutex<Vec<String>>,
}

impl DirectSink for Arc<Script> {
    fn send(&self, msg: &Message, session: &Session) -> Sent {
        let frame = Bytes::from(msg.data_json.trim_matches('"').to_string());
        let n = self
            .takes
            .lock()
            .pop_front()
            .unwrap_or(usize::MAX)
            .min(frame.len());
        if n == 0 {
            return Sent::Nothing;
        }
        self.wrote
            .lock()
            .push(String::from_utf8_lossy(&frame[..n]).into_owned());
        session.took(7);
        if n == frame.len() {
            Sent::All
        } else {
            Sent::Part(frame.slice(n..))
        }
    }
}

#[test]
fn a_parked_writer_lets_the_fanout_write_and_anything_queued_goes_first() {
    let s = live(&["a"], 4);
    let sock = Arc::new(Script::default());
    s.attach(Box::new(sock.clone()));
    // Not parked yet: queued.
    s.offer(&msg("a", Some(1), "m1"));
    assert_eq!(drain(&s), ["m1"]);
    s.park();
    assert_eq!(s.offer(&msg("a", Some(2), "m2")), Offer::Written);
    assert_eq!(s.queued(), 0, "written by the fan-out, not queued");
    assert_eq!(*sock.wrote.lock(), ["m2"]);
    assert_eq!(s.last_taken.load(Ordering::Relaxed), 7);
    // A short write: the frame's rest is queued and everything after it follows it.
    sock.takes.lock().extend([1]);
    s.offer(&msg("a", Some(3), "m3"));
    s.offer(&msg("a", Some(4), "m4"));
    assert_eq!(*sock.wrote.lock(), ["m2", "m"]);
    // Already written (or started): an older position is not offered again.
    assert_eq!(s.offer(&msg("a", Some(3), "m3")), Offer::Skipped);
    assert_eq!(drain(&s), ["raw:3", "m4"]);
    // The socket is full: queued, and the writer (woken) writes it.
    s.park();
    sock.takes.lock().extend([0]);
    s.offer(&msg("a", Some(5), "m5"));
    assert_eq!(drain(&s), ["m5"]);
    // Something of the writer's own queued (a heartbeat): messages queue behind it.
    s.park();
    assert!(s.push_heartbeat());
    s.offer(&msg("a", Some(6), "m6"));
    // The writer about to write bytes of its own.
    assert_eq!(drain(&s), ["hb", "m6"]);
    s.park();
    s.unpark();
    s.offer(&msg("a", Some(7), "m7"));
    assert_eq!(drain(&s), ["m7"]);
    // Taken back: nothing is written through it again.
    s.park();
    s.detach();
    s.offer(&msg("a", Some(8), "m8"));
    assert_eq!(drain(&s), ["m8"]);
    assert_eq!(*sock.wrote.lock(), ["m2", "m"]);
}

#[test]
fn a_burst_offered_at_once_is_written_together_and_what_the_socket_leaves_is_queued_in_order() {
    let s = live(&["a", "b"], 8);
    let sock = Arc::new(Script::default());
    s.attach(Box::new(sock.clone()));
    s.park();
    // Two whole frames, then part of the third: the third's rest and the rest follow in order.
    sock.takes.lock().extend([usize::MAX, usize::MAX, 1]);
    let burst: Vec<_> = (1..=5)
        .map(|n| msg("a", Some(n), &format!("m{n}")))
        .collect();
    let mut outcomes = Vec::new();
    s.offer_many(&burst, |o| outcomes.push(o));
    assert_eq!(
        outcomes,
        [
            Offer::Written,
            Offer::Written,
            Offer::Written,
            Offer::Queued,
            Offer::Queued
        ]
    );
    assert_eq!(*sock.wrote.lock(), ["m1", "m2", "m"]);
    assert_eq!(drain(&s), ["raw:3", "m4", "m5"]);
    // Already taken positions are skipped; a message of another channel between two of the
    // burst keeps its place; a full queue leaves the rest to history.
    s.park();
    let mixed = [
        msg("a", Some(5), "again"),
        msg("a", Some(6), "m6"),
        msg("b", Some(1), "b1"),
        msg("a", Some(7), "m7"),
    ];
    let mut outcomes = Vec::new();
    s.offer_many(&mixed, |o| outcomes.push(o));
    assert_eq!(outcomes[0], Offer::Skipped);
    assert_eq!(*sock.wrote.lock(), ["m1", "m2", "m", "m6", "b1", "m7"]);
    s.unpark();
    let full: Vec<_> = (8..=20)
        .map(|n| msg("a", Some(n), &format!("m{n}")))
        .collect();
    let mut outcomes = Vec::new();
    s.offer_many(&full, |o| outcomes.push(o));
    let queued = outcomes.iter().filter(|o| **o == Offer::Queued).count();
    assert_eq!(queued, 8, "up to the capacity, then behind: {outcomes:?}");
    assert!(s.is_behind());
}

#[test]
fn a_dropped_queue_keeps_a_frames_rest_and_a_sleeper_rewinds_to_what_was_written() {
    let s = live(&["a"], 2);
    let sock = Arc::new(Script::default());
    s.attach(Box::new(sock.clone()));
    s.park();
    sock.takes.lock().extend([1]);
    s.offer(&msg("a", Some(1), "m1"));
    s.offer(&msg("a", Some(2), "m2"));
    assert_eq!(s.finish(CloseReason::Slow, true, None), 1);
    assert_eq!(drain(&s), ["raw:1", "end"]);
    // Written through the sink counts as taken: the queue gives back only what follows.
    let s = live(&["a"], 1);
    s.attach(Box::new(sock.clone()));
    s.park();
    s.offer(&msg("a", Some(1), "m1"));
    s.unpark();
    s.offer(&msg("a", Some(2), "m2"));
    s.offer(&msg("a", Some(3), "m3"));
    s.last_taken.store(0, Ordering::Relaxed);
    s.trim_if_idle(1);
    assert_eq!(s.queued(), 0);
    assert_eq!(s.position_of("a"), Some(id(1)));
}

#[test]
fn finish_ends_with_the_reason() {
    let s = live(&["a"], 4);
    s.offer(&msg("a", Some(1), "x"));
    assert_eq!(s.finish(CloseReason::Stale, true, None), 1);
    assert_eq!(drain(&s), ["end"]);
    let mut cx = Context::from_waker(Waker::noop());
    assert!(matches!(s.poll_item(&mut cx), Poll::Ready(None)));
    assert!(s.mark_closed(CloseReason::Stale));
    assert!(!s.mark_closed(CloseReason::Client), "first reason wins");
}

//! The registry's unit tests: admission, fan-out, ticks and presence together.

use super::*;
use crate::domain::RejectReason;
use crate::stream::{Item, SessionInit, StartAt};
use protocol::{Envelope, StreamId};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

fn reg() -> Registry {
    Registry::new(Arc::new(Metrics::new()))
}

fn open(r: &Registry, chans: &[&str], cap: usize) -> (Arc<Session>, Vec<ChannelName>) {
    open_as(r, chans, cap, None)
}

fn open_as(
    r: &Registry,
    chans: &[&str],
    cap: usize,
    user: Option<&str>,
) -> (Arc<Session>, Vec<ChannelName>) {
    open_with(r, chans, cap, user, false)
}

/// A started stream on `chans`, asking for their presence with `presence`; with the
/// channels whose subscription was not confirmed.
fn open_with(
    r: &Registry,
    chans: &[&str],
    cap: usize,
    user: Option<&str>,
    presence: bool,
) -> (Arc<Session>, Vec<ChannelName>) {
    let user: Option<Arc<str>> = user.map(Arc::from);
    assert!(r.try_admit(10_000, user.as_ref(), 10).is_ok());
    let chans: Vec<ChannelName> = chans.iter().map(|c| ChannelName::new(c).unwrap()).collect();
    let s = Arc::new(Session::new(
        SessionInit {
            seq: r.next_seq(),
            transport: Transport::Sse,
            envelope: false,
            user,
            expires_at: None,
            capacity: cap,
            now: 0,
            refill: None,
            socket: None,
            multiplexed: false,
        },
        chans.clone(),
    ));
    if presence {
        s.want_presence(None);
    }
    r.register(&s);
    let first = r.add_channels(&s, &chans, |_| 0).expect("no reader limit");
    let starts: Vec<_> = chans
        .iter()
        .map(|c| (c.clone(), StartAt::Live(StreamId::ZERO)))
        .collect();
    s.start(&starts, |_| Vec::new());
    (s, first)
}

fn msg(c: &str, pos: Option<u64>) -> Arc<Message> {
    let env = Envelope {
        event: None,
        data: "x".into(),
    };
    Arc::new(Message::new(
        ChannelName::new(c).unwrap(),
        pos.map(|i| StreamId::new(i, 0)),
        &env,
        Instant::now(),
    ))
}

#[test]
fn the_lanes_bring_every_reader_each_message_once_in_order() {
    let r = Arc::new(reg());
    r.start_lanes_n(3).unwrap();
    // A large channel, and readers of it and a small one (their messages interleaved).
    let big: Vec<_> = (0..2055).map(|_| open(&r, &["big"], 8).0).collect();
    let both: Vec<_> = (0..10).map(|_| open(&r, &["big", "small"], 8).0).collect();
    let want_big = [Some(1), Some(2), Some(3)];
    for i in 1..=3 {
        r.fanout_later(&msg("big", Some(i)));
        r.fanout_later(&msg("small", Some(i)));
    }
    let read = |s: &Arc<Session>, n: usize| {
        let mut cx = Context::from_waker(Waker::noop());
        let mut got = vec![];
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while got.len() < n && Instant::now() < deadline {
            match s.poll_item(&mut cx) {
                Poll::Ready(Some(Item::Message(m))) => {
                    got.push((m.channel.as_str().to_string(), m.position.map(|p| p.ms)))
                }
                _ => std::thread::sleep(std::time::Duration::from_millis(1)),
            }
        }
        got
    };
    for s in &big {
        let got: Vec<_> = read(s, 3).into_iter().map(|(_, p)| p).collect();
        assert_eq!(got, want_big);
    }
    // Each channel in order, whatever came between (the small channel's messages may pass
    // the large one's fan-out, done in parts).
    for s in &both {
        let got = read(s, 6);
        for c in ["big", "small"] {
            let of: Vec<_> = got
                .iter()
                .filter(|(ch, _)| ch == c)
                .map(|(_, p)| *p)
                .collect();
            assert_eq!(of, want_big, "{c}");
        }
    }
    let mut cx = Context::from_waker(Waker::noop());
    assert!(big[0].poll_item(&mut cx).is_pending(), "nothing twice");
}

#[test]
fn a_full_lane_takes_no_more_and_its_readers_of_the_channel_fall_behind() {
    let r = reg();
    let lanes = lanes::Lanes::idle(2);
    // Sequence numbers 1 and 2: one reader on each lane.
    let (one, _) = open(&r, &["a"], 8);
    let (two, _) = open(&r, &["a"], 8);
    let on_lane = |s: &Session| lanes::lane_of(s.seq, 2);
    assert_ne!(on_lane(&one), on_lane(&two));
    for i in 0..lanes::LANE_MESSAGES {
        assert!(lanes.queue(&msg("a", Some(i as u64 + 1))).is_empty());
    }
    let over = msg("a", None);
    assert_eq!(lanes.queue(&over), [0, 1], "both lanes full (by count)");
    r.lane_full(&lanes, &over, on_lane(&one));
    assert_eq!(one.begin_reads().len(), 1, "reads the channel from history");
    assert!(
        two.begin_reads().is_empty(),
        "the other lane's reader is untouched"
    );
    assert!(r
        .metrics
        .render()
        .contains("hub_messages_dropped_total{reason=\"lagged\"} 1"));
    // By bytes: a few large messages fill a lane long before the count.
    let lanes = lanes::Lanes::idle(1);
    let big = {
        let env = Envelope {
            event: None,
            data: serde_json::Value::String("x".repeat(4 << 20)),
        };
        Arc::new(Message::new(
            ChannelName::new("a").unwrap(),
            None,
            &env,
            Instant::now(),
        ))
    };
    let fit = lanes::LANE_BYTES / (4 << 20);
    for _ in 0..fit - 1 {
        assert!(lanes.queue(&big).is_empty());
    }
    assert_eq!(lanes.queue(&big), [0], "full by bytes after {fit} of 4 MB");
}

fn names(v: &[ChannelName]) -> Vec<&str> {
    v.iter().map(|c| c.as_str()).collect()
}

fn reported(r: &Registry, grace: u64) -> Vec<(String, Option<String>, u32)> {
    let mut v: Vec<_> = r
        .take_presence(grace)
        .into_iter()
        .map(|c| {
            (
                c.channel.to_string(),
                c.sub.map(|s| s.to_string()),
                c.streams,
            )
        })
        .collect();
    v.sort();
    v
}

/// A stream on `channel` that asked for its presence.
fn observer(r: &Registry, channel: &str, cap: usize) -> Arc<Session> {
    open_with(r, &[channel], cap, None, true).0
}

fn change(channel: &str, sub: &str, join: bool) -> Arc<PresenceEvent> {
    Arc::new(PresenceEvent {
        channel: ChannelName::new(channel).unwrap(),
        sub: Arc::from(sub),
        join,
    })
}

/// Takes what `s` has queued as the catch-up and a transport would (pump, then drain,
/// until nothing comes), applying joins and leaves to `view`; every one must be a change.
fn read_presence(r: &Registry, s: &Session, view: &mut std::collections::BTreeSet<String>) {
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        r.pump_presence(s);
        let mut got = 0;
        while let Poll::Ready(Some(item)) = s.poll_item(&mut cx) {
            match item {
                Item::Presence(p) => {
                    if p.join {
                        assert!(view.insert(p.sub.to_string()), "join of {}", p.sub);
                    } else {
                        assert!(view.remove(&*p.sub), "leave of {}", p.sub);
                    }
                }
                Item::Present(p) => {
                    *view = p.users.iter().map(|u| u.to_string()).collect();
                }
                _ => continue,
            }
            got += 1;
        }
        if got == 0 {
            return;
        }
    }
}

#[test]
fn an_observer_with_a_small_queue_gets_every_join_and_leave_of_a_storm() {
    let r = reg();
    let obs = observer(&r, "c", 4);
    let (plain, _) = open(&r, &["c"], 4);
    let mut view = std::collections::BTreeSet::new();
    for i in 0..1000 {
        r.presence_event(&change("c", &format!("u{i}"), true));
        if i % 97 == 0 {
            read_presence(&r, &obs, &mut view);
        }
    }
    read_presence(&r, &obs, &mut view);
    assert_eq!(view.len(), 1000, "every join, with a queue of 4");
    let late = observer(&r, "c", 4);
    let mut late_view = std::collections::BTreeSet::new();
    for i in 0..1000 {
        r.presence_event(&change("c", &format!("u{i}"), false));
        if i % 89 == 0 {
            read_presence(&r, &obs, &mut view);
        }
    }
    // A repeated join is no change; a user who joins and leaves unread cancels out.
    r.presence_event(&change("c", "x", true));
    r.presence_event(&change("c", "x", true));
    read_presence(&r, &obs, &mut view);
    assert_eq!(
        view.into_iter().collect::<Vec<_>>(),
        ["x"],
        "every leave, x's join"
    );
    let mut view = std::collections::BTreeSet::from(["x".to_string()]);
    r.presence_event(&change("c", "x", false));
    read_presence(&r, &obs, &mut view);
    assert!(view.is_empty());
    // The late observer started after the joins and read nothing since: it starts from
    // who is there now (nobody), with nothing to undo.
    let mut cx = Context::from_waker(Waker::noop());
    r.pump_presence(&late);
    let mut got = Vec::new();
    while let Poll::Ready(Some(item)) = late.poll_item(&mut cx) {
        got.push(item);
    }
    assert!(
        matches!(&got[..], [Item::Present(p)] if p.users.is_empty()),
        "{got:?}"
    );
    // One that starts now gets the users present, then only what changes.
    r.presence_event(&change("c", "y", true));
    let third = observer(&r, "c", 4);
    r.presence_event(&change("c", "z", true));
    read_presence(&r, &third, &mut late_view);
    assert_eq!(late_view.iter().collect::<Vec<_>>(), ["y", "z"]);
    let mut cx = Context::from_waker(Waker::noop());
    assert!(
        !matches!(
            plain.poll_item(&mut cx),
            Poll::Ready(Some(Item::Presence(_)))
        ),
        "a stream that did not ask gets none"
    );
}

#[test]
fn an_observer_that_never_reads_holds_a_bounded_log_and_is_closed_as_slow() {
    let r = reg();
    let stuck = observer(&r, "c", 4);
    let reader = observer(&r, "c", 4);
    let mut view = std::collections::BTreeSet::new();
    let n = crate::channels::presence_log::MAX_KEPT + 10;
    for i in 0..n {
        r.presence_event(&change("c", &format!("u{}", i / 2), i % 2 == 0));
        if i % 1000 == 0 {
            read_presence(&r, &reader, &mut view);
        }
    }
    read_presence(&r, &reader, &mut view);
    assert!(view.is_empty(), "the reader kept up: {}", view.len());
    assert!(stuck.is_presence_lost() && !reader.is_presence_lost());
    let due = r.tick(1, 30, 0, 90, |_| false);
    assert!(due
        .iter()
        .any(|(s, why)| Arc::ptr_eq(s, &stuck) && *why == CloseReason::Slow));
    assert!(!due.iter().any(|(s, _)| Arc::ptr_eq(s, &reader)));
    let shard = r.channels[shard_of("c")].lock();
    let log = &shard.get("c").unwrap().log;
    assert!(log.head() - log.floor() < crate::channels::presence_log::MAX_KEPT as u64);
}

#[test]
fn presence_counts_are_coalesced_and_a_zero_waits_for_the_grace() {
    let r = reg();
    let (a, _) = open_as(&r, &["c"], 8, Some("u"));
    let (b, _) = open_as(&r, &["c"], 8, Some("u"));
    let (anon, _) = open_as(&r, &["c"], 8, None);
    assert_eq!(
        reported(&r, 5),
        [("c".into(), None, 1), ("c".into(), Some("u".into()), 2)]
    );
    assert!(reported(&r, 5).is_empty(), "reported once");
    r.close(&a, CloseReason::Client);
    r.close(&b, CloseReason::Client);
    r.close(&anon, CloseReason::Client);
    // Every 0 waits for the grace (a user's leave, the channel's vacancy).
    assert!(reported(&r, 5).is_empty());
    // Back within the grace: reported as the count it is (1), never as 0.
    let (c, _) = open_as(&r, &["c"], 8, Some("u"));
    assert_eq!(reported(&r, 5), [("c".into(), Some("u".into()), 1)]);
    r.close(&c, CloseReason::Client);
    // A grace of 0: the 0s go at once.
    assert_eq!(
        reported(&r, 0),
        [("c".into(), None, 0), ("c".into(), Some("u".into()), 0)]
    );
    assert_eq!(r.presence_gauges(), (0, 0));
}

#[test]
fn unconfirmed_subscriptions_and_last_readers_are_reported() {
    let r = reg();
    let (a, unconfirmed) = open(&r, &["c1", "c2"], 8);
    assert_eq!(names(&unconfirmed), ["c1", "c2"]);
    let (b, unconfirmed) = open(&r, &["c1"], 8);
    assert_eq!(
        names(&unconfirmed),
        ["c1"],
        "its first reader is still subscribing it"
    );
    r.confirm_subscribed("c1");
    assert!(r.is_subscribed("c1") && !r.is_subscribed("c2"));
    let (c, unconfirmed) = open(&r, &["c1"], 8);
    assert!(unconfirmed.is_empty(), "later readers need not wait");
    assert_eq!(
        r.counts(),
        Counts {
            sse: 3,
            ws: 0,
            channels: 2
        }
    );
    assert_eq!(names(&r.close(&a, CloseReason::Client).unwrap()), ["c2"]);
    assert!(
        r.close(&a, CloseReason::Client).is_none(),
        "second close is a no-op"
    );
    assert!(r.close(&b, CloseReason::Client).unwrap().is_empty());
    assert_eq!(names(&r.close(&c, CloseReason::Client).unwrap()), ["c1"]);
    assert!(
        !r.is_subscribed("c1"),
        "an emptied channel starts unconfirmed again"
    );
    assert_eq!(r.counts(), Counts::default());
    assert_eq!(r.admitted(), 0);
    assert_eq!(r.reconcile(), Counts::default());
}

#[test]
fn a_slow_reader_falls_behind_without_costing_the_fast_one_anything() {
    let r = reg();
    let (fast, _) = open(&r, &["c"], 4);
    let (slow, _) = open(&r, &["c"], 4);
    let mut cx = Context::from_waker(Waker::noop());
    let mut got = 0;
    for i in 1..=10 {
        r.fanout(&msg("c", Some(i)));
        r.fanout(&msg("c", None));
        while let Poll::Ready(Some(Item::Message(_))) = fast.poll_item(&mut cx) {
            got += 1;
        }
    }
    assert_eq!(got, 20);
    assert_eq!(slow.close_reason(), None, "never closed for being slow");
    assert_eq!(slow.queued(), 4, "its queue stays at its capacity");
    assert!(
        r.metrics
            .render()
            .contains(r#"hub_messages_dropped_total{reason="lagged"} 8"#),
        "the ephemeral messages it fell behind on are counted"
    );
}

#[test]
fn per_user_admission_is_exact() {
    let r = reg();
    let alice: Arc<str> = Arc::from("alice");
    assert!(r.try_admit(10, Some(&alice), 2).is_ok());
    assert!(r.try_admit(10, Some(&alice), 2).is_ok());
    assert_eq!(
        r.try_admit(10, Some(&alice), 2),
        Err(RejectReason::UserLimit)
    );
    assert_eq!(r.user_streams("alice"), 2);
    assert_eq!(r.admitted(), 2);
    r.release(Some(&alice));
    assert_eq!(r.user_streams("alice"), 1);
    assert_eq!(r.try_admit(1, Some(&alice), 5), Err(RejectReason::Capacity));
    assert_eq!(
        r.user_streams("alice"),
        1,
        "a refusal for capacity takes nothing"
    );
}

#[test]
fn the_tick_finds_streams_without_writes() {
    let r = reg();
    let (s, _) = open(&r, &["c"], 4);
    r.clock.secs.store(100, Ordering::Relaxed);
    let due = r.tick(100, 30, 0, 90, |_| false);
    assert_eq!(due.len(), 1);
    assert!(Arc::ptr_eq(&due[0].0, &s) && due[0].1 == CloseReason::Stale);
    assert_eq!(r.stale(90).len(), 1);
}

#[test]
fn a_channel_at_its_reader_limit_takes_no_more_and_the_stream_reads_none_of_its_channels() {
    let r = Registry::new(Arc::new(Metrics::new()));
    let (_first, _) = open(&r, &["room:b"], 8);
    let a = ChannelName::new("room:a").unwrap();
    let b = ChannelName::new("room:b").unwrap();
    let s = Arc::new(Session::new(
        SessionInit {
            seq: r.next_seq(),
            transport: Transport::Sse,
            envelope: false,
            user: None,
            expires_at: None,
            capacity: 8,
            now: 0,
            refill: None,
            socket: None,
            multiplexed: false,
        },
        vec![a.clone(), b.clone()],
    ));
    r.register(&s);
    let limit = |c: &str| if c == "room:b" { 1 } else { 0 };
    assert_eq!(r.add_channels(&s, &[a, b.clone()], limit), Err(b));
    assert_eq!(
        r.reader_count("room:a"),
        0,
        "the channel added before was taken off"
    );
    assert_eq!(r.reader_count("room:b"), 1);
    assert!(!r.has_readers("room:a"));
    assert_eq!(r.counts().channels, 1);
}

#[test]
fn the_busiest_channels_come_first_and_are_bounded() {
    let r = reg();
    let mut held = Vec::new();
    for (chan, readers) in [
        ("public:a", 1),
        ("public:b", 3),
        ("public:c", 2),
        ("public:d", 2),
    ] {
        for _ in 0..readers {
            held.push(open(&r, &[chan], 8).0);
        }
    }
    assert_eq!(
        r.top_channels(3),
        vec![
            ("public:b".to_string(), 3),
            ("public:c".to_string(), 2),
            ("public:d".to_string(), 2),
        ],
        "most readers first, ties by name, at most n"
    );
    assert_eq!(r.top_channels(10).len(), 4);
    assert_eq!(r.top_channels(0), vec![]);
    assert_eq!(r.lagging(), 0);
}

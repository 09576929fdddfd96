//! `loadgen presence-storm`: N users (one SSE stream each, a distinct token `sub`) join one
//! channel, all reconnect at once, then all leave; an observer stream with `presence=true`
//! counts the `hub.join` / `hub.leave` events, and Redis's `INFO commandstats` gives the Redis
//! operations each phase cost (commands run inside the hub's functions included).
//!
//! Bounded: every phase has a deadline; the process holds at most N + 1 connections.

use crate::presence_users::Users;
use anyhow::Context as _;
use jsonwebtoken::{encode, EncodingKey, Header};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(clap::Args, Debug, Clone)]
pub struct PresenceArgs {
    /// Public addresses of the nodes; user i connects to node i mod the count, the observer to
    /// the first.
    #[arg(long, required = true)]
    pub target: Vec<SocketAddr>,
    /// The Redis the nodes share (for `INFO commandstats`); repeat for every master of a
    /// Redis Cluster (their counts are summed).
    #[arg(long, required = true)]
    pub redis: Vec<String>,
    /// A node's admin address (http://...): after the joins, `GET /v1/presence` must count
    /// every user (the figure is reported).
    #[arg(long)]
    pub admin: Option<String>,
    /// Processes holding the users (`loadgen presence-users`, each from its own source
    /// address): more than the 20,000 files one process may hold need several.
    #[arg(long, default_value_t = 1)]
    pub processes: u64,
    /// `HUB_JWT_SECRET` of the nodes (tokens are signed here).
    #[arg(long)]
    pub secret: String,
    #[arg(long, default_value_t = 10_000)]
    pub users: u64,
    #[arg(long, default_value = "public:presence-storm")]
    pub channel: String,
    /// How long users stay away in the reconnect phase (ms); below a heartbeat, none should
    /// make an event.
    #[arg(long, default_value_t = 500)]
    pub away_ms: u64,
    /// How long to watch for events after the reconnect phase (s): more than a heartbeat.
    #[arg(long, default_value_t = 8)]
    pub settle_secs: u64,
    /// Longest wait for a phase (s).
    #[arg(long, default_value_t = 120)]
    pub phase_secs: u64,
    /// Receive the nodes' webhooks here (their `HUB_WEBHOOK_URL` is http://<this>/): every
    /// event counted once by id, and when the last one of each phase arrived.
    #[arg(long)]
    pub webhook_listen: Option<SocketAddr>,
}

pub fn token(secret: &str, sub: &str) -> anyhow::Result<String> {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + 3600;
    Ok(encode(
        &Header::default(),
        &serde_json::json!({"sub": sub, "exp": exp}),
        &EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

/// Opens an SSE stream (from `source`, if given) and returns it once `hub.connected` arrived
/// (with what was read).
pub async fn open(
    target: SocketAddr,
    path: &str,
    source: Option<std::net::IpAddr>,
) -> anyhow::Result<(TcpStream, Vec<u8>)> {
    let mut s = match source {
        Some(ip) => {
            let sock = tokio::net::TcpSocket::new_v4()?;
            sock.bind(SocketAddr::new(ip, 0))?;
            sock.connect(target).await?
        }
        None => TcpStream::connect(target).await?,
    };
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(13).any(|w| w == b"hub.connected") {
        let n = s.read(&mut buf).await?;
        anyhow::ensure!(n > 0, "closed before hub.connected");
        got.extend_from_slice(&buf[..n]);
    }
    anyhow::ensure!(got.starts_with(b"HTTP/1.1 200"), "refused");
    Ok((s, got))
}

/// The commands presence runs (inside `hub_presence*` and around them). Opening a stream
/// also costs Redis a history read (`FCALL_RO hub_read`), counted apart.
const PRESENCE_COMMANDS: [&str; 14] = [
    "fcall",
    "hget",
    "hset",
    "hdel",
    "hincrby",
    "hgetall",
    "publish",
    "spublish",
    "sadd",
    "smembers",
    "zadd",
    "zrangebyscore",
    "zrem",
    "del",
];

/// Commands only the webhook stream uses.
const WEBHOOK_COMMANDS: &[&str] = &["xadd", "xlen", "xreadgroup", "xack", "xdel", "xautoclaim"];

/// `INFO commandstats` of every server, one after another.
async fn commandstats(conns: &mut [redis::aio::MultiplexedConnection]) -> anyhow::Result<String> {
    let mut all = String::new();
    for conn in conns.iter_mut() {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(conn)
            .await?;
        all.push_str(&info);
        all.push('\n');
    }
    Ok(all)
}

/// Calls of the webhook stream's commands so far.
async fn webhook_calls(conns: &mut [redis::aio::MultiplexedConnection]) -> anyhow::Result<u64> {
    let info = commandstats(conns).await?;
    Ok(info
        .lines()
        .filter_map(|l| l.strip_prefix("cmdstat_"))
        .filter(|r| WEBHOOK_COMMANDS.contains(&r.split(':').next().unwrap_or_default()))
        .filter_map(|r| {
            r.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum())
}

/// Waits until `have()` reaches `want` or nothing new came for `quiet`; returns how long after
/// `start` the last new webhook event arrived (None: none arrived).
async fn webhook_phase(
    got: &crate::webhook_rx::Shared,
    start: Instant,
    want: impl Fn(&crate::webhook_rx::Got) -> bool,
    quiet: Duration,
    limit: Duration,
) -> Option<f64> {
    loop {
        let (done, last) = match got.lock() {
            Ok(g) => (want(&g), g.last_new),
            Err(_) => return None,
        };
        let idle = last.map_or(start.elapsed(), |l| l.elapsed());
        if done || idle > quiet || start.elapsed() > limit {
            return last
                .filter(|l| *l >= start)
                .map(|l| l.duration_since(start).as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Redis commands so far: (all, those of presence), from every `cmdstat_*` `calls=`.
async fn redis_calls(
    conns: &mut [redis::aio::MultiplexedConnection],
) -> anyhow::Result<(u64, u64)> {
    let info = commandstats(conns).await?;
    let mut all = 0;
    let mut presence = 0;
    for l in info.lines() {
        let Some(rest) = l.strip_prefix("cmdstat_") else {
            continue;
        };
        let name = rest.split(':').next().unwrap_or_default();
        let calls: u64 = rest
            .split("calls=")
            .nth(1)
            .and_then(|c| c.split(',').next())
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        all += calls;
        if PRESENCE_COMMANDS.contains(&name) {
            presence += calls;
        }
    }
    Ok((all, presence))
}

/// Waits until `counter` reaches `target`, or stops moving for `quiet` (events an observer
/// lost: its queue is bounded); returns how long until the last change.
async fn wait_quiet(
    counter: &AtomicU64,
    target: u64,
    quiet: Duration,
    limit: Duration,
) -> Duration {
    let start = Instant::now();
    let (mut last, mut changed) = (counter.load(Ordering::Relaxed), Instant::now());
    while last < target && changed.elapsed() < quiet && start.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = counter.load(Ordering::Relaxed);
        if now != last {
            (last, changed) = (now, Instant::now());
        }
    }
    changed.duration_since(start)
}

async fn wait(what: &str, limit: Duration, cond: impl Fn() -> bool) -> anyhow::Result<Duration> {
    let start = Instant::now();
    while !cond() {
        anyhow::ensure!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(start.elapsed())
}

pub async fn main(args: PresenceArgs) -> anyhow::Result<()> {
    let hooks = match args.webhook_listen {
        Some(a) => Some(crate::webhook_rx::start(a).await?),
        None => None,
    };
    let mut redis = Vec::new();
    for url in &args.redis {
        redis.push(
            redis::Client::open(url.as_str())?
                .get_multiplexed_async_connection()
                .await
                .with_context(|| format!("connect to --redis {url}"))?,
        );
    }
    // The users' tokens are made where they are held (here, or in each child).
    let tokens: Arc<Vec<String>> = Arc::new(if args.processes <= 1 {
        (0..args.users)
            .map(|i| token(&args.secret, &format!("u{i}")))
            .collect::<Result<_, _>>()?
    } else {
        Vec::new()
    });
    let joins = Arc::new(AtomicU64::new(0));
    let leaves = Arc::new(AtomicU64::new(0));
    let path = format!(
        "/v1/sse?channel={}&presence=true&token={}",
        args.channel,
        token(&args.secret, "observer")?
    );
    let (mut observer, first) = open(args.target[0], &path, None).await?;
    let (j, l) = (joins.clone(), leaves.clone());
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        let mut carry = first;
        // The list the stream starts with (`hub.presence`) may already hold the observer.
        let mut list_next = false;
        loop {
            let text = String::from_utf8_lossy(&carry).to_string();
            let cut = text.rfind('\n').map_or(0, |i| i + 1);
            for line in text[..cut].lines() {
                if list_next && line.starts_with("data:") {
                    list_next = false;
                    if line.contains("\"observer\"") {
                        j.fetch_add(1, Ordering::Relaxed);
                    }
                }
                match line {
                    "event: hub.join" => j.fetch_add(1, Ordering::Relaxed),
                    "event: hub.leave" => l.fetch_add(1, Ordering::Relaxed),
                    "event: hub.presence" => {
                        list_next = true;
                        0
                    }
                    _ => 0,
                };
            }
            carry = text.as_bytes()[cut..].to_vec();
            match observer.read(&mut buf).await {
                Ok(n) if n > 0 => carry.extend_from_slice(&buf[..n]),
                _ => return,
            }
        }
    });
    let limit = Duration::from_secs(args.phase_secs);
    wait("the observer's own join", limit, || {
        joins.load(Ordering::Relaxed) >= 1
    })
    .await?;
    let n = args.users;

    // Phase 1: every user joins.
    let calls0 = redis_calls(&mut redis).await?;
    let start = Instant::now();
    let mut users = Users::open(&args, &tokens).await?;
    let join_time = wait_quiet(&joins, n + 1, Duration::from_secs(3), limit).await;
    let joins_seen = joins.load(Ordering::Relaxed) - 1;
    let open_time = start.elapsed();
    // What the admin port counts (every node's users, the observer included).
    let admin_users = match &args.admin {
        Some(admin) => {
            let url = format!("{admin}/v1/presence?channel={}", args.channel);
            let v: serde_json::Value = reqwest::get(url).await?.json().await?;
            v["users"].as_object().map(|u| u.len() as u64)
        }
        None => None,
    };
    // Every user's member_added (and the observer's, and the occupancy).
    let hook_join = match &hooks {
        Some(h) => {
            webhook_phase(
                h,
                start,
                |g| g.count("member_added") > n,
                Duration::from_secs(5),
                limit,
            )
            .await
        }
        None => None,
    };
    let calls1 = redis_calls(&mut redis).await?;
    let hooks1 = hooks
        .as_ref()
        .and_then(|h| h.lock().ok().map(|g| g.by_type.values().sum::<u64>()));

    // Phase 2: every user drops and reconnects after `away_ms`: no event expected.
    let (j0, l0) = (
        joins.load(Ordering::Relaxed),
        leaves.load(Ordering::Relaxed),
    );
    users.drop_all().await?;
    tokio::time::sleep(Duration::from_millis(args.away_ms)).await;
    users.reopen(&args, &tokens).await?;
    // A benchmark's observation window, not a test's wait: events would show within it.
    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
    let calls2 = redis_calls(&mut redis).await?;
    let storm_events = joins.load(Ordering::Relaxed) - j0 + leaves.load(Ordering::Relaxed) - l0;
    let hooks2 = hooks
        .as_ref()
        .and_then(|h| h.lock().ok().map(|g| g.by_type.values().sum::<u64>()));
    let stream_calls0 = webhook_calls(&mut redis).await?;
    let leave_start = Instant::now();

    // Phase 3: every user leaves.
    users.leave().await?;
    let l1 = leaves.load(Ordering::Relaxed);
    // Leaves come a heartbeat after the close (the grace): quiet for longer than that.
    let settle = Duration::from_secs(args.settle_secs);
    let leave_time = wait_quiet(&leaves, l1 + n, settle, limit).await;
    let leaves_seen = leaves.load(Ordering::Relaxed) - l1;
    let hook_leave = match &hooks {
        Some(h) => {
            webhook_phase(
                h,
                leave_start,
                |g| g.count("member_removed") >= n,
                settle,
                limit,
            )
            .await
        }
        None => None,
    };
    let calls3 = redis_calls(&mut redis).await?;
    let stream_calls = webhook_calls(&mut redis).await? - stream_calls0;

    let per = |a: (u64, u64), b: (u64, u64)| {
        ((b.0 - a.0) as f64 / n as f64, (b.1 - a.1) as f64 / n as f64)
    };
    let (join_all, join_presence) = per(calls0, calls1);
    let (re_all, re_presence) = per(calls1, calls2);
    let (leave_all, leave_presence) = per(calls2, calls3);
    let report = serde_json::json!({
        "users": n,
        "nodes": args.target.len(),
        "join_all_secs": join_time.as_secs_f64(),
        "joins_seen": joins_seen,
        "leaves_seen": leaves_seen,
        "open_all_secs": open_time.as_secs_f64(),
        "admin_users": admin_users,
        "redis_calls_per_join": join_all,
        "presence_calls_per_join": join_presence,
        "reconnect_storm_events": storm_events,
        "redis_calls_per_reconnect": re_all,
        "presence_calls_per_reconnect": re_presence,
        "leave_all_secs": leave_time.as_secs_f64(),
        "redis_calls_per_leave": leave_all,
        "presence_calls_per_leave": leave_presence,
    });
    let mut report = report;
    if let Some(h) = &hooks {
        let g = h.lock().map_err(|_| anyhow::anyhow!("receiver lock"))?;
        let removed = g.count("member_removed");
        report["webhooks"] = serde_json::json!({
            "occupied": g.count("channel_occupied"),
            "member_added": g.count("member_added"),
            "member_removed": removed,
            "vacated": g.count("channel_vacated"),
            "duplicates": g.duplicates,
            "requests": g.requests,
            "max_batch": g.max_batch,
            "join_last_event_secs": hook_join,
            "leave_last_event_secs": hook_leave,
            "reconnect_storm_events": hooks2.unwrap_or(0) - hooks1.unwrap_or(0),
            "stream_commands_per_leave_event": stream_calls as f64 / removed.max(1) as f64,
        });
    }
    println!("{report}");
    Ok(())
}

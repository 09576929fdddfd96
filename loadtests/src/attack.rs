//! `loadgen attack`: what an abusive client does to a node, from one source address, for a
//! bounded time, counting what the node answered.
//!
//! - `slowloris`: N connections, each sending its request head one byte every `interval_ms`
//!   (never finishing it); a connection the node closes is opened again.
//! - `flood`: stream requests (a whole, valid head) as fast as up to N in flight allow; each one
//!   the node accepts is held open until the end, as an attacker would hold its slots.
//!
//! Bounded: at most N connections at once, stops after `duration_secs`; loopback only.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

#[derive(clap::Args, Debug, Clone)]
pub struct AttackArgs {
    /// `slowloris` or `flood`.
    #[arg(long)]
    pub mode: String,
    #[arg(long)]
    pub target: SocketAddr,
    /// The attacker's source address (one address: what per-address limits see).
    #[arg(long, default_value = "127.0.0.9")]
    pub source: IpAddr,
    /// Connections at once.
    #[arg(long, default_value_t = 5000)]
    pub connections: usize,
    /// slowloris: one byte per connection this often.
    #[arg(long, default_value_t = 5000)]
    pub interval_ms: u64,
    #[arg(long, default_value_t = 30)]
    pub duration_secs: u64,
    /// flood: the stream requested.
    #[arg(long, default_value = "/v1/sse?channel=public:flood")]
    pub path: String,
}

#[derive(Default)]
struct Counts {
    opened: u64,
    connect_failed: u64,
    closed_by_server: u64,
    statuses: HashMap<u16, u64>,
    held: u64,
}

async fn connect(args: &AttackArgs) -> std::io::Result<TcpStream> {
    let sock = match args.source {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    sock.bind(SocketAddr::new(args.source, 0))?;
    sock.connect(args.target).await
}

/// One slowloris connection until `end`: a byte at a time; opened again when closed.
async fn slowloris(args: Arc<AttackArgs>, end: Instant, counts: Arc<std::sync::Mutex<Counts>>) {
    let head = b"GET /v1/sse?channel=public:slow HTTP/1.1\r\nHost: hub\r\nX-Padding: ";
    while Instant::now() < end {
        let Ok(mut io) = connect(&args).await else {
            if let Ok(mut c) = counts.lock() {
                c.connect_failed += 1;
            }
            tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
            continue;
        };
        if let Ok(mut c) = counts.lock() {
            c.opened += 1;
        }
        let mut i = 0;
        let mut buf = [0u8; 512];
        loop {
            if Instant::now() >= end {
                return;
            }
            let byte = head.get(i).copied().unwrap_or(b'a');
            i += 1;
            if io.write_all(&[byte]).await.is_err() {
                break;
            }
            // The attacker's pace; an answer or a close ends the connection.
            match tokio::time::timeout(Duration::from_millis(args.interval_ms), io.read(&mut buf))
                .await
            {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(_)) => {}
                Err(_) => {}
            }
        }
        if let Ok(mut c) = counts.lock() {
            c.closed_by_server += 1;
        }
    }
}

/// One flood worker until `end`: requests a stream; holds it if accepted, else asks again.
async fn flood(args: Arc<AttackArgs>, end: Instant, counts: Arc<std::sync::Mutex<Counts>>) {
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: hub\r\nAccept: */*\r\n\r\n",
        args.path
    );
    while Instant::now() < end {
        let Ok(mut io) = connect(&args).await else {
            if let Ok(mut c) = counts.lock() {
                c.connect_failed += 1;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        if io.write_all(req.as_bytes()).await.is_err() {
            continue;
        }
        let mut buf = [0u8; 1024];
        let n = match tokio::time::timeout(Duration::from_secs(5), io.read(&mut buf)).await {
            Ok(Ok(n)) if n >= 12 => n,
            _ => continue,
        };
        let status: u16 = std::str::from_utf8(&buf[9..12])
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let _ = n;
        if let Ok(mut c) = counts.lock() {
            c.opened += 1;
            *c.statuses.entry(status).or_default() += 1;
            if status == 200 {
                c.held += 1;
            }
        }
        if status == 200 {
            // Held until the end, read and discarded (as a client that keeps its slot).
            let left = end.saturating_duration_since(Instant::now());
            let _ = tokio::time::timeout(left, async {
                while matches!(io.read(&mut buf).await, Ok(n) if n > 0) {}
            })
            .await;
            return;
        }
    }
}

pub async fn main(args: AttackArgs) -> anyhow::Result<()> {
    let args = Arc::new(args);
    let counts = Arc::new(std::sync::Mutex::new(Counts::default()));
    let start = Instant::now();
    let end = start + Duration::from_secs(args.duration_secs);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.connections {
        let (a, c) = (args.clone(), counts.clone());
        match args.mode.as_str() {
            "slowloris" => {
                // Spread the first bytes over one interval.
                let delay = Duration::from_millis(
                    args.interval_ms * i as u64 / args.connections.max(1) as u64,
                );
                tasks.spawn(async move {
                    tokio::time::sleep(delay).await;
                    slowloris(a, end, c).await
                });
            }
            "flood" => {
                tasks.spawn(flood(a, end, c));
            }
            other => anyhow::bail!("--mode {other}: slowloris or flood"),
        }
    }
    while tasks.join_next().await.is_some() {}
    let c = counts.lock().map_err(|_| anyhow::anyhow!("counts lock"))?;
    let report = serde_json::json!({
        "mode": args.mode,
        "connections": args.connections,
        "secs": start.elapsed().as_secs_f64(),
        "opened": c.opened,
        "connect_failed": c.connect_failed,
        "closed_by_server": c.closed_by_server,
        "statuses": c.statuses.iter().map(|(k, v)| (k.to_string(), *v)).collect::<HashMap<_, _>>(),
        "held": c.held,
    });
    println!("{report}");
    Ok(())
}

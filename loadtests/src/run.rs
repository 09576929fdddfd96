//! `loadgen run`: several `hold` processes (one source address each), one publisher, one
//! merged report with the server's CPU time and memory read from /proc.

use crate::hold::StreamOpts;
use crate::publish::{self, PublishReport};
use crate::report::{HoldReport, Latency};
use anyhow::Context as _;
use serde::Serialize;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Server address; repeat for several nodes (holder process i uses target i mod n).
    #[arg(long = "target", required = true)]
    pub targets: Vec<SocketAddr>,
    /// A reconnecting stream whose node is gone moves to the other targets (`hold --fallback`).
    #[arg(long)]
    pub failover: bool,
    #[command(flatten)]
    pub stream: StreamOpts,
    /// Create this file once every stream is open (scenario scripts wait on it).
    #[arg(long)]
    pub ready_file: Option<std::path::PathBuf>,
    /// Streams in all.
    #[arg(long)]
    pub streams: u64,
    /// Holder processes; process i binds 127.0.0.(first_source+i).
    #[arg(long, default_value_t = 1)]
    pub processes: u64,
    /// Last byte of the first holder's source address (two runs side by side use different
    /// ones, each keeping its own ephemeral ports).
    #[arg(long, default_value_t = 2)]
    pub first_source: u8,
    /// Seconds between every stream being open (the ready file) and the first publish: what
    /// the opening set off (presence reports, subscriptions) settles first.
    #[arg(long, default_value_t = 0)]
    pub settle_secs: u64,
    /// Streams (in all, spread over the processes) that stop reading once open.
    #[arg(long, default_value_t = 0)]
    pub stall: u64,
    /// Messages each stream should receive (defaults to the publish count).
    #[arg(long)]
    pub expect: Option<u64>,
    /// Longest run, in seconds.
    #[arg(long, default_value_t = 120)]
    pub duration: u64,
    /// PID of the server, for CPU time and memory; repeat for several nodes (summed).
    #[arg(long = "server-pid")]
    pub server_pids: Vec<u32>,
    /// Write the JSON report here too.
    #[arg(long)]
    pub report: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub publish: publish::PublishArgs,
}

/// CPU seconds (user + system) and resident memory of a process.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct ProcSample {
    pub cpu_secs: f64,
    pub rss_kb: u64,
}

fn sample_one(pid: u32) -> Option<(u32, ProcSample)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ppid: u32 = f.get(1)?.parse().ok()?;
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    // Linux reports in USER_HZ, 100 on every mainstream configuration.
    Some((
        ppid,
        ProcSample {
            cpu_secs: ticks / 100.0,
            rss_kb,
        },
    ))
}

/// CPU time and RSS of several servers, summed; `None` when there are none or one is gone.
pub fn sample_all(pids: &[u32]) -> Option<ProcSample> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().try_fold(ProcSample::default(), |acc, &pid| {
        sample(pid).map(|s| ProcSample {
            cpu_secs: acc.cpu_secs + s.cpu_secs,
            rss_kb: acc.rss_kb + s.rss_kb,
        })
    })
}

/// CPU time and RSS of a server process plus its direct children (nginx's workers, say).
pub fn sample(pid: u32) -> Option<ProcSample> {
    let (_, mut total) = sample_one(pid)?;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some((_, s)) = sample_one(child).filter(|(ppid, _)| *ppid == pid) {
            total.cpu_secs += s.cpu_secs;
            total.rss_kb += s.rss_kb;
        }
    }
    Some(total)
}

#[derive(Debug, Serialize)]
pub struct RunReport {
    pub streams: u64,
    pub opened: u64,
    pub failed: u64,
    pub connect_secs: f64,
    pub expected_deliveries: u64,
    pub deliveries: u64,
    /// Deliveries per second, from the first publish to the last holder's end.
    pub deliveries_per_sec: f64,
    pub missing: i64,
    pub duplicates: u64,
    /// Messages some stream never saw although later ones of its channel arrived.
    pub gaps: u64,
    /// Streams that came back after a drop, and seconds from the first drop to the last return.
    pub reconnects: u64,
    pub still_down: u64,
    pub resume_secs: Option<f64>,
    /// Per stream, drop to return; and reconnect attempts that failed.
    pub resume: Latency,
    /// Per returning stream (`--leave-after`), its return to having every message.
    pub catchup: Latency,
    pub reconnect_retries: u64,
    /// Churn: streams closed on purpose and opened again, and attempts refused (any reason).
    pub churn_cycles: u64,
    /// Bytes on the wire (after the response heads) per delivery: heartbeats, framing and
    /// compression included.
    pub wire_bytes_per_delivery: Option<f64>,
    /// Deliveries per read of a client socket.
    pub deliveries_per_read: Option<f64>,
    pub refused: u64,
    pub latency: Latency,
    pub publish: PublishReport,
    /// The server before any stream opened.
    pub server_idle: Option<ProcSample>,
    pub server_before: Option<ProcSample>,
    /// Sleepers (`--wake-ms`): the server just before they read on, while they lag.
    pub server_lagging: Option<ProcSample>,
    pub server_after: Option<ProcSample>,
    /// Sleepers: server memory per lagging stream, beyond what it held with every stream idle.
    pub server_rss_kb_per_lagging_stream: Option<f64>,
    pub server_rss_kb_per_stream: Option<f64>,
    pub server_cpu_secs_per_million_deliveries: Option<f64>,
    pub holds: HoldReport,
}

pub async fn main(args: RunArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("own path")?;
    let channels = args.publish.channel_count.max(1);
    let expect = args.expect.unwrap_or(args.publish.count / channels);
    let idle = sample_all(&args.server_pids);
    // Holders start now; sleepers wake `--wake-ms` after this.
    let epoch = Instant::now();
    let mut children = Vec::new();
    let per = args.streams.div_ceil(args.processes.max(1));
    let mut left = args.streams;
    let stall_per = args.stall.div_ceil(args.processes.max(1));
    let mut stall_left = args.stall;
    let mut first_index = 0;
    for i in 0..args.processes.max(1) {
        let n = per.min(left);
        left -= n;
        let stall = stall_per.min(stall_left).min(n);
        stall_left -= stall;
        let ip = IpAddr::V4(Ipv4Addr::new(
            127,
            0,
            0,
            args.first_source.wrapping_add(i as u8),
        ));
        let mut cmd = tokio::process::Command::new(&exe);
        let target = args.targets[i as usize % args.targets.len()];
        cmd.arg("hold").arg("--target").arg(target.to_string());
        if args.failover {
            for other in args.targets.iter().filter(|t| **t != target) {
                cmd.arg("--fallback").arg(other.to_string());
            }
        }
        cmd.arg("--first-index")
            .arg(first_index.to_string())
            .arg("--channels")
            .arg(channels.to_string())
            .args(args.stream.to_args())
            .arg("--streams")
            .arg(n.to_string())
            .arg("--source")
            .arg(ip.to_string())
            .arg("--expect")
            .arg(expect.to_string())
            .arg("--duration")
            .arg(args.duration.to_string())
            .arg("--stall")
            .arg(stall.to_string())
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        first_index += n;
        let mut child = cmd.spawn().context("spawn hold")?;
        let stdout = child.stdout.take().context("hold stdout")?;
        children.push((child, BufReader::new(stdout).lines()));
    }
    let started = Instant::now();
    let (mut opened, mut failed) = (0, 0);
    for (_, lines) in children.iter_mut() {
        let line = tokio::time::timeout(Duration::from_secs(args.duration), lines.next_line())
            .await
            .context("a holder did not get ready in time")??
            .context("a holder exited before READY")?;
        let mut it = line
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse::<u64>().unwrap_or(0));
        opened += it.next().unwrap_or(0);
        failed += it.next().unwrap_or(0);
    }
    eprintln!(
        "loadgen: {opened} streams open ({failed} failed) in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    if let Some(path) = &args.ready_file {
        std::fs::write(path, format!("{opened} {failed}\n"))
            .with_context(|| format!("write {}", path.display()))?;
    }
    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
    let before = sample_all(&args.server_pids);
    let publish_started = Instant::now();
    // Sleepers: sample the server just before they read on (while they lag the most); also
    // without sleepers (a baseline sampled at the same moment).
    let lagging = (args.stream.wake_ms > 0).then(|| {
        let pids = args.server_pids.clone();
        let at = epoch + Duration::from_millis(args.stream.wake_ms.saturating_sub(300));
        tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            sample_all(&pids)
        })
    });
    let publish = publish::main(args.publish.clone()).await?;
    let mut holds = HoldReport::default();
    for (mut child, mut lines) in children {
        let mut last = None;
        while let Ok(Some(l)) = lines.next_line().await {
            last = Some(l);
        }
        let _ = child.wait().await;
        let r: HoldReport =
            serde_json::from_str(last.as_deref().unwrap_or("")).context("a holder's report")?;
        holds.merge(&r);
    }
    let after = sample_all(&args.server_pids);
    let server_lagging = match lagging {
        Some(t) => t.await.ok().flatten(),
        None => None,
    };
    let busy_secs = publish_started.elapsed().as_secs_f64();
    // Stalled streams are not expected to receive anything.
    let expected = opened.saturating_sub(holds.streams_stalled) * expect;
    let cpu = match (before, after) {
        (Some(b), Some(a)) if holds.deliveries > 0 => {
            Some((a.cpu_secs - b.cpu_secs) / holds.deliveries as f64 * 1e6)
        }
        _ => None,
    };
    let per_stream = match (idle, before) {
        (Some(i), Some(b)) if opened > 0 => {
            Some((b.rss_kb as f64 - i.rss_kb as f64) / opened as f64)
        }
        _ => None,
    };
    let report = RunReport {
        streams: args.streams,
        opened,
        failed,
        connect_secs: holds.connect_secs,
        expected_deliveries: expected,
        deliveries: holds.deliveries,
        deliveries_per_sec: holds.deliveries as f64 / busy_secs.max(1e-9),
        missing: expected as i64 - holds.deliveries as i64,
        duplicates: holds.duplicates,
        gaps: holds.gaps,
        reconnects: holds.reconnects,
        still_down: holds.still_down,
        resume_secs: match (holds.first_drop_us, holds.last_reopen_us) {
            (Some(d), Some(r)) if r >= d => Some((r - d) as f64 / 1e6),
            _ => None,
        },
        latency: Latency::of(&holds.histogram()),
        resume: Latency::of(&crate::report::from_pairs(&holds.resume_us)),
        catchup: Latency::of(&crate::report::from_pairs(&holds.catchup_us)),
        reconnect_retries: holds.reconnect_retries,
        churn_cycles: holds.churn_cycles,
        wire_bytes_per_delivery: (holds.deliveries > 0)
            .then(|| holds.wire_bytes as f64 / holds.deliveries as f64),
        deliveries_per_read: (holds.reads > 0)
            .then(|| holds.deliveries as f64 / holds.reads as f64),
        refused: holds.failures.values().sum(),
        publish,
        server_idle: idle,
        server_before: before,
        server_rss_kb_per_lagging_stream: match (before, server_lagging) {
            (Some(b), Some(l)) if args.stall > 0 => {
                Some((l.rss_kb as f64 - b.rss_kb as f64) / args.stall as f64)
            }
            _ => None,
        },
        server_lagging,
        server_after: after,
        server_rss_kb_per_stream: per_stream,
        server_cpu_secs_per_million_deliveries: cpu,
        holds: HoldReport {
            latency_us: Vec::new(),
            resume_us: Vec::new(),
            catchup_us: Vec::new(),
            ..holds
        },
    };
    let text = serde_json::to_string_pretty(&report)?;
    if let Some(path) = &args.report {
        std::fs::write(path, &text).with_context(|| format!("write {}", path.display()))?;
    }
    println!("{text}");
    Ok(())
}

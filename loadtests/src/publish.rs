//! `loadgen publish`: sends `<seq> <unix micros>` messages over HTTP (`POST /v1/publish`) or
//! Redis (`FCALL hub_publish` / `PUBLISH`), at a fixed rate or as fast as replies come.

use crate::hold::now_us;
use protocol::{publish, Envelope};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug, Clone)]
pub struct PublishArgs {
    /// Admin URL of a hub (http://127.0.0.1:9090), or any URL accepting the same POST body.
    #[arg(long, conflicts_with = "redis")]
    pub http: Option<String>,
    /// Redis URL: publish with FCALL hub_publish (durable) or PUBLISH (ephemeral).
    #[arg(long)]
    pub redis: Option<String>,
    /// POST the bare data to this URL, `{channel}` replaced (a peer such as Nchan:
    /// http://127.0.0.1:8090/pub?id={channel}).
    #[arg(long = "raw-post")]
    pub raw_post: Option<String>,
    /// A Pusher server's HTTP API (Sockudo: http://127.0.0.1:6001): each message is
    /// `POST /apps/<--pusher-app>/events` signed with `--pusher-key` / `--pusher-secret`
    /// (event name `msg`, the data as a string).
    #[arg(long)]
    pub pusher: Option<String>,
    #[arg(long, default_value = "bench")]
    pub pusher_app: String,
    #[arg(long, default_value = "bench-key")]
    pub pusher_key: String,
    #[arg(long, default_value = "bench-secret")]
    pub pusher_secret: String,
    /// Channel(s) to publish to, taken in turn. `{n}` in a channel runs over
    /// 0..`--channel-count` (message seq goes to channel seq mod count).
    #[arg(long = "channel", required = true)]
    pub channels: Vec<String>,
    #[arg(long, default_value_t = 1)]
    pub channel_count: u64,
    /// Messages to send.
    #[arg(long, default_value_t = 10)]
    pub count: u64,
    /// Messages per second; 0 sends the next one as soon as the previous one is answered.
    #[arg(long, default_value_t = 1.0)]
    pub rate: f64,
    /// Ephemeral instead of durable.
    #[arg(long)]
    pub ephemeral: bool,
    /// Padding bytes added to each message's data.
    #[arg(long, default_value_t = 0)]
    pub pad: usize,
    /// The padding is JSON records (ids, names, prices varying per record and message), as an
    /// application's payload compresses, instead of one repeated byte.
    #[arg(long)]
    pub pad_json: bool,
    /// A publish that fails is tried again (the same message, a new Redis connection) every
    /// 200 ms for up to this many seconds before it counts as an error (0: never retried), so
    /// a soak through Redis restarts publishes every sequence number.
    #[arg(long, default_value_t = 0)]
    pub retry_secs: u64,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct PublishReport {
    pub sent: u64,
    pub errors: u64,
    /// Attempts that failed and were tried again (`--retry-secs`).
    #[serde(default)]
    pub retries: u64,
    pub secs: f64,
    /// Time from sending a publish to its answer (the first attempt of each message that was
    /// accepted), microseconds: median, 99th percentile, maximum.
    #[serde(default)]
    pub rtt_p50_us: u64,
    #[serde(default)]
    pub rtt_p99_us: u64,
    #[serde(default)]
    pub rtt_max_us: u64,
}

fn data(seq: u64, pad: usize, json: bool) -> String {
    let mut s = format!("{seq} {}", now_us());
    if pad > 0 && json {
        s.push_str(" [");
        let mut k = seq.wrapping_mul(7919);
        while s.len() < pad {
            k = k
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let r = k >> 33;
            s.push_str(&format!(
                "{{\"id\":{},\"sku\":\"SKU-{:05}\",\"name\":\"Widget {}\",\"price\":{}.{:02},\"qty\":{},\"tags\":[\"{}\",\"sale\"]}},",
                r % 1_000_000,
                r % 100_000,
                r % 977,
                r % 1000,
                r % 100,
                r % 17,
                ["blue", "red", "green", "black"][(r % 4) as usize]
            ));
        }
        s.push(']');
    } else if pad > 0 {
        s.push(' ');
        s.extend(std::iter::repeat_n('x', pad));
    }
    s
}

pub async fn main(args: PublishArgs) -> anyhow::Result<PublishReport> {
    let mut report = PublishReport::default();
    let started = Instant::now();
    let mut tick = (args.rate > 0.0).then(|| {
        let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate));
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        t
    });
    let http = reqwest::Client::new();
    let mut redis_conn = match &args.redis {
        Some(url) => Some(redis_connect(url).await?),
        None => None,
    };
    let mut rtts = crate::report::histogram();
    for seq in 0..args.count {
        if let Some(t) = tick.as_mut() {
            t.tick().await;
        }
        let channel = &args.channels[(seq as usize) % args.channels.len()]
            .replace("{n}", &(seq % args.channel_count.max(1)).to_string());
        let d = data(seq, args.pad, args.pad_json);
        let give_up = Instant::now() + Duration::from_secs(args.retry_secs);
        let mut first = true;
        loop {
            let asked = Instant::now();
            if publish_one(&args, &http, &mut redis_conn, channel, &d).await? {
                if first {
                    let us = asked.elapsed().as_micros() as u64;
                    let _ = rtts.record(us.clamp(1, crate::report::MAX_LATENCY_US));
                }
                report.sent += 1;
                break;
            }
            first = false;
            if Instant::now() >= give_up {
                report.errors += 1;
                break;
            }
            report.retries += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
            if let Some(url) = &args.redis {
                // The old connection may be dead (a Redis restart): make a new one.
                if let Ok(c) = redis_connect(url).await {
                    redis_conn = Some(c);
                }
            }
        }
    }
    report.secs = started.elapsed().as_secs_f64();
    (report.rtt_p50_us, report.rtt_p99_us, report.rtt_max_us) = (
        rtts.value_at_quantile(0.5),
        rtts.value_at_quantile(0.99),
        rtts.max(),
    );
    Ok(report)
}

async fn redis_connect(url: &str) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    Ok(redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?)
}

/// One attempt at publishing `d` to `channel`: whether it was accepted.
async fn publish_one(
    args: &PublishArgs,
    http: &reqwest::Client,
    redis_conn: &mut Option<redis::aio::MultiplexedConnection>,
    channel: &str,
    d: &str,
) -> anyhow::Result<bool> {
    Ok(if let Some(conn) = redis_conn.as_mut() {
        let env = Envelope {
            event: None,
            data: d.to_string().into(),
        };
        if args.ephemeral {
            publish::publish_ephemeral(conn, channel, &env, false)
                .await
                .is_ok()
        } else {
            publish::publish_durable(conn, channel, &env).await.is_ok()
        }
    } else if let Some(base) = &args.pusher {
        let body = serde_json::json!({"name": "msg", "channels": [channel], "data": d}).to_string();
        http.post(pusher_url(
            args,
            base,
            &body,
            crate::hold::now_us() / 1_000_000,
        ))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .map(|r| r.status().is_success())
        .unwrap_or(false)
    } else if let Some(url) = &args.raw_post {
        http.post(url.replace("{channel}", channel))
            .body(d.to_string())
            .send()
            .await
            .map(|r| r.status().is_success())
            .unwrap_or(false)
    } else if let Some(url) = &args.http {
        let body = serde_json::json!({"channel": channel, "data": d, "durable": !args.ephemeral});
        http.post(format!("{}/v1/publish", url.trim_end_matches('/')))
            .json(&body)
            .send()
            .await
            .map(|r| r.status().is_success())
            .unwrap_or(false)
    } else {
        anyhow::bail!("give --http, --redis, --raw-post or --pusher");
    })
}

/// The signed URL of a Pusher `POST /apps/<id>/events` with `body`: the query (`auth_key`,
/// `auth_timestamp`, `auth_version`, `body_md5`, sorted by name) and `auth_signature`, the hex
/// HMAC-SHA256 of `POST\n<path>\n<query>` with the app's secret.
fn pusher_url(args: &PublishArgs, base: &str, body: &str, unix_secs: u64) -> String {
    use hmac::Mac;
    let path = format!("/apps/{}/events", args.pusher_app);
    let query = format!(
        "auth_key={}&auth_timestamp={unix_secs}&auth_version=1.0&body_md5={:x}",
        args.pusher_key,
        md5::compute(body.as_bytes())
    );
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(args.pusher_secret.as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(format!("POST\n{path}\n{query}").as_bytes());
    let signature = hex::encode(mac.finalize().into_bytes());
    format!(
        "{}{path}?{query}&auth_signature={signature}",
        base.trim_end_matches('/')
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        publish: PublishArgs,
    }

    #[test]
    fn a_pusher_publish_is_signed_as_the_protocol_says() {
        // The example of Pusher's HTTP API reference (authenticating requests).
        let args = Cli::parse_from([
            "x",
            "--channel",
            "c",
            "--pusher-app",
            "3",
            "--pusher-key",
            "278d425bdf160c739803",
            "--pusher-secret",
            "7ad3773142a6692b25b8",
        ])
        .publish;
        let body = r#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
        let url = pusher_url(&args, "http://h/", body, 1_353_088_179);
        assert_eq!(
            url,
            "http://h/apps/3/events?auth_key=278d425bdf160c739803&auth_timestamp=1353088179\
             &auth_version=1.0&body_md5=ec365a775a4cd0599faeb73354201b6f\
             &auth_signature=da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c"
        );
    }
}

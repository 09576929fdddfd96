//! `loadgen auth-hook`: a backend's authorization hook answering locally, for the reconnect
//! storm with `HUB_AUTH_URL` set. Every POST gets `200 {"sub": "u<n>", "channels": ["*"]}` (a
//! user per call) over HTTP/1.1 keep-alive. Stops after `--duration` seconds and prints how many
//! calls it answered; listens on loopback only.

use anyhow::Context as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Largest request read (the hub's ask is a few hundred bytes).
const MAX_REQUEST: usize = 64 * 1024;

#[derive(clap::Args)]
pub struct HookArgs {
    /// Loopback address to listen on.
    #[arg(long)]
    listen: std::net::SocketAddr,
    /// Seconds to run before exiting.
    #[arg(long, default_value_t = 300)]
    duration: u64,
}

pub async fn main(a: HookArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.listen.ip().is_loopback(),
        "--listen must be a loopback address"
    );
    let listener = TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("bind {}", a.listen))?;
    let calls = Arc::new(AtomicU64::new(0));
    let serving = {
        let calls = calls.clone();
        async move {
            while let Ok((io, _)) = listener.accept().await {
                let calls = calls.clone();
                tokio::spawn(async move { serve(io, &calls).await });
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(a.duration), serving).await;
    println!("{{\"calls\": {}}}", calls.load(Ordering::Relaxed));
    Ok(())
}

async fn serve(mut io: TcpStream, calls: &AtomicU64) {
    let _ = io.set_nodelay(true);
    let mut buf = Vec::with_capacity(1024);
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        let head_len = match req.parse(&buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if buf.len() < MAX_REQUEST => {
                let mut chunk = [0u8; 4096];
                match io.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                continue;
            }
            _ => return,
        };
        let len: usize = req
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
            .unwrap_or(0);
        if len > MAX_REQUEST {
            return;
        }
        while buf.len() < head_len + len {
            let mut chunk = [0u8; 4096];
            match io.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..head_len + len);
        let n = calls.fetch_add(1, Ordering::Relaxed);
        let body = format!("{{\"sub\":\"u{n}\",\"channels\":[\"*\"]}}");
        let res = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        if io.write_all(res.as_bytes()).await.is_err() {
            return;
        }
    }
}

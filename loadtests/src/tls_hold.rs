//! `loadgen tls-hold`: holds idle SSE streams over HTTPS, either many per HTTP/2 connection or
//! one per HTTP/1.1 connection, to compare what a stream costs the server over each.
//!
//! Every stream must answer 200 and send its first event (`hub.connected`); what follows is
//! read and dropped (flow-control credit is given back at once). Prints `READY <opened>
//! <failed>` when every stream was tried, then holds them for `--duration` seconds.

use anyhow::Context as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(clap::Args, Debug, Clone)]
pub struct TlsHoldArgs {
    /// The hub's HTTPS address, e.g. 127.0.0.1:8443.
    #[arg(long)]
    pub target: SocketAddr,
    /// PEM CA that signed the hub's certificate.
    #[arg(long)]
    pub ca: PathBuf,
    /// Request path and query, e.g. /v1/sse?channel=public:idle.
    #[arg(long)]
    pub path: String,
    /// Streams in all.
    #[arg(long)]
    pub streams: u64,
    /// Streams per HTTP/2 connection; 0: HTTP/1.1, one connection per stream.
    #[arg(long, default_value_t = 100)]
    pub per_connection: u64,
    /// Longest hold, in seconds.
    #[arg(long, default_value_t = 60)]
    pub duration: u64,
    /// Written with `<opened> <failed>` once every stream was tried.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
}

fn tls_config(ca: &PathBuf, h2: bool) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(ca).context("read --ca")? {
        roots.add(c.context("a certificate in --ca")?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![if h2 {
        b"h2".to_vec()
    } else {
        b"http/1.1".to_vec()
    }];
    Ok(Arc::new(config))
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn connect(args: &TlsHoldArgs, config: &Arc<rustls::ClientConfig>) -> anyhow::Result<Tls> {
    let tcp = tokio::net::TcpStream::connect(args.target).await?;
    let name = rustls_pki_types::ServerName::from(args.target.ip());
    Ok(tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await?)
}

/// Reads and drops a stream's body until it ends.
async fn drain_h2(mut body: h2::RecvStream) {
    while let Some(Ok(chunk)) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.len());
    }
}

/// One HTTP/2 connection with `n` streams; returns how many opened.
async fn h2_connection(args: Arc<TlsHoldArgs>, config: Arc<rustls::ClientConfig>, n: u64) -> u64 {
    let Ok(io) = connect(&args, &config).await else {
        return 0;
    };
    let Ok((client, conn)) = h2::client::handshake(io).await else {
        return 0;
    };
    tokio::spawn(conn);
    let mut opened = 0;
    for _ in 0..n {
        let Ok(req) = http::Request::get(format!("https://{}{}", args.target, args.path)).body(())
        else {
            break;
        };
        let Ok(mut ready) = client.clone().ready().await else {
            break;
        };
        let Ok((res, _send)) = ready.send_request(req, true) else {
            break;
        };
        let Ok(res) = res.await else { continue };
        if res.status() != 200 {
            continue;
        }
        let mut body = res.into_body();
        // The first event (`hub.connected`) has arrived: the stream is open.
        match body.data().await {
            Some(Ok(chunk)) => {
                let _ = body.flow_control().release_capacity(chunk.len());
            }
            _ => continue,
        }
        opened += 1;
        tokio::spawn(drain_h2(body));
    }
    opened
}

/// One HTTP/1.1 stream on its own connection; true when it opened.
async fn h1_stream(args: Arc<TlsHoldArgs>, config: Arc<rustls::ClientConfig>) -> bool {
    let Ok(mut io) = connect(&args, &config).await else {
        return false;
    };
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\n\r\n",
        args.path, args.target
    );
    if io.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut got = Vec::new();
    let mut buf = vec![0u8; 4096];
    while !got.windows(13).any(|w| w == b"hub.connected") {
        match io.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    if !got.starts_with(b"HTTP/1.1 200") {
        return false;
    }
    tokio::spawn(async move { while matches!(io.read(&mut buf).await, Ok(n) if n > 0) {} });
    true
}

pub async fn main(args: TlsHoldArgs) -> anyhow::Result<()> {
    let h2 = args.per_connection > 0;
    let config = tls_config(&args.ca, h2)?;
    let args = Arc::new(args);
    let mut tasks = tokio::task::JoinSet::new();
    if h2 {
        let mut left = args.streams;
        while left > 0 {
            let n = left.min(args.per_connection);
            left -= n;
            tasks.spawn(h2_connection(args.clone(), config.clone(), n));
        }
    } else {
        // At most 200 handshakes at once.
        let gate = Arc::new(tokio::sync::Semaphore::new(200));
        for _ in 0..args.streams {
            let (args, config, gate) = (args.clone(), config.clone(), gate.clone());
            tasks.spawn(async move {
                let _permit = gate.acquire_owned().await;
                u64::from(h1_stream(args, config).await)
            });
        }
    }
    let mut opened = 0;
    while let Some(r) = tasks.join_next().await {
        opened += r.unwrap_or(0);
    }
    let failed = args.streams - opened;
    println!("READY {opened} {failed}");
    if let Some(path) = &args.ready_file {
        std::fs::write(path, format!("{opened} {failed}\n"))
            .with_context(|| format!("write {}", path.display()))?;
    }
    tokio::time::sleep(Duration::from_secs(args.duration)).await;
    Ok(())
}

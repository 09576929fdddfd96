//! Configuration: every `HUB_*` variable and its command-line flag, checked before anything binds.
//!
//! `Config::from_env_and_args` either returns a complete, consistent configuration or one line
//! naming the variable at fault. Nothing here opens sockets or reads files other than the
//! environment.

use clap::Parser;
use std::net::SocketAddr;

/// `HUB_ADMIN_BIND` when unset (also what `hub healthcheck` asks then).
pub const DEFAULT_ADMIN_BIND: &str = "127.0.0.1:9090";

/// Command-line flags; each falls back to its `HUB_*` environment variable.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "hub",
    version,
    about = "Real-time connection hub: SSE streams fed by an embedded or Redis broker"
)]
pub struct Config {
    /// TOML file of settings (top-level keys: these options in lower case without `HUB_`;
    /// a variable or flag wins) and `[[namespace]]` tables.
    #[arg(long, env = "HUB_CONFIG", value_name = "HUB_CONFIG")]
    pub config: Option<std::path::PathBuf>,

    /// The namespaces in force (from `HUB_CONFIG`, else `public:` and `""`).
    #[arg(skip)]
    pub namespaces: crate::namespaces::Namespaces,

    /// Public address: streams and health only.
    #[arg(
        long,
        env = "HUB_BIND",
        value_name = "HUB_BIND",
        default_value = "127.0.0.1:8080"
    )]
    pub bind: SocketAddr,

    /// Admin address: publish, metrics, stats, health.
    #[arg(
        long,
        env = "HUB_ADMIN_BIND",
        value_name = "HUB_ADMIN_BIND",
        default_value = DEFAULT_ADMIN_BIND
    )]
    pub admin_bind: SocketAddr,

    /// Redis URL: redis:// or rediss:// (TLS), redis-cluster://, redis-sentinel://h1:p1,h2:p2/db
    /// ?sentinelServiceName=name (rediss-... for TLS); unset runs the embedded broker.
    #[arg(
        long,
        env = "HUB_REDIS_URL",
        value_name = "HUB_REDIS_URL",
        hide_env_values = true
    )]
    pub redis_url: Option<String>,

    /// PEM file of the CA (or CAs) that signed Redis's TLS certificate; unset: the system's.
    #[arg(long, env = "HUB_REDIS_CA_FILE", value_name = "HUB_REDIS_CA_FILE")]
    pub redis_ca_file: Option<String>,

    /// This node's name in `hub.connected` and logs; defaults to $HOSTNAME, else a random name.
    #[arg(long, env = "HUB_NODE_ID", value_name = "HUB_NODE_ID")]
    pub node_id: Option<String>,

    /// Seconds between heartbeat comments on every stream.
    #[arg(long, env = "HUB_HEARTBEAT_SECS", value_name = "HUB_HEARTBEAT_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub heartbeat_secs: u64,

    /// A stream that accepted no write (WebSocket: sent no frame, pongs included) for this long
    /// is closed as stale.
    #[arg(long, env = "HUB_STALE_AFTER_SECS", value_name = "HUB_STALE_AFTER_SECS", default_value_t = 90,
          value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub stale_after_secs: u64,

    /// Seconds between sweeps (stale streams, gauge reconciliation, expired history).
    #[arg(long, env = "HUB_SWEEP_SECS", value_name = "HUB_SWEEP_SECS", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub sweep_secs: u64,

    /// Seconds over which open streams are closed on SIGTERM/SIGINT.
    #[arg(long, env = "HUB_DRAIN_SECS", value_name = "HUB_DRAIN_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub drain_secs: u64,

    /// Streams per node; beyond it new streams get 503 with Retry-After.
    #[arg(long, env = "HUB_MAX_CONNECTIONS", value_name = "HUB_MAX_CONNECTIONS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_connections: u64,

    /// Streams per token `sub`; beyond it 429.
    #[arg(long, env = "HUB_MAX_CONNECTIONS_PER_USER", value_name = "HUB_MAX_CONNECTIONS_PER_USER", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_connections_per_user: u64,

    /// Channels one stream may ask for.
    #[arg(long, env = "HUB_MAX_CHANNELS_PER_CONN", value_name = "HUB_MAX_CHANNELS_PER_CONN", default_value_t = 32,
          value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub max_channels_per_conn: u64,

    /// Largest envelope accepted, in bytes.
    #[arg(long, env = "HUB_MAX_MESSAGE_BYTES", value_name = "HUB_MAX_MESSAGE_BYTES", default_value_t = 65_536,
          value_parser = clap::value_parser!(u64).range(16..=16 * 1024 * 1024))]
    pub max_message_bytes: u64,

    /// Durable messages kept per channel.
    #[arg(long, env = "HUB_HISTORY_LEN", value_name = "HUB_HISTORY_LEN", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub history_len: u64,

    /// Longest time a durable message is kept.
    #[arg(long, env = "HUB_HISTORY_TTL_SECS", value_name = "HUB_HISTORY_TTL_SECS", default_value_t = 3600,
          value_parser = clap::value_parser!(u64).range(1..=30 * 86400))]
    pub history_ttl_secs: u64,

    /// How long a durable publish's idempotency key is remembered on its channel.
    #[arg(long, env = "HUB_IDEMPOTENCY_SECS", value_name = "HUB_IDEMPOTENCY_SECS", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub idempotency_secs: u64,

    /// Comma-separated origins allowed by CORS and the WebSocket Origin check; `*` for any.
    #[arg(
        long,
        env = "HUB_ALLOWED_ORIGINS",
        value_name = "HUB_ALLOWED_ORIGINS",
        default_value = "*"
    )]
    pub allowed_origins: String,

    /// The admin port is meant to be reachable from other hosts without `HUB_PUBLISH_KEY`
    /// (anyone who reaches it can publish); without it such a node refuses to start.
    #[arg(long, env = "HUB_ADMIN_OPEN", value_name = "HUB_ADMIN_OPEN", default_value_t = false,
          action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub admin_open: bool,

    /// When set, `POST /v1/publish` needs `Authorization: Bearer <key>`.
    #[arg(
        long,
        env = "HUB_PUBLISH_KEY",
        value_name = "HUB_PUBLISH_KEY",
        hide_env_values = true
    )]
    pub publish_key: Option<String>,

    /// HS256 secret for stream tokens.
    #[arg(
        long,
        env = "HUB_JWT_SECRET",
        value_name = "HUB_JWT_SECRET",
        hide_env_values = true
    )]
    pub jwt_secret: Option<String>,

    /// Path of a PEM public key (RS256 or ES256) for stream tokens.
    #[arg(long, env = "HUB_JWT_PUBLIC_KEY", value_name = "HUB_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<String>,

    /// When set, a token's `iss` must equal it.
    #[arg(long, env = "HUB_JWT_ISSUER", value_name = "HUB_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// When set, a token's `aud` must hold it (else `aud` is not checked).
    #[arg(long, env = "HUB_JWT_AUDIENCE", value_name = "HUB_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Name of a cookie that carries the stream token when neither `Authorization` nor
    /// `?token=` does.
    #[arg(long, env = "HUB_JWT_COOKIE", value_name = "HUB_JWT_COOKIE")]
    pub jwt_cookie: Option<String>,

    /// How long a revocation by `sub` + `before` is kept (seconds).
    #[arg(long, env = "HUB_REVOKE_KEEP_SECS", value_name = "HUB_REVOKE_KEEP_SECS", default_value_t = 86_400,
          value_parser = clap::value_parser!(u64).range(1..=366 * 86_400))]
    pub revoke_keep_secs: u64,

    /// The backend's authorization hook (http:// or https://): a stream request without a
    /// token is authorized by a POST there.
    #[arg(long, env = "HUB_AUTH_URL", value_name = "HUB_AUTH_URL")]
    pub auth_url: Option<String>,

    /// How long the authorization hook may take (milliseconds); slower is 503.
    #[arg(long, env = "HUB_AUTH_TIMEOUT_MS", value_name = "HUB_AUTH_TIMEOUT_MS", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub auth_timeout_ms: u64,

    /// How long the authorization hook's grant of a request carrying a cookie or an
    /// `Authorization` header is reused for the same request (its reconnects), in seconds, at
    /// most until the grant's `expires_at`; 0: every request asks.
    #[arg(long, env = "HUB_AUTH_CACHE_SECS", value_name = "HUB_AUTH_CACHE_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub auth_cache_secs: u64,

    /// Calls to the authorization hook in flight at once; requests beyond it (and a bounded
    /// few waiting) get 503 at once.
    #[arg(long, env = "HUB_AUTH_CONCURRENCY", value_name = "HUB_AUTH_CONCURRENCY", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub auth_concurrency: u64,

    /// CIDR ranges (or addresses) of proxies whose `X-Forwarded-For` is believed, comma
    /// separated: a request from one takes the right-most address that is not a trusted proxy.
    #[arg(long, env = "HUB_TRUSTED_PROXIES", value_name = "HUB_TRUSTED_PROXIES")]
    pub trusted_proxies: Option<String>,

    /// Streams one client address may hold on this node (IPv6: per /64); 0 = no limit.
    #[arg(long, env = "HUB_MAX_STREAMS_PER_IP", value_name = "HUB_MAX_STREAMS_PER_IP", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub max_streams_per_ip: u64,

    /// New streams per second one client address may open on this node (burst twice that);
    /// 0 = no limit.
    #[arg(long, env = "HUB_CONNECT_RATE_PER_IP", value_name = "HUB_CONNECT_RATE_PER_IP", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub connect_rate_per_ip: u64,

    /// Seconds a connection has to send a whole request head (or, over TLS, to finish its
    /// handshake); slower ones are closed.
    #[arg(long, env = "HUB_HEAD_TIMEOUT_SECS", value_name = "HUB_HEAD_TIMEOUT_SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=300))]
    pub head_timeout_secs: u64,

    /// WebSocket messages of this many payload bytes or more are compressed for sockets that
    /// negotiated `permessage-deflate` (smaller ones are sent as they are).
    #[arg(long, env = "HUB_COMPRESS_MIN_BYTES", value_name = "HUB_COMPRESS_MIN_BYTES", default_value_t = 512,
          value_parser = clap::value_parser!(u64).range(0..=16 * 1024 * 1024))]
    pub compress_min_bytes: u64,

    /// SSE streams of clients that send `Accept-Encoding: gzip` are sent gzip-encoded (each
    /// event compressed once for every stream, flushed as it is sent).
    #[arg(long, env = "HUB_SSE_GZIP", value_name = "HUB_SSE_GZIP", default_value_t = true,
          action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub sse_gzip: bool,

    /// Where channel and member events are POSTed (http:// or https://); unset: no webhooks.
    #[arg(long, env = "HUB_WEBHOOK_URL", value_name = "HUB_WEBHOOK_URL")]
    pub webhook_url: Option<String>,

    /// Signs each webhook body: `X-Hub-Signature: sha256=<hex HMAC-SHA256 of the body>`.
    #[arg(
        long,
        env = "HUB_WEBHOOK_SECRET",
        value_name = "HUB_WEBHOOK_SECRET",
        hide_env_values = true
    )]
    pub webhook_secret: Option<String>,

    /// How long a webhook batch is retried (seconds, 1 s doubling to 60 s) before it is dropped.
    #[arg(long, env = "HUB_WEBHOOK_RETRY_SECS", value_name = "HUB_WEBHOOK_RETRY_SECS", default_value_t = 3600,
          value_parser = clap::value_parser!(u64).range(0..=7 * 86_400))]
    pub webhook_retry_secs: u64,

    /// Webhook events waiting at most (over all nodes in Redis mode); beyond, the oldest are
    /// dropped and counted.
    #[arg(long, env = "HUB_WEBHOOK_MAX_PENDING", value_name = "HUB_WEBHOOK_MAX_PENDING", default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub webhook_max_pending: u64,

    /// Reconnection delay sent to clients in `retry:` (milliseconds).
    #[arg(long, env = "HUB_RETRY_MS", value_name = "HUB_RETRY_MS", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub retry_ms: u64,

    /// Messages queued per stream; a reader further behind continues from history.
    #[arg(long, env = "HUB_OUTBOX_LEN", value_name = "HUB_OUTBOX_LEN", default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(4..=65_536))]
    pub outbox_len: u64,

    /// PEM certificate chain: with `HUB_TLS_KEY`, the public port serves HTTPS (HTTP/2 and
    /// HTTP/1.1 by ALPN).
    #[arg(long, env = "HUB_TLS_CERT", value_name = "HUB_TLS_CERT")]
    pub tls_cert: Option<std::path::PathBuf>,

    /// PEM private key of `HUB_TLS_CERT`.
    #[arg(long, env = "HUB_TLS_KEY", value_name = "HUB_TLS_KEY")]
    pub tls_key: Option<std::path::PathBuf>,

    /// HTTP worker threads for the public port; defaults to the number of cores.
    #[arg(long, env = "HUB_WORKERS", value_name = "HUB_WORKERS",
          value_parser = clap::value_parser!(u64).range(1..=256))]
    pub workers: Option<u64>,

    /// Log filter (tracing-subscriber syntax), e.g. `info` or `hub=debug`.
    #[arg(long, env = "HUB_LOG", value_name = "HUB_LOG", default_value = "info")]
    pub log: String,
}

/// Allowed origins, parsed once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origins {
    Any,
    List(Vec<String>),
}

impl Origins {
    pub fn allows(&self, origin: &str) -> bool {
        match self {
            Origins::Any => true,
            Origins::List(list) => list.iter().any(|o| o.eq_ignore_ascii_case(origin)),
        }
    }
}

/// The settings (key, value as text) and `[[namespace]]` tables of a `HUB_CONFIG` file.
type FileParts = (Vec<(String, String)>, Vec<crate::namespaces::Namespace>);

/// Reads a `HUB_CONFIG` file; an error is one line naming the file (and the key) and why.
fn read_file(path: &std::path::Path) -> Result<FileParts, String> {
    let file = path.display();
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("HUB_CONFIG {file}: cannot read: {e}"))?;
    /// The file's shape: `[[namespace]]` tables, and settings.
    #[derive(serde::Deserialize)]
    struct Shape {
        #[serde(default)]
        namespace: Vec<crate::namespaces::Namespace>,
        #[serde(flatten)]
        settings: toml::Table,
    }
    let shape: Shape = toml::from_str(&text).map_err(|e| {
        // Where it is: the line, and the key written on it.
        let at = e.span().map(|span| {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            let written = text.lines().nth(line - 1).unwrap_or("");
            match written.split_once('=') {
                Some((key, _)) => format!("line {line}, key {:?}: ", key.trim()),
                None => format!("line {line}: "),
            }
        });
        format!(
            "HUB_CONFIG {file}: {}{}",
            at.unwrap_or_default(),
            e.message().lines().next().unwrap_or("not TOML").trim()
        )
    })?;
    let namespaces = shape.namespace;
    let table = shape.settings;
    let mut settings = Vec::new();
    for (key, value) in table {
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Float(f) => f.to_string(),
            _ => {
                return Err(format!(
                    "HUB_CONFIG {file}: key {key:?} must be a string, a number or a boolean"
                ))
            }
        };
        settings.push((key, text));
    }
    Ok((settings, namespaces))
}

impl Config {
    /// How many durable messages a channel keeps: its namespace's `history_len`, else
    /// `HUB_HISTORY_LEN`.
    pub fn history_len_of(&self, channel: &str) -> u64 {
        self.namespaces
            .of(channel)
            .history_len
            .unwrap_or(self.history_len)
    }

    /// Parses flags and environment, then checks what clap cannot: relations between values.
    /// On error returns one line naming the variable; `--help`/`--version` exit here.
    pub fn from_env_and_args() -> Result<Config, String> {
        Config::load(std::env::args_os().collect())
    }

    /// [`Config::from_env_and_args`] with these arguments (the program name first).
    pub fn load(args: Vec<std::ffi::OsString>) -> Result<Config, String> {
        let first_line = |e: clap::Error| -> String {
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) {
                e.exit()
            }
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid configuration");
            first.trim_start_matches("error: ").to_string()
        };
        let mut cfg = Config::try_parse_from(&args).map_err(first_line)?;
        if let Some(path) = cfg.config.clone() {
            let file = path.display().to_string();
            let (settings, namespaces) = read_file(&path)?;
            // The file's settings apply where neither a flag nor a variable gave one.
            let command = <Config as clap::CommandFactory>::command();
            let matches = command
                .clone()
                .try_get_matches_from(&args)
                .map_err(first_line)?;
            let mut with_file = args.clone();
            for (key, value) in settings {
                let arg = command
                    .get_arguments()
                    .find(|a| a.get_id().as_str() == key && key != "config")
                    .and_then(|a| a.get_long())
                    .ok_or_else(|| format!("HUB_CONFIG {file}: unknown key {key:?}"))?;
                if matches.value_source(&key) == Some(clap::parser::ValueSource::DefaultValue)
                    || matches.value_source(&key).is_none()
                {
                    with_file.push(format!("--{arg}={value}").into());
                }
            }
            cfg = Config::try_parse_from(&with_file)
                .map_err(|e| format!("HUB_CONFIG {file}: {}", first_line(e)))?;
            cfg.namespaces = crate::namespaces::Namespaces::from_file_tables(&file, namespaces)?;
        }
        cfg.check()?;
        Ok(cfg)
    }

    /// Checks the relations between values.
    pub fn check(&self) -> Result<(), String> {
        if self.stale_after_secs <= self.heartbeat_secs {
            return Err(format!(
                "HUB_STALE_AFTER_SECS ({}) must be greater than HUB_HEARTBEAT_SECS ({}): a healthy stream is written at least every heartbeat",
                self.stale_after_secs, self.heartbeat_secs
            ));
        }
        if self.bind == self.admin_bind && self.bind.port() != 0 {
            return Err(format!(
                "HUB_ADMIN_BIND ({}) must differ from HUB_BIND",
                self.admin_bind
            ));
        }
        self.origins()?;
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                crate::tls::server_config(cert, key)?;
            }
            (None, None) => {}
            (Some(_), None) => return Err("HUB_TLS_CERT is set without HUB_TLS_KEY".into()),
            (None, Some(_)) => return Err("HUB_TLS_KEY is set without HUB_TLS_CERT".into()),
        }
        if let Some(url) = &self.redis_url {
            use crate::redis_url::SCHEMES;
            if !SCHEMES.iter().any(|s| url.starts_with(s)) {
                return Err(format!(
                    "HUB_REDIS_URL must start with one of {}",
                    SCHEMES.join(", ")
                ));
            }
            let redis = crate::redis_url::config(url, self.redis_ca_file.as_deref())?;
            if redis.server.is_clustered() && self.webhook_url.is_some() {
                return Err("HUB_WEBHOOK_URL: webhooks need a standalone or Sentinel Redis; in Redis Cluster the presence functions cannot reach the webhook stream (another slot)".into());
            }
        } else if self.redis_ca_file.is_some() {
            return Err("HUB_REDIS_CA_FILE is set without HUB_REDIS_URL".into());
        }
        if !self.admin_bind.ip().is_loopback() && self.publish_key.is_none() && !self.admin_open {
            return Err(format!(
                "HUB_ADMIN_BIND {} is reachable from other hosts and HUB_PUBLISH_KEY is not set, so anyone who reaches it could publish: set HUB_PUBLISH_KEY (publishers send Authorization: Bearer <key>), bind it to 127.0.0.1, or set HUB_ADMIN_OPEN=true if that is meant",
                self.admin_bind
            ));
        }
        if matches!(&self.jwt_issuer, Some(s) if s.is_empty())
            || matches!(&self.jwt_audience, Some(s) if s.is_empty())
        {
            return Err("HUB_JWT_ISSUER and HUB_JWT_AUDIENCE must not be empty when set".into());
        }
        if let Some(name) = &self.jwt_cookie {
            let token_char = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
            if name.is_empty() || !name.bytes().all(token_char) {
                return Err(format!("HUB_JWT_COOKIE {name:?} is not a cookie name"));
            }
        }
        if let Some(url) = &self.auth_url {
            match reqwest::Url::parse(url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                _ => {
                    return Err(format!(
                        "HUB_AUTH_URL {url:?} must be an http:// or https:// URL"
                    ))
                }
            }
        }
        self.trusted_proxies()?;
        if let Some(url) = &self.webhook_url {
            match reqwest::Url::parse(url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                _ => {
                    return Err(format!(
                        "HUB_WEBHOOK_URL {url:?} must be an http:// or https:// URL"
                    ))
                }
            }
        }
        if matches!(&self.webhook_secret, Some(k) if k.is_empty()) {
            return Err(
                "HUB_WEBHOOK_SECRET is set but empty; unset it to send unsigned webhooks".into(),
            );
        }
        if matches!(&self.publish_key, Some(k) if k.is_empty()) {
            return Err(
                "HUB_PUBLISH_KEY is set but empty; unset it to allow unauthenticated publishing"
                    .into(),
            );
        }
        if matches!(&self.node_id, Some(n) if n.is_empty() || n.len() > 128) {
            return Err("HUB_NODE_ID must be 1 to 128 characters".into());
        }
        Ok(())
    }

    /// `HUB_ALLOWED_ORIGINS` parsed.
    pub fn origins(&self) -> Result<Origins, String> {
        let items: Vec<String> = self
            .allowed_origins
            .split(',')
            .map(|s| s.trim().trim_end_matches('/').to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if items.is_empty() {
            return Err("HUB_ALLOWED_ORIGINS is empty; use * to allow every origin".into());
        }
        if items.iter().any(|s| s == "*") {
            return Ok(Origins::Any);
        }
        for o in &items {
            if !(o.starts_with("http://") || o.starts_with("https://"))
                || o.contains(char::is_whitespace)
            {
                return Err(format!(
                    "HUB_ALLOWED_ORIGINS entry {o:?} is not an origin like https://app.example.com"
                ));
            }
        }
        Ok(Origins::List(items))
    }

    /// `HUB_TRUSTED_PROXIES` as ranges (an address alone is a range of one).
    pub fn trusted_proxies(&self) -> Result<Vec<ipnet::IpNet>, String> {
        let Some(list) = &self.trusted_proxies else {
            return Ok(Vec::new());
        };
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<ipnet::IpNet>()
                    .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| {
                        format!("HUB_TRUSTED_PROXIES entry {s:?} is not an address or a CIDR range like 10.0.0.0/8")
                    })
            })
            .collect()
    }

    /// The node's name.
    pub fn node_name(&self) -> String {
        if let Some(n) = &self.node_id {
            return n.clone();
        }
        match std::env::var("HOSTNAME") {
            Ok(h) if !h.is_empty() && h.len() <= 128 => h,
            _ => format!("hub-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
        }
    }

    /// Worker threads for the public server.
    pub fn worker_count(&self) -> usize {
        match self.workers {
            Some(n) => n as usize,
            None => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let mut all = vec!["hub"];
        all.extend_from_slice(args);
        let cfg = Config::try_parse_from(all).map_err(|e| e.to_string())?;
        cfg.check()?;
        Ok(cfg)
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.bind.to_string(), "127.0.0.1:8080");
        assert_eq!(c.admin_bind.to_string(), "127.0.0.1:9090");
        assert_eq!(
            (
                c.heartbeat_secs,
                c.stale_after_secs,
                c.sweep_secs,
                c.drain_secs
            ),
            (30, 90, 300, 10)
        );
        assert_eq!(
            (
                c.max_connections,
                c.max_connections_per_user,
                c.max_channels_per_conn
            ),
            (10_000, 10, 32)
        );
        assert_eq!(
            (c.max_message_bytes, c.history_len, c.history_ttl_secs),
            (65_536, 1000, 3600)
        );
        assert_eq!(c.origins(), Ok(Origins::Any));
        assert_eq!(
            (
                c.revoke_keep_secs,
                c.auth_timeout_ms,
                c.auth_concurrency,
                c.jwt_cookie.is_none() && c.auth_url.is_none()
            ),
            (86_400, 2000, 64, true)
        );
        assert_eq!(
            (
                c.max_streams_per_ip,
                c.connect_rate_per_ip,
                c.head_timeout_secs,
                c.trusted_proxies.is_none()
            ),
            (0, 0, 10, true)
        );
        assert_eq!((c.compress_min_bytes, c.sse_gzip), (512, true));
        assert!(!parse(&["--sse-gzip", "false"]).unwrap().sse_gzip);
        assert_eq!(
            (
                c.webhook_url.is_none(),
                c.webhook_retry_secs,
                c.webhook_max_pending
            ),
            (true, 3600, 100_000)
        );
    }

    #[test]
    fn bad_values_name_the_variable() {
        let e = parse(&["--heartbeat-secs", "abc"]).unwrap_err();
        assert!(e.contains("HUB_HEARTBEAT_SECS"), "{e}");
        let e = parse(&["--heartbeat-secs", "0"]).unwrap_err();
        assert!(e.contains("HUB_HEARTBEAT_SECS"), "{e}");
        let e = parse(&["--heartbeat-secs", "100"]).unwrap_err();
        assert!(e.contains("HUB_STALE_AFTER_SECS"), "{e}");
        let e = parse(&["--allowed-origins", "example.com"]).unwrap_err();
        assert!(e.contains("HUB_ALLOWED_ORIGINS"), "{e}");
        let e = parse(&["--redis-url", "http://x"]).unwrap_err();
        assert!(e.contains("HUB_REDIS_URL"), "{e}");
        for bad in ["", "a b", "a;b", "a=b"] {
            let e = parse(&["--jwt-cookie", bad]).unwrap_err();
            assert!(e.contains("HUB_JWT_COOKIE"), "{e}");
        }
        for bad in ["localhost:3000/auth", "ftp://x/auth", "http://"] {
            let e = parse(&["--auth-url", bad]).unwrap_err();
            assert!(e.contains("HUB_AUTH_URL"), "{e}");
        }
        assert!(parse(&[
            "--auth-url",
            "https://api.internal/hub-auth",
            "--jwt-cookie",
            "hub_token"
        ])
        .is_ok());
        let e = parse(&["--auth-concurrency", "0"]).unwrap_err();
        assert!(e.contains("HUB_AUTH_CONCURRENCY"), "{e}");
        for bad in ["localhost:3000/hooks", "ftp://x/hooks"] {
            let e = parse(&["--webhook-url", bad]).unwrap_err();
            assert!(e.contains("HUB_WEBHOOK_URL"), "{e}");
        }
        let hook = ["--webhook-url", "https://api.internal/hooks"];
        assert!(parse(&hook).is_ok());
        let e = parse(&[
            hook[0],
            hook[1],
            "--redis-url",
            "redis-cluster://127.0.0.1:7000",
        ])
        .unwrap_err();
        assert!(
            e.contains("HUB_WEBHOOK_URL") && e.contains("Cluster"),
            "{e}"
        );
        let e = parse(&[hook[0], hook[1], "--webhook-secret", ""]).unwrap_err();
        assert!(e.contains("HUB_WEBHOOK_SECRET"), "{e}");
        let e = parse(&["--trusted-proxies", "10.0.0.0/8, nope"]).unwrap_err();
        assert!(
            e.contains("HUB_TRUSTED_PROXIES") && e.contains("nope"),
            "{e}"
        );
        let c = parse(&["--trusted-proxies", "10.0.0.0/8, 192.168.1.1,::1"]).unwrap();
        assert_eq!(c.trusted_proxies().map(|t| t.len()), Ok(3));
        let e = parse(&["--head-timeout-secs", "0"]).unwrap_err();
        assert!(e.contains("HUB_HEAD_TIMEOUT_SECS"), "{e}");
        let e = parse(&["--webhook-max-pending", "0"]).unwrap_err();
        assert!(e.contains("HUB_WEBHOOK_MAX_PENDING"), "{e}");
    }

    #[test]
    fn an_admin_port_open_to_other_hosts_needs_a_publish_key_or_a_word_that_it_is_meant() {
        let e = parse(&["--admin-bind", "0.0.0.0:9090"]).unwrap_err();
        assert!(
            e.contains("HUB_PUBLISH_KEY") && e.contains("HUB_ADMIN_OPEN"),
            "{e}"
        );
        assert!(parse(&["--admin-bind", "0.0.0.0:9090", "--publish-key", "k"]).is_ok());
        assert!(parse(&["--admin-bind", "0.0.0.0:9090", "--admin-open", "true"]).is_ok());
        assert!(
            parse(&["--admin-bind", "[::1]:9090"]).is_ok(),
            "loopback needs nothing"
        );
    }

    #[test]
    fn origin_list() {
        let c = parse(&[
            "--allowed-origins",
            "https://a.example, http://b.example:8000/",
        ])
        .unwrap();
        let o = c.origins().unwrap();
        assert!(o.allows("https://a.example"));
        assert!(o.allows("http://b.example:8000"));
        assert!(!o.allows("https://evil.example"));
    }
}

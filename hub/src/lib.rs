//! hub: a real-time connection hub. Browsers hold SSE or WebSocket streams here; services
//! publish to channels (over HTTP, or over Redis in Redis mode); the hub fans each message out.
//!
//! The map, from the bottom up: a module uses only modules listed before it (no cycles).
//! - [`domain`]: transports, close and refusal reasons (the labels clients and metrics see).
//!   [`message`]: a message framed once, shared by every reader. [`tasks`]: background tasks,
//!   aborted at stop. [`peer`]: whether a stream's client still acknowledges.
//! - [`config`]: `HUB_*` settings, checked before anything binds ([`redis_url`], [`tls`]).
//!   [`metrics`]: metric names and pre-resolved handles. [`refusal`]: why a request is
//!   refused. [`namespaces`]: options per channel prefix (`HUB_CONFIG`). [`ratelimit`]:
//!   token buckets. [`revocations`]:
//!   revoked tokens in memory. [`control`]: disconnects and
//!   revocations as they travel between nodes. [`auth`]: who may read which channel.
//!   [`authhook`]: the backend's authorization hook (`HUB_AUTH_URL`). [`addresses`]: client
//!   addresses and their limits. [`hangup`]: a connection's last answer and its close.
//!   [`held`]: the thread where held refusals wait.
//! - [`stream`]: one stream: its channels' read positions, presence cursors and bounded queue,
//!   behind one lock.
//! - [`broker`]: where messages are published and read back from (embedded, with its
//!   in-memory history, or Redis with its function library).
//! - [`channels`]: the local registry: admission, membership, fan-out, the tick's findings,
//!   each channel's presence counts and log (no I/O).
//! - [`presence`]: the presence store (memory or Redis) and the once-a-second reporter.
//! - [`catchup`]: bounded, shared history reads for readers that are behind.
//! - [`node`]: owns the registry, the broker, the presence store and the catch-up as
//!   siblings, and the flows that need them together: open a stream, start a channel, close,
//!   publish, drain, apply control from the backend.
//! - [`http`]: JSON error answers, CORS, bearer credentials. [`transport`]: SSE and
//!   WebSocket: check the request, render the items, write a bare socket.
//! - [`server`]: the public port (its front door for stream requests) and the admin port.
//!   [`ticker`]: heartbeats, token expiry, stale streams, sweeps, metric upkeep on one tick.
//!   [`shutdown`]: signal handling and the drain. [`healthcheck`]: the container's probe.
//!
//! [`run`] serves a node on listeners the caller bound until a shutdown future resolves, so a
//! test or benchmark can start one in-process; [`serve`] is what the binary runs.

pub mod addresses;
pub mod auth;
pub mod authhook;
pub mod broker;
pub mod catchup;
pub mod channels;
pub mod compress;
pub mod config;
pub mod control;
pub mod domain;
pub mod hangup;
pub mod healthcheck;
pub mod held;
pub mod http;
pub mod message;
pub mod metrics;
pub mod namespaces;
pub mod node;
pub mod peer;
pub mod presence;
pub mod ratelimit;
pub mod redis_url;
pub mod refusal;
pub mod revocations;
pub mod server;
pub mod shutdown;
pub mod status;
pub mod stream;
pub mod tasks;
pub mod ticker;
pub mod tls;
pub mod transport;
pub mod webhook_events;
pub mod webhooks;

use actix_http::HttpServiceBuilder;
use actix_service::{Service as _, ServiceFactory as _};
use actix_web::{web, App, HttpServer};
use anyhow::Context as _;
use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

pub use config::Config;
pub use node::Node;

/// Pending connections the kernel queues per listener; a reconnect storm of 10,000 clients
/// must not be refused at the TCP level.
const BACKLOG: i32 = 4096;
/// Seconds actix waits, after the drain, for connections to finish writing.
const SERVER_STOP_SECS: u64 = 5;
/// Kernel send buffer of a stream's socket (Linux doubles it for bookkeeping). A reader that
/// stops reading would otherwise hold up to `tcp_wmem`'s maximum (4 MiB here) of messages in
/// the kernel per socket before the hub sees it fall behind; 32 KiB still carries a stream at
/// 2.5 MB/s over a 50 ms round trip, far above what event streams need.
const STREAM_SNDBUF: usize = 32 * 1024;
/// Bytes actix gathers from a stream's body before it writes (its default is 32 KiB). With
/// one more message (up to 4 KiB) it stays within the 8 KiB buffer every connection has
/// anyway, so a stuck stream holds no more than an idle one; a fast reader still gets many
/// small messages per write.
const STREAM_WRITE_BUFFER: usize = 4 * 1024;

/// Binds a listener with a large backlog. Accepted sockets inherit `TCP_USER_TIMEOUT`, so a
/// peer that stops acknowledging (or keeps a zero window) is dropped by the kernel instead of
/// holding buffers forever.
fn listen(
    addr: SocketAddr,
    user_timeout: Duration,
    send_buffer: Option<usize>,
) -> anyhow::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_tcp_user_timeout(Some(user_timeout))?;
    if let Some(bytes) = send_buffer {
        // Inherited by accepted sockets (and it turns the kernel's autotuning off for them).
        socket.set_send_buffer_size(bytes)?;
    }
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// File descriptors a node needs beyond its streams (listeners, Redis, the admin port's clients).
const SPARE_FDS: u64 = 256;

/// Raises the soft open-files limit to the hard limit (many systems start processes at 1024)
/// and warns when `HUB_MAX_CONNECTIONS` streams still would not fit.
fn raise_fd_limit(max_connections: u64) {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < max_connections + SPARE_FDS => tracing::warn!(
            limit,
            max_connections,
            "the open-files limit is below HUB_MAX_CONNECTIONS + {SPARE_FDS}: streams will be \
             refused by the kernel before the hub's limit; raise it (ulimit -n, LimitNOFILE, \
             the container runtime's nofile)"
        ),
        Ok(limit) => tracing::debug!(limit, "open-files limit"),
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-files limit"),
    }
}

/// The two listening sockets of a node.
pub struct Listeners {
    pub public: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds `HUB_BIND` and `HUB_ADMIN_BIND`. Accepted sockets carry `TCP_USER_TIMEOUT` of
    /// `HUB_STALE_AFTER_SECS` + one heartbeat, a backstop behind the hub's own rules (a vanished
    /// client is found at its second heartbeat, see [`peer`]). Not shorter: Linux applies the
    /// same timeout to a reader that keeps its window closed (seen here on 6.18), and such a
    /// reader is the hub's to close as stale, at `HUB_STALE_AFTER_SECS`.
    pub fn bind(config: &Config) -> anyhow::Result<Listeners> {
        let user_timeout = Duration::from_secs(config.stale_after_secs + config.heartbeat_secs);
        Ok(Listeners {
            public: listen(config.bind, user_timeout, Some(STREAM_SNDBUF))
                .with_context(|| format!("HUB_BIND {}: cannot listen", config.bind))?,
            admin: listen(config.admin_bind, user_timeout, None)
                .with_context(|| format!("HUB_ADMIN_BIND {}: cannot listen", config.admin_bind))?,
        })
    }
}

/// actix-http as every stream connection of the public port is served, whatever the transport
/// under it (the front's plain connections, TLS).
fn stream_http<T, S>(head_secs: u64) -> HttpServiceBuilder<T, S>
where
    S: actix_service::ServiceFactory<actix_http::Request, Config = ()>,
    S::Error: Into<actix_http::Response<actix_http::body::BoxBody>> + 'static,
    S::InitError: std::fmt::Debug,
    <S::Service as actix_service::Service<actix_http::Request>>::Future: 'static,
{
    HttpServiceBuilder::default()
        // An EventSource never half-closes on purpose: a FIN means the client left, and its
        // stream (slot, counts, per-user place) is released at once instead of at the next
        // write.
        .h1_allow_half_closed(false)
        .h1_write_buffer_size(STREAM_WRITE_BUFFER)
        .client_request_timeout(Duration::from_secs(head_secs))
        .client_disconnect_timeout(Duration::from_secs(1))
}

/// Runs the public port's server on `listener`: `factory` makes each worker's service.
fn public_port(
    listener: TcpListener,
    workers: usize,
    per_worker: usize,
    factory: impl actix_server::ServerServiceFactory<actix_web::rt::net::TcpStream>,
) -> std::io::Result<actix_web::dev::Server> {
    Ok(actix_web::dev::Server::build()
        .workers(workers)
        .max_concurrent_connections(per_worker)
        .backlog(BACKLOG as u32)
        .disable_signals()
        .shutdown_timeout(SERVER_STOP_SECS)
        .listen("public", listener, factory)?
        .run())
}

/// The public port: the front ([`server::front`]) reads each request head and serves plain
/// stream requests itself; actix-http (configured as `HttpServer` would be) answers the rest.
fn public_server(
    node: &std::sync::Arc<Node>,
    data: web::Data<Node>,
    listener: TcpListener,
    workers: usize,
    per_worker: usize,
) -> std::io::Result<actix_web::dev::Server> {
    let node = node.clone();
    let head_secs = node.config.head_timeout_secs;
    let factory = move || {
        let (node, data) = (node.clone(), data.clone());
        actix_service::fn_factory(move || {
            let (node, data) = (node.clone(), data.clone());
            async move {
                let app = App::new()
                    .app_data(data)
                    .configure(server::public::configure);
                let http = stream_http(head_secs)
                    .on_connect_ext(
                        |io: &server::front::Conn, ext: &mut actix_web::dev::Extensions| {
                            ext.insert(io.socket());
                        },
                    )
                    .finish(actix_service::map_config(app, |()| {
                        actix_web::dev::AppConfig::default()
                    }));
                let http = std::rc::Rc::new(http.new_service(()).await?);
                Ok::<_, ()>(actix_service::fn_service(
                    move |io: actix_web::rt::net::TcpStream| {
                        let (node, http) = (node.clone(), http.clone());
                        async move {
                            server::front::serve(node, io, head_secs, |conn| async move {
                                let peer = conn.peer_addr();
                                if let Err(e) =
                                    http.call((conn, actix_http::Protocol::Http1, peer)).await
                                {
                                    tracing::debug!(error = ?e, "public connection ended in error");
                                }
                            })
                            .await;
                            Ok::<_, ()>(())
                        }
                    },
                ))
            }
        })
    };
    public_port(listener, workers, per_worker, factory)
}

/// The public port with `HUB_TLS_CERT`/`HUB_TLS_KEY`: actix-http behind rustls, HTTP/2 or
/// HTTP/1.1 by ALPN, every request through actix's router (the front reads only plain
/// HTTP/1.x). Each HTTP/2 stream is a request of its own: one stream, in every limit and
/// metric, dropped (and released) when the client resets it.
fn public_tls_server(
    data: web::Data<Node>,
    listener: TcpListener,
    workers: usize,
    per_worker: usize,
    tls: rustls::ServerConfig,
    head_secs: u64,
) -> std::io::Result<actix_web::dev::Server> {
    type Tls = actix_tls::accept::rustls_0_23::TlsStream<actix_web::rt::net::TcpStream>;
    let factory = move || {
        let app = App::new()
            .app_data(data.clone())
            .configure(server::public::configure);
        stream_http(head_secs)
            .on_connect_ext(|io: &Tls, ext: &mut actix_web::dev::Extensions| {
                use std::os::fd::AsRawFd;
                ext.insert(peer::PeerSocket(io.get_ref().0.as_raw_fd()));
            })
            .finish(actix_service::map_config(app, |()| {
                actix_web::dev::AppConfig::default()
            }))
            // A handshake is part of the head's time (a slow or silent TLS client is closed).
            .rustls_0_23_with_config(
                tls.clone(),
                actix_http::TlsAcceptorConfig::default()
                    .handshake_timeout(Duration::from_secs(head_secs)),
            )
    };
    public_port(listener, workers, per_worker, factory)
}

/// Binds the configured ports and runs a node until SIGTERM/SIGINT, then drains and returns.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let listeners = Listeners::bind(&config)?;
    run(config, listeners, async {
        match shutdown::signal().await {
            Ok(s) => tracing::info!(signal = s, "shutting down"),
            Err(e) => tracing::error!(error = %e, "cannot listen for signals; shutting down"),
        }
    })
    .await
}

/// Runs a node on `listeners` until `shutdown` resolves (or a server fails), then drains its
/// streams, stops both servers and every background task, and returns. Must run inside an actix
/// system. Prints `hub listening public=ADDR admin=ADDR node=NAME` on stdout once serving.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    raise_fd_limit(config.max_connections);
    let public_addr = listeners.public.local_addr()?;
    let admin_addr = listeners.admin.local_addr()?;

    let node = Node::new(config).await?;
    // Redis mode: this node's figures for every node's status page (a task the node stops).
    node.spawn(status::publish(node.clone()));
    let data = web::Data::from(node.clone());
    let workers = node.config.worker_count();
    let per_worker = (node.config.max_connections as usize + 1024).max(25_000);

    let public = match (&node.config.tls_cert, &node.config.tls_key) {
        (Some(cert), Some(key)) => {
            let tls = tls::server_config(cert, key).map_err(anyhow::Error::msg)?;
            let head_secs = node.config.head_timeout_secs;
            public_tls_server(
                data.clone(),
                listeners.public,
                workers,
                per_worker,
                tls,
                head_secs,
            )?
        }
        _ => public_server(&node, data.clone(), listeners.public, workers, per_worker)?,
    };
    let d = data.clone();
    let admin = HttpServer::new(move || {
        App::new()
            .app_data(d.clone())
            .configure(server::admin::configure)
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(SERVER_STOP_SECS)
    .listen(listeners.admin)?
    .run();
    let (public_h, admin_h) = (public.handle(), admin.handle());
    let mut public_task = actix_web::rt::spawn(public);
    let mut admin_task = actix_web::rt::spawn(admin);
    node.spawn(ticker::run(node.clone()));

    println!(
        "hub listening public={public_addr} admin={admin_addr} node={}",
        node.name
    );
    tracing::info!(%public_addr, %admin_addr, node = %node.name, broker = node.broker.kind(), workers, "hub started");

    let ended = tokio::select! {
        () = shutdown => Ok(()),
        r = &mut public_task => r.context("public server task").and_then(|r| r.context("public server")),
        r = &mut admin_task => r.context("admin server task").and_then(|r| r.context("admin server")),
    };
    shutdown::drain(&node).await;
    // Let the closed streams hand their last bytes to the HTTP server, then stop the public
    // port at once: actix's graceful stop re-checks busy workers only once a second, and a
    // restarting node's clients would find the port refusing for all that time. (Bytes still
    // in a socket's buffer then are lost, and those clients reconnect as they would anyway.)
    let flushed_by = Instant::now() + Duration::from_secs(SERVER_STOP_SECS);
    while node.live_transports() > 0 && Instant::now() < flushed_by {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::join!(public_h.stop(false), admin_h.stop(true));
    node.stop();
    tracing::info!("stopped");
    ended
}

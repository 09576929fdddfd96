//! Real `redis-server` processes for the tests: one server (plain, with TLS on certificates
//! made by openssl for the run, or with a password), or a 3-master cluster, on free loopback
//! ports, each in its own directory, stopped by PID.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A port the kernel just gave out (bind then release; the tiny race is acceptable in tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A fresh scratch folder for one server process of this test run.
pub(crate) fn scratch(name: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("hub-test-{}/{name}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("redis dir");
    dir
}

/// A test CA and a server certificate it signed for 127.0.0.1 and localhost.
pub struct TlsCerts {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsCerts {
    /// Makes a fresh CA and server certificate with openssl.
    pub fn make() -> TlsCerts {
        let dir = scratch("tls");
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .expect("openssl");
            assert!(
                out.status.success(),
                "openssl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=hub test CA",
        ]);
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ]);
        std::fs::write(
            dir.join("ext.cnf"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .expect("ext.cnf");
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ]);
        TlsCerts {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
        }
    }
}

/// How a client reaches a server: TLS with this CA, a password.
#[derive(Clone, Default)]
struct Access {
    tls: Option<(PathBuf, PathBuf, PathBuf)>,
    password: Option<String>,
}

/// One redis-server. Dropping it kills the process.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    extra: Vec<String>,
    access: Access,
}

impl Redis {
    /// Starts a standalone server with append-only persistence (so a restart keeps history).
    pub fn start() -> Redis {
        Redis::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Redis {
        Redis::start_as(Access::default(), extra)
    }

    /// A server that speaks only TLS (clients need not present certificates), with a password
    /// for its default user if given.
    pub fn start_tls(certs: &TlsCerts, password: Option<&str>) -> Redis {
        let access = Access {
            tls: Some((certs.ca.clone(), certs.cert.clone(), certs.key.clone())),
            password: password.map(str::to_owned),
        };
        let extra: Vec<&str> = password
            .map(|p| vec!["--requirepass", p])
            .unwrap_or_default();
        Redis::start_as(access, &extra)
    }

    /// A server whose default user needs `password`.
    pub fn start_with_password(password: &str) -> Redis {
        let access = Access {
            tls: None,
            password: Some(password.to_string()),
        };
        Redis::start_as(access, &["--requirepass", password])
    }

    /// Starts a standalone server on `port` (a node was pointed there before it existed).
    pub fn start_on(port: u16) -> Redis {
        Redis::start_at(port, Access::default(), &[])
    }

    fn start_as(access: Access, extra: &[&str]) -> Redis {
        Redis::start_at(free_port(), access, extra)
    }

    fn start_at(port: u16, access: Access, extra: &[&str]) -> Redis {
        let mut r = Redis {
            child: None,
            port,
            dir: scratch("redis"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            access,
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new("redis-server");
        match &self.access.tls {
            None => cmd.arg("--port").arg(self.port.to_string()),
            Some((ca, cert, key)) => cmd
                .args(["--port", "0", "--tls-port"])
                .arg(self.port.to_string())
                .arg("--tls-cert-file")
                .arg(cert)
                .arg("--tls-key-file")
                .arg(key)
                .arg("--tls-ca-cert-file")
                .arg(ca)
                .args(["--tls-auth-clients", "no"]),
        };
        cmd.arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(&self.dir)
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("yes")
            .arg("--appendfsync")
            .arg("always")
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd
            .spawn()
            .expect("redis-server must be installed (scripts/test.sh installs it)");
        self.child = Some(child);
        wait_for_ping(self.port, &self.access);
    }

    /// `redis://` (or `rediss://` for TLS), with the password if there is one.
    pub fn url(&self) -> String {
        let scheme = if self.access.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        let auth = self
            .access
            .password
            .as_ref()
            .map(|p| format!(":{p}@"))
            .unwrap_or_default();
        format!("{scheme}://{auth}127.0.0.1:{}/", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Stops the server (SIGTERM, so it finishes writing its AOF) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            crate::signal(c.id(), "TERM");
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and directory.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Runs `redis-cli` against this server and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        cli_as(self.port, &self.access, args)
    }

    /// A connection for the publisher helpers.
    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to redis")
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn cli(port: u16, args: &[&str]) -> String {
    cli_as(port, &Access::default(), args)
}

fn cli_as(port: u16, access: &Access, args: &[&str]) -> String {
    let mut cmd = Command::new("redis-cli");
    cmd.arg("-p").arg(port.to_string());
    if let Some((ca, _, _)) = &access.tls {
        cmd.arg("--tls").arg("--cacert").arg(ca);
    }
    if let Some(p) = &access.password {
        cmd.env("REDISCLI_AUTH", p);
    }
    let out = cmd.args(args).output().expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn wait_for_ping(port: u16, access: &Access) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if cli_as(port, access, &["PING"]) == "PONG" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "redis-server on {port} did not answer PING"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A Redis Cluster of three masters (no replicas) on loopback.
pub struct Cluster {
    pub nodes: Vec<Redis>,
}

impl Cluster {
    pub fn start() -> Cluster {
        let nodes: Vec<Redis> = (0..3)
            .map(|_| {
                Redis::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-node-timeout",
                    "5000",
                    "--appendonly",
                    "no",
                ])
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        let out = Command::new("redis-cli")
            .args(&args)
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        for n in &nodes {
            while !n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok") {
                assert!(Instant::now() < deadline, "cluster did not become ok");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Cluster { nodes }
    }

    pub fn url(&self) -> String {
        let mut url = format!("redis-cluster://127.0.0.1:{}", self.nodes[0].port);
        for (i, n) in self.nodes.iter().enumerate().skip(1) {
            url.push(if i == 1 { '?' } else { '&' });
            url.push_str(&format!("node=127.0.0.1:{}", n.port));
        }
        url
    }

    /// The cluster id of node `i`.
    pub fn node_id(&self, i: usize) -> String {
        self.nodes[i].cli(&["CLUSTER", "MYID"]).trim().to_string()
    }

    /// Which node serves `slot`.
    pub fn owner_of(&self, slot: u16) -> usize {
        let nodes = self.nodes[0].cli(&["CLUSTER", "NODES"]);
        let owner = nodes
            .lines()
            .find(|l| {
                l.split_whitespace().skip(8).any(|r| {
                    let (a, b) = r.split_once('-').unwrap_or((r, r));
                    matches!((a.parse::<u16>(), b.parse::<u16>()), (Ok(a), Ok(b)) if a <= slot && slot <= b)
                })
            })
            .and_then(|l| l.split_whitespace().next())
            .expect("an owner for the slot")
            .to_string();
        (0..self.nodes.len())
            .find(|&i| self.node_id(i) == owner)
            .expect("owner among our nodes")
    }

    /// Moves `slot` with its keys from its owner to node `to`, the way `redis-cli --cluster
    /// reshard` does: importing / migrating, MIGRATE of every key, then the new owner
    /// announced to every node.
    pub fn migrate_slot(&self, slot: u16, to: usize) {
        let from = self.owner_of(slot);
        assert_ne!(from, to);
        let (from_id, to_id) = (self.node_id(from), self.node_id(to));
        let s = slot.to_string();
        self.nodes[to].cli(&["CLUSTER", "SETSLOT", &s, "IMPORTING", &from_id]);
        self.nodes[from].cli(&["CLUSTER", "SETSLOT", &s, "MIGRATING", &to_id]);
        loop {
            let keys = self.nodes[from].cli(&["CLUSTER", "GETKEYSINSLOT", &s, "100"]);
            let keys: Vec<&str> = keys.split_whitespace().collect();
            if keys.is_empty() {
                break;
            }
            let port = self.nodes[to].port.to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
            args.extend(keys);
            let out = self.nodes[from].cli(&args);
            assert!(out.contains("OK"), "MIGRATE: {out}");
        }
        for i in [to, from]
            .into_iter()
            .chain((0..self.nodes.len()).filter(|&i| i != to && i != from))
        {
            self.nodes[i].cli(&["CLUSTER", "SETSLOT", &s, "NODE", &to_id]);
        }
        assert_eq!(self.owner_of(slot), to, "the slot moved");
    }

    /// A cluster connection for the publisher helpers.
    pub async fn conn(&self) -> redis::cluster_async::ClusterConnection {
        let urls: Vec<String> = self.nodes.iter().map(|n| n.url()).collect();
        redis::cluster::ClusterClient::new(urls)
            .expect("cluster client")
            .get_async_connection()
            .await
            .expect("connect")
    }
}

/// A primary, a replica of it, and one sentinel (quorum 1) that watches them as `main` and
/// fails over when the primary is gone for a second. Dropping it stops all three.
pub struct SentinelSet {
    pub primary: Redis,
    pub replica: Redis,
    sentinel: Option<Child>,
    pub sentinel_port: u16,
    dir: PathBuf,
}

impl SentinelSet {
    /// Starts the three and waits until the sentinel sees the replica connected to the
    /// primary (it learns of replicas from the primary, up to ten seconds after it starts).
    pub fn start() -> SentinelSet {
        let primary = Redis::start();
        let port = primary.port.to_string();
        let replica = Redis::start_with(&["--replicaof", "127.0.0.1", &port]);
        let dir = scratch("sentinel");
        let sentinel_port = free_port();
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {sentinel_port}\nbind 127.0.0.1\ndir {}\n\
                 sentinel monitor main 127.0.0.1 {port} 1\n\
                 sentinel down-after-milliseconds main 1000\n\
                 sentinel failover-timeout main 5000\n",
                dir.display()
            ),
        )
        .expect("sentinel.conf");
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server --sentinel");
        let set = SentinelSet {
            primary,
            replica,
            sentinel: Some(child),
            sentinel_port,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let info = cli(sentinel_port, &["SENTINEL", "replicas", "main"]);
            let fields: Vec<&str> = info.lines().map(str::trim).collect();
            let value = |key: &str| {
                fields
                    .iter()
                    .position(|l| *l == key)
                    .and_then(|i| fields.get(i + 1).copied())
            };
            if value("flags") == Some("slave") && value("master-link-status") == Some("ok") {
                return set;
            }
            assert!(
                Instant::now() < deadline,
                "the sentinel never saw the replica connected: {info}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The URL a hub is given: the sentinel, and the service name.
    pub fn url(&self) -> String {
        format!(
            "redis-sentinel://127.0.0.1:{}/0?sentinelServiceName=main",
            self.sentinel_port
        )
    }

    /// The port of the server the sentinel names primary now.
    pub fn primary_port(&self) -> Option<u16> {
        let out = cli(
            self.sentinel_port,
            &["SENTINEL", "get-master-addr-by-name", "main"],
        );
        out.lines().nth(1)?.trim().parse().ok()
    }
}

impl Drop for SentinelSet {
    fn drop(&mut self) {
        if let Some(mut c) = self.sentinel.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

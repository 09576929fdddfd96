//! A real nginx for the tests, running `deploy/nginx/hub.conf` with its upstreams and listen
//! address moved to loopback ports; stopped by PID when dropped.

use crate::redis_server::{free_port, scratch};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The repository's root folder.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

pub struct Nginx {
    child: Child,
    pub addr: SocketAddr,
    dir: PathBuf,
}

impl Nginx {
    /// Runs `deploy/nginx/hub.conf` with `hub1:8080`, `hub2:8080` replaced by `upstreams` and
    /// its `listen 8080` by a free loopback port.
    pub fn start_hub_conf(upstreams: [SocketAddr; 2]) -> Nginx {
        let conf = std::fs::read_to_string(repo_root().join("deploy/nginx/hub.conf"))
            .expect("deploy/nginx/hub.conf");
        let port = free_port();
        for needle in ["server hub1:8080", "server hub2:8080", "listen 8080;"] {
            assert!(conf.contains(needle), "hub.conf no longer has {needle:?}");
        }
        let conf = conf
            .replace("server hub1:8080", &format!("server {}", upstreams[0]))
            .replace("server hub2:8080", &format!("server {}", upstreams[1]))
            .replace("listen 8080;", &format!("listen 127.0.0.1:{port};"));
        Nginx::start(&conf, port)
    }

    /// Runs nginx with `http_conf` inside its `http {}` block; it must listen on `port`.
    pub fn start(http_conf: &str, port: u16) -> Nginx {
        let dir = scratch("nginx");
        let d = dir.display();
        std::fs::write(dir.join("hub.conf"), http_conf).expect("write hub.conf");
        let main = format!(
            "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n\
             proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n\
             scgi_temp_path {d}/scgi;\n  include {d}/hub.conf;\n}}\n"
        );
        std::fs::write(dir.join("nginx.conf"), main).expect("write nginx.conf");
        let bin = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or("nginx");
        let check = Command::new(bin)
            .args(["-t", "-p"])
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .output()
            .expect("run nginx -t (scripts/test.sh installs nginx)");
        assert!(
            check.status.success(),
            "nginx -t refused the configuration:\n{}",
            String::from_utf8_lossy(&check.stderr)
        );
        let child = Command::new(bin)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "nginx did not listen on {addr}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Nginx { child, addr, dir }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// nginx's error log (upstream failures and retries are logged there).
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGQUIT would wait for open streams; TERM is nginx's fast shutdown.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

//! A real browser for the tests: headless Chromium in its own process group, and the page's
//! origin, a tiny HTTP server that serves one page and collects what the page reports.

use serde_json::Value;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the page posted to `/report`, in arrival order.
pub type Reports = Arc<Mutex<Vec<Value>>>;

/// The page's origin: serves the page at `/` and collects `POST /report` bodies.
pub async fn page_server(listener: tokio::net::TcpListener, page: String, reports: Reports) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            return;
        };
        let page = page.clone();
        let reports = reports.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let (head_end, len) = loop {
                let Ok(n) = sock.read(&mut chunk).await else {
                    return;
                };
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&chunk[..n]);
                if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    break (end + 4, len);
                }
            };
            while buf.len() < head_end + len {
                match sock.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let answer = if buf.starts_with(b"POST /report ") {
                if let Ok(v) = serde_json::from_slice::<Value>(&buf[head_end..head_end + len]) {
                    reports.lock().expect("reports lock").push(v);
                }
                "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n".to_string()
            } else if buf.starts_with(b"GET / ") {
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{page}",
                    page.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into()
            };
            let _ = sock.write_all(answer.as_bytes()).await;
        });
    }
}

/// Headless Chromium in its own session and process group, stopped (with its helpers) when
/// dropped.
pub struct Chromium {
    child: Child,
    /// Its profile folder (where `--remote-debugging-port=0` writes `DevToolsActivePort`).
    pub profile: std::path::PathBuf,
}

impl Chromium {
    /// Opens `url` with the usual headless flags and `extra` ones.
    pub fn open(url: &str, extra: &[&str]) -> Chromium {
        // A profile per browser: tests of one binary run at once.
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let profile = std::env::temp_dir().join(format!("hub-chromium-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&profile);
        let log = std::fs::File::create(profile.with_extension("log")).expect("chromium log file");
        // `setsid` gives the browser a session and process group of its own (same pid), away
        // from the terminal and the test runner's group.
        let child = Command::new("setsid")
            .arg("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--disable-crash-reporter",
            ])
            .args(extra)
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(url)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start chromium (scripts/test.sh installs the Debian package)");
        Chromium { child, profile }
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        // The browser and its helpers share the process group we gave it (`--` so that the
        // negative group id is not read as an option).
        let pgid = format!("-{}", self.child.id());
        let group = |sig: &str| {
            let _ = Command::new("kill")
                .args([sig, "--", pgid.as_str()])
                .status();
        };
        group("-TERM");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        group("-KILL");
        let _ = self.child.wait();
    }
}

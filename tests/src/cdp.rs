//! The Chrome DevTools Protocol, as much as a test needs to drive a page in the real browser
//! (navigate, evaluate, emulate a phone's screen, take a screenshot) and to collect every error
//! the page reports (exceptions, `console.error`, failed loads, CSP refusals).

use crate::browser::Chromium;
use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Socket = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// One page of a Chromium started with `--remote-debugging-port=0`.
pub struct Cdp {
    ws: Socket,
    next: u64,
    /// What the page reported as errors, in order.
    pub errors: Vec<String>,
}

/// Longest wait for the browser to answer a command.
const ANSWER: Duration = Duration::from_secs(20);

impl Cdp {
    /// Attaches to the browser's first page, with runtime, log and page events on.
    pub async fn attach(browser: &Chromium) -> Cdp {
        let file = browser.profile.join("DevToolsActivePort");
        let deadline = Instant::now() + ANSWER;
        let port = loop {
            if let Some(port) = std::fs::read_to_string(&file)
                .ok()
                .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<u16>().ok()))
            {
                break port;
            }
            assert!(
                Instant::now() < deadline,
                "Chromium wrote no DevToolsActivePort"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        crate::install_crypto();
        let http = reqwest::Client::new();
        let url = loop {
            let list: Vec<Value> = match http
                .get(format!("http://127.0.0.1:{port}/json/list"))
                .send()
                .await
            {
                Ok(r) => r.json().await.unwrap_or_default(),
                Err(_) => Vec::new(),
            };
            if let Some(url) = list
                .iter()
                .find(|t| t["type"] == "page")
                .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            {
                break url.to_string();
            }
            assert!(Instant::now() < deadline, "Chromium shows no page target");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .expect("connect to the page's DevTools socket");
        let mut cdp = Cdp {
            ws,
            next: 1,
            errors: Vec::new(),
        };
        for domain in ["Runtime.enable", "Log.enable", "Page.enable"] {
            cdp.call(domain, json!({})).await;
        }
        cdp
    }

    /// Sends a command and returns its result (events meanwhile are kept).
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next;
        self.next += 1;
        let text = json!({"id": id, "method": method, "params": params}).to_string();
        self.ws
            .send(Message::Text(text.into()))
            .await
            .expect("send a DevTools command");
        let deadline = tokio::time::Instant::now() + ANSWER;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("no answer to {method}"))
                .expect("the DevTools socket closed")
                .expect("the DevTools socket failed");
            let Message::Text(text) = msg else { continue };
            let v: Value = serde_json::from_str(text.as_str()).expect("DevTools sends JSON");
            if v["id"].as_u64() == Some(id) {
                assert!(v["error"].is_null(), "{method} failed: {}", v["error"]);
                return v["result"].clone();
            }
            self.event(&v);
        }
    }

    fn event(&mut self, v: &Value) {
        let p = &v["params"];
        match v["method"].as_str() {
            Some("Runtime.exceptionThrown") => self.errors.push(format!(
                "exception: {} {}",
                p["exceptionDetails"]["text"], p["exceptionDetails"]["exception"]["description"]
            )),
            Some("Runtime.consoleAPICalled") if p["type"] == "error" => {
                self.errors.push(format!("console.error: {}", p["args"]))
            }
            Some("Log.entryAdded") if p["entry"]["level"] == "error" => self
                .errors
                .push(format!("log: {} {}", p["entry"]["text"], p["entry"]["url"])),
            _ => {}
        }
    }

    /// Evaluates `expr` in the page (awaiting a promise) and returns its value.
    pub async fn eval(&mut self, expr: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        assert!(
            r["exceptionDetails"].is_null(),
            "{expr} threw: {}",
            r["exceptionDetails"]
        );
        r["result"]["value"].clone()
    }

    /// Evaluates `expr` until it is `true`, within `within`; panics with `what` otherwise.
    pub async fn wait_for(&mut self, expr: &str, within: Duration, what: &str) {
        let deadline = Instant::now() + within;
        loop {
            if self.eval(expr).await == Value::Bool(true) {
                return;
            }
            assert!(Instant::now() < deadline, "{what} (within {within:?})");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Loads `url` and waits until the document is complete.
    pub async fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url})).await;
        self.wait_for(
            &format!(
                "location.href.startsWith({}) && document.readyState === 'complete'",
                json!(url)
            ),
            ANSWER,
            "the page loaded",
        )
        .await;
    }

    /// A phone's screen (`width` CSS pixels, touch, 3x pixels) or, with `None`, the desktop again.
    pub async fn phone(&mut self, width: Option<u32>) {
        match width {
            Some(w) => {
                self.call(
                    "Emulation.setDeviceMetricsOverride",
                    json!({"width": w, "height": 844, "deviceScaleFactor": 3, "mobile": true}),
                )
                .await;
            }
            None => {
                self.call("Emulation.clearDeviceMetricsOverride", json!({}))
                    .await;
            }
        }
    }

    /// Writes a PNG of the page as it is shown to `path`.
    pub async fn screenshot(&mut self, path: &std::path::Path) {
        let r = self
            .call(
                "Page.captureScreenshot",
                json!({"format": "png", "captureBeyondViewport": true}),
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().expect("screenshot data"))
            .expect("screenshot is base64");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("artefact folder");
        }
        std::fs::write(path, png).expect("write the screenshot");
    }
}

//! A node started in-process with `hub::run` on listeners the test bound, and stopped by the
//! shutdown future it was given: it serves health and a stream, tells the stream why it ends,
//! and returns.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use clap::Parser;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

fn request(addr: SocketAddr, path: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: hub\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    s
}

/// Reads until `needle` has arrived; returns everything read.
fn read_until(s: &mut TcpStream, needle: &str) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains(needle) {
        let n = s.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "ended before {needle:?}: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[test]
fn a_node_runs_in_process_until_its_shutdown_future_resolves() {
    let config = hub::Config::try_parse_from([
        "hub",
        "--bind",
        "127.0.0.1:0",
        "--admin-bind",
        "127.0.0.1:0",
        "--drain-secs",
        "0",
    ])
    .unwrap();
    let listeners = hub::Listeners::bind(&config).unwrap();
    let public = listeners.public.local_addr().unwrap();
    let admin = listeners.admin.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let node = std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(hub::run(config, listeners, async {
            let _ = stopped.await;
        }))
    });

    let mut health = request(admin, "/healthz");
    assert!(read_until(&mut health, "\r\n").starts_with("HTTP/1.1 200"));
    let mut stream = request(public, "/v1/sse?channel=public:in-process");
    read_until(&mut stream, "event: hub.connected");

    stop.send(()).unwrap();
    let rest = read_until(&mut stream, "event: hub.reconnect");
    assert!(rest.contains(r#""reason":"shutdown""#), "{rest}");
    node.join().unwrap().unwrap();
}

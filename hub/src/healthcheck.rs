//! `hub healthcheck`: asks the hub on this host for `/healthz` on its admin port and exits 0 only
//! on a 200, for container health checks in images without curl. It does not start a node and
//! reads nothing but `HUB_ADMIN_BIND`.

use crate::config::DEFAULT_ADMIN_BIND;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(2);

/// The address to ask: `HUB_ADMIN_BIND` (default 127.0.0.1:9090), with an unspecified address
/// (0.0.0.0, ::) replaced by the loopback address of its family.
pub fn target(admin_bind: Option<&str>) -> Result<SocketAddr, String> {
    let text = admin_bind.unwrap_or(DEFAULT_ADMIN_BIND);
    let mut addr: SocketAddr = text
        .parse()
        .map_err(|e| format!("HUB_ADMIN_BIND {text:?}: {e}"))?;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    Ok(addr)
}

fn probe(addr: SocketAddr) -> std::io::Result<Option<String>> {
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut buf = [0u8; 128];
    let n = s.read(&mut buf)?;
    let head = String::from_utf8_lossy(&buf[..n]);
    let status = head.split(' ').nth(1).unwrap_or("").to_string();
    Ok((status != "200").then_some(status))
}

/// Runs the check and prints one line on failure.
pub fn main() -> ExitCode {
    let bind = std::env::var("HUB_ADMIN_BIND").ok();
    let addr = match target(bind.as_deref()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("hub healthcheck: {e}");
            return ExitCode::from(2);
        }
    };
    match probe(addr) {
        Ok(None) => ExitCode::SUCCESS,
        Ok(Some(status)) => {
            eprintln!("hub healthcheck: http://{addr}/healthz answered {status:?}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("hub healthcheck: http://{addr}/healthz: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_addresses_become_loopback() {
        assert_eq!(
            target(Some("0.0.0.0:9090")).unwrap(),
            "127.0.0.1:9090".parse().unwrap()
        );
        assert_eq!(target(Some("[::]:1")).unwrap(), "[::1]:1".parse().unwrap());
        assert_eq!(target(None).unwrap(), "127.0.0.1:9090".parse().unwrap());
        assert!(target(Some("nowhere")).is_err());
    }
}

//! A network namespace joined to this host by a veth link, for a client that must vanish: its
//! link goes down, so the hub gets neither a FIN nor an RST, only silence. Link-local
//! addresses on a link that exists only between this host and the namespace; needs root and
//! iproute2; removed on drop.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

pub struct NetNs {
    pub name: String,
    host_if: String,
    peer_if: String,
    /// This host's end of the link (where the hub listens).
    pub host_addr: Ipv4Addr,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl NetNs {
    pub fn create() -> NetNs {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}{n}", std::process::id() % 100_000);
        let ns = NetNs {
            name: format!("hubt{id}"),
            host_if: format!("hh{id}"),
            peer_if: format!("hp{id}"),
            host_addr: Ipv4Addr::new(169, 254, 100 + (n % 100) as u8, 1),
        };
        let peer_addr = Ipv4Addr::new(169, 254, 100 + (n % 100) as u8, 2);
        ip(&["netns", "add", &ns.name]);
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns.peer_if,
        ]);
        ip(&["link", "set", &ns.peer_if, "netns", &ns.name]);
        ip(&[
            "addr",
            "add",
            &format!("{}/30", ns.host_addr),
            "dev",
            &ns.host_if,
        ]);
        ip(&["link", "set", &ns.host_if, "up"]);
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &ns.name, "ip"];
            all.extend_from_slice(args);
            ip(&all);
        };
        inside(&[
            "addr",
            "add",
            &format!("{peer_addr}/30"),
            "dev",
            &ns.peer_if,
        ]);
        inside(&["link", "set", &ns.peer_if, "up"]);
        inside(&["link", "set", "lo", "up"]);
        ns
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Takes the namespace's end of the link down: its processes keep their sockets, and
    /// nothing they send or would answer reaches this host any more.
    pub fn cut(&self) {
        ip(&[
            "netns",
            "exec",
            &self.name,
            "ip",
            "link",
            "set",
            &self.peer_if,
            "down",
        ]);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

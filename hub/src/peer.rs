//! What the kernel knows about a stream's peer: whether it still acknowledges what the hub
//! sends. A client that vanished without a FIN or RST (a phone that lost its network) leaves
//! data unacknowledged; one that only stopped reading keeps acknowledging, with its window
//! closed. Only this module reads sockets' kernel state; it never reads or writes their data.
//!
//! One `getsockopt(TCP_INFO)` per stream and heartbeat. No well-kept crate exposes it safely
//! (socket2 does not), so the call is made here, on the socket's descriptor number recorded
//! when the public port accepted the connection. Checked only while the stream is open, that number
//! still names its socket (the stream ends when its connection is dropped); if a check races
//! with that drop, what it decides concerns a stream that is closing anyway.

#![allow(unsafe_code)] // getsockopt(TCP_INFO): two calls, each explained below.

use std::os::fd::RawFd;

/// The socket of a public connection, recorded at accept (by [`crate::server::front`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerSocket(pub RawFd);

/// Whether the peer has vanished: data is unacknowledged and nothing was acknowledged for
/// `silent_ms`. `false` when the socket cannot be read (not a TCP socket any more).
pub fn vanished(socket: PeerSocket, silent_ms: u32) -> bool {
    // SAFETY: `tcp_info` is a C struct of plain integers; all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the pointer and length describe `info`, which outlives the call; the kernel
    // writes at most `len` bytes and reports how many. A descriptor that is no longer a TCP
    // socket makes the call fail, which is handled.
    let rc = unsafe {
        libc::getsockopt(
            socket.0,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    rc == 0 && info.tcpi_unacked > 0 && info.tcpi_last_ack_recv >= silent_ms
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    #[test]
    fn a_peer_that_acknowledges_has_not_vanished() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        s.write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf).unwrap();
        assert!(!vanished(PeerSocket(s.as_raw_fd()), 0));
        // Not a socket at all: not vanished (the call fails).
        let f = std::fs::File::open("/dev/null").unwrap();
        assert!(!vanished(PeerSocket(f.as_raw_fd()), 0));
    }
}

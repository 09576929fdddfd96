//! The last steps of a client connection the hub is done with or waiting on: write a whole
//! answer and close, and notice a client that leaves (what it sends meanwhile is read and
//! dropped, up to [`MAX_DISCARD`]). No policy and no state: callers decide what to answer.

use bytes::BytesMut;
use std::io;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Bytes a client may send that are read and dropped (after a stream's request, or while its
/// answer waits) before its connection is closed as an error. EventSource sends nothing; the
/// bytes are read so that a close is seen at once, and bounded so that a client cannot keep
/// the node reading for ever.
pub const MAX_DISCARD: usize = 64 * 1024;
/// Seconds an answer may take to be written before the connection is dropped.
const ANSWER_SECS: u64 = 5;

/// Writes a whole answer (within [`ANSWER_SECS`]) and closes the connection. The answer's last
/// segment waits (corked) for the shutdown, which sends it with the FIN: one packet fewer for
/// each refusal, which a flood makes by the thousand.
pub async fn send_and_close(mut io: TcpStream, answer: &[u8]) {
    let _ = socket2::SockRef::from(&io).set_tcp_cork(true);
    let _ = tokio::time::timeout(Duration::from_secs(ANSWER_SECS), async {
        io.write_all(answer).await?;
        io.shutdown().await
    })
    .await;
}

/// Resolves when the client closes or resets the connection, or sends more than
/// [`MAX_DISCARD`] bytes.
/// What it sends meanwhile is dropped, or kept in `keep`.
pub async fn client_gone(io: &TcpStream, mut keep: Option<&mut BytesMut>) {
    let mut read = 0;
    loop {
        if io.readable().await.is_err() {
            return;
        }
        let mut scratch = [0u8; 512];
        match io.try_read(&mut scratch) {
            Ok(0) => return,
            Ok(n) => {
                read += n;
                if read > MAX_DISCARD {
                    return;
                }
                if let Some(keep) = keep.as_deref_mut() {
                    keep.extend_from_slice(&scratch[..n]);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

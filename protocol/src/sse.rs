//! Server-Sent Events framing, byte for byte.
//!
//! Builds frames into a caller's buffer so that a message is framed once and shared. It does not
//! decide ids or event names; callers must pass ids and event names free of CR and LF (the
//! envelope parser guarantees that for event names).

use bytes::BytesMut;

/// The heartbeat: an SSE comment. EventSource ignores it; proxies and the kernel see traffic.
pub const HEARTBEAT: &[u8] = b":\n\n";

/// Appends `retry: <ms>\n`.
pub fn write_retry(buf: &mut BytesMut, ms: u64) {
    buf.extend_from_slice(b"retry: ");
    buf.extend_from_slice(ms.to_string().as_bytes());
    buf.extend_from_slice(b"\n");
}

/// Appends `id: <id>\n`.
pub fn write_id(buf: &mut BytesMut, id: &str) {
    debug_assert!(!id.contains(['\r', '\n', '\0']));
    buf.extend_from_slice(b"id: ");
    buf.extend_from_slice(id.as_bytes());
    buf.extend_from_slice(b"\n");
}

/// Appends an `event:` line (omitted for `None` and for `message`, EventSource's default), the
/// data as `data:` lines split on CR, LF and CRLF, and the blank line that ends the event.
pub fn write_event(buf: &mut BytesMut, event: Option<&str>, data: &str) {
    if let Some(name) = event.filter(|e| *e != "message") {
        debug_assert!(!name.contains(['\r', '\n']));
        buf.extend_from_slice(b"event: ");
        buf.extend_from_slice(name.as_bytes());
        buf.extend_from_slice(b"\n");
    }
    write_data(buf, data);
    buf.extend_from_slice(b"\n");
}

/// Appends `data: <line>\n` for every line of `data`, splitting on CRLF, CR and LF.
/// An empty string still produces one `data: ` line.
pub fn write_data(buf: &mut BytesMut, data: &str) {
    buf.reserve(data.len() + 8);
    let bytes = data.as_bytes();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\r' => {
                push_data_line(buf, &bytes[start..i]);
                i += if bytes.get(i + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                start = i;
            }
            b'\n' => {
                push_data_line(buf, &bytes[start..i]);
                i += 1;
                start = i;
            }
            _ => i += 1,
        }
    }
    push_data_line(buf, &bytes[start..]);
}

fn push_data_line(buf: &mut BytesMut, line: &[u8]) {
    buf.extend_from_slice(b"data: ");
    buf.extend_from_slice(line);
    buf.extend_from_slice(b"\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: Option<&str>, name: Option<&str>, data: &str) -> Vec<u8> {
        let mut b = BytesMut::new();
        if let Some(id) = id {
            write_id(&mut b, id);
        }
        write_event(&mut b, name, data);
        b.to_vec()
    }

    #[test]
    fn single_line_with_id_and_name() {
        assert_eq!(
            event(Some("5-0"), Some("chat"), "hi"),
            b"id: 5-0\nevent: chat\ndata: hi\n\n"
        );
    }

    #[test]
    fn message_name_is_omitted() {
        assert_eq!(event(None, Some("message"), "x"), b"data: x\n\n");
        assert_eq!(event(None, None, "x"), b"data: x\n\n");
    }

    #[test]
    fn splits_on_lf_cr_and_crlf() {
        assert_eq!(
            event(None, None, "a\nb\rc\r\nd"),
            b"data: a\ndata: b\ndata: c\ndata: d\n\n"
        );
    }

    #[test]
    fn trailing_and_empty_lines_are_kept() {
        assert_eq!(event(None, None, "a\n"), b"data: a\ndata: \n\n");
        assert_eq!(event(None, None, ""), b"data: \n\n");
        assert_eq!(event(None, None, "\r\n\r\n"), b"data: \ndata: \ndata: \n\n");
    }

    #[test]
    fn retry_and_heartbeat() {
        let mut b = BytesMut::new();
        write_retry(&mut b, 2500);
        assert_eq!(&b[..], b"retry: 2500\n");
        assert_eq!(HEARTBEAT, b":\n\n");
    }

    mod properties {
        use super::super::*;
        use bytes::BytesMut;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(10_000))]

            /// Whatever the data, an EventSource reading the frame gets it back with CR and CRLF
            /// turned into LF, and the frame is one event (it ends at its only blank line).
            #[test]
            fn data_survives_framing(data in "\\PC{0,60}|[a-z\r\n]{0,30}") {
                let mut buf = BytesMut::new();
                write_event(&mut buf, Some("e"), &data);
                let text = String::from_utf8(buf.to_vec()).unwrap();
                prop_assert!(text.ends_with("\n\n"));
                prop_assert_eq!(text.matches("\n\n").count(), 1);
                let lines: Vec<&str> = text[..text.len() - 2]
                    .split('\n')
                    .filter_map(|l| l.strip_prefix("data: "))
                    .collect();
                let want = data.replace("\r\n", "\n").replace('\r', "\n");
                prop_assert_eq!(lines.join("\n"), want);
            }
        }
    }
}

//! The Content-Length framing of JSON-RPC on the local socket: LSP's base protocol, the
//! framing `vscode-jsonrpc` and the other LSP-family libraries speak.
//!
//! Each message is a header section (`Content-Length: N`, possibly other headers such as
//! `Content-Type`, each line ending with CRLF, names case-insensitive), a blank line, then
//! exactly N bytes: one JSON-RPC message, the same one the newline-delimited encoding
//! carries on a line. A connection whose first byte is `C` speaks it.
//!
//! This module owns only the boundaries: finding a message in the bytes that arrived
//! ([`find_message`]), and turning a JSON line into a framed message ([`frame_line`]). It
//! never parses JSON ([`crate::jsonrpc`] does), and it never lets a client make the reader
//! buffer more than [`MAX_HEADER_LEN`] bytes of headers or [`MAX_MESSAGE_LEN`] of body.

use std::ops::Range;

use crate::MAX_MESSAGE_LEN;

/// The first byte of a Content-Length connection (the `C` of `Content-Length`).
pub const FIRST_BYTE: u8 = b'C';

/// The largest header section, its blank line included. LSP headers are a line or two; a
/// client that sends more without a blank line has lost its framing.
pub const MAX_HEADER_LEN: usize = 8 * 1024;

/// Why the bytes at the start of a Content-Length stream are not a message. None of these
/// can be recovered from: the next message's start is unknown, so the connection must be
/// closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// No blank line within [`MAX_HEADER_LEN`] bytes.
    #[error("the header section exceeds the {max}-byte limit without a blank line; end each header line with CRLF and the headers with an empty line")]
    HeaderTooLong {
        /// The limit.
        max: usize,
    },
    /// `Content-Length` announces more than [`MAX_MESSAGE_LEN`] bytes.
    #[error("Content-Length {len} exceeds the {max}-byte limit")]
    TooLarge {
        /// The announced length (saturated at `u64::MAX`).
        len: u64,
        /// The limit.
        max: usize,
    },
    /// A header line that cannot be read, or a header section without `Content-Length`.
    #[error("malformed header: {reason}; a message is `Content-Length: N`, CRLF, an empty line (CRLF), then N bytes of JSON")]
    Malformed {
        /// What is wrong.
        reason: String,
    },
}

fn malformed(reason: impl Into<String>) -> HeaderError {
    HeaderError::Malformed {
        reason: reason.into(),
    }
}

/// Finds the first message in `buf`: the range of its body, whose end is where the next
/// message starts. `Ok(None)` while the message is incomplete ("need more bytes"). A
/// malformed header line or an oversized length is reported as soon as its line is
/// complete, without waiting for the rest.
pub fn find_message(buf: &[u8]) -> Result<Option<Range<usize>>, HeaderError> {
    find_within(buf, MAX_HEADER_LEN, MAX_MESSAGE_LEN)
}

/// [`find_message`] with the limits as parameters, so tests can reach them with small
/// inputs.
fn find_within(
    buf: &[u8],
    max_header: usize,
    max_body: usize,
) -> Result<Option<Range<usize>>, HeaderError> {
    let window = &buf[..buf.len().min(max_header)];
    let mut line_start = 0;
    let mut content_length = None;
    loop {
        let Some(lf) = window[line_start..].iter().position(|&b| b == b'\n') else {
            if buf.len() >= max_header {
                return Err(HeaderError::HeaderTooLong { max: max_header });
            }
            return Ok(None);
        };
        let line_end = line_start + lf;
        let Some(line) = window[line_start..line_end].strip_suffix(b"\r") else {
            return Err(malformed("a header line ends with LF alone, not CRLF"));
        };
        let next = line_start + lf + 1;
        if line.is_empty() {
            let Some(len) = content_length else {
                return Err(malformed("the headers have no Content-Length"));
            };
            let body = next..next + len;
            return Ok((buf.len() >= body.end).then_some(body));
        }
        if let Some(len) = parse_header(line, max_body)? {
            if content_length.replace(len).is_some() {
                return Err(malformed("Content-Length is given twice"));
            }
        }
        line_start = next;
    }
}

/// Reads one header line (without its CRLF): `Some(len)` for `Content-Length`, `None` for
/// another well-formed header.
fn parse_header(line: &[u8], max_body: usize) -> Result<Option<usize>, HeaderError> {
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return Err(malformed(format!(
            "header line {:?} has no colon",
            String::from_utf8_lossy(line)
        )));
    };
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    // A header name is an HTTP token; whatever else is there is not a header.
    let is_token_byte = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b);
    if name.is_empty() || !name.iter().all(is_token_byte) {
        return Err(malformed(format!(
            "{:?} is not a header name",
            String::from_utf8_lossy(name)
        )));
    }
    let value = value.trim_ascii();
    if !value
        .iter()
        .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b))
    {
        return Err(malformed(format!(
            "the value of header {} holds control or non-ASCII bytes",
            String::from_utf8_lossy(name)
        )));
    }
    if !name.eq_ignore_ascii_case(b"content-length") {
        return Ok(None);
    }
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return Err(malformed(format!(
            "Content-Length {:?} is not a decimal number",
            String::from_utf8_lossy(value)
        )));
    }
    let len = value.iter().fold(0u64, |len, &digit| {
        len.saturating_mul(10)
            .saturating_add(u64::from(digit - b'0'))
    });
    match usize::try_from(len) {
        Ok(len) if len <= max_body => Ok(Some(len)),
        _ => Err(HeaderError::TooLarge { len, max: max_body }),
    }
}

/// Turns the JSON line at `out[start..]` (one message, ending with `\n`, as
/// [`crate::jsonrpc`] writes it) into a Content-Length message in place.
pub fn frame_line(out: &mut Vec<u8>, start: usize) {
    if out.last() == Some(&b'\n') && out.len() > start {
        out.pop();
    }
    let header = format!("Content-Length: {}\r\n\r\n", out.len() - start);
    out.splice(start..start, header.into_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jsonrpc;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    fn framed(body: &[u8]) -> Vec<u8> {
        let mut out = body.to_vec();
        out.push(b'\n');
        frame_line(&mut out, 0);
        out
    }

    #[test]
    fn reads_what_vscode_jsonrpc_writes() {
        let body = br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;
        let mut bytes = format!("Content-Length: {}\r\n\r\n", body.len()).into_bytes();
        bytes.extend_from_slice(body);
        assert_eq!(framed(body), bytes);
        let range = find_message(&bytes).unwrap().unwrap();
        assert_eq!(&bytes[range.clone()], body);
        assert_eq!(range.end, bytes.len());
        assert_eq!(find_message(&bytes[..bytes.len() - 1]), Ok(None));
    }

    #[test]
    fn other_headers_and_any_case_are_accepted() {
        let bytes =
            b"content-type: application/vscode-jsonrpc; charset=utf-8\r\nCONTENT-LENGTH:2\r\n\r\n{}";
        assert_eq!(find_message(bytes), Ok(Some(bytes.len() - 2..bytes.len())));
    }

    #[test]
    fn bad_headers_are_named() {
        let cases: [(&[u8], &str); 6] = [
            (b"Content-Lenght 2\r\n\r\n{}", "has no colon"),
            (b"Content-Type: x\r\n\r\n{}", "no Content-Length"),
            (b"Content-Length: 2\n\n{}", "LF alone"),
            (b"Content-Length: two\r\n\r\n", "not a decimal number"),
            (
                b"Content-Length: 2\r\ncontent-length: 2\r\n\r\n{}",
                "given twice",
            ),
            (b"Content Length: 2\r\n\r\n{}", "not a header name"),
        ];
        for (bytes, what) in cases {
            let error = find_message(bytes).unwrap_err().to_string();
            assert!(error.contains(what), "{error}");
        }
        assert_eq!(
            find_message(b"Content-Length: 99999999999999999999999\r\n"),
            Err(HeaderError::TooLarge {
                len: u64::MAX,
                max: MAX_MESSAGE_LEN
            })
        );
        let long = vec![b'C'; MAX_HEADER_LEN];
        assert_eq!(
            find_message(&long),
            Err(HeaderError::HeaderTooLong {
                max: MAX_HEADER_LEN
            })
        );
        assert_eq!(find_message(&long[..MAX_HEADER_LEN - 1]), Ok(None));
    }

    /// Header lines as a client may write them: any case, any amount of blanks around the
    /// value, other headers before and after.
    fn any_header_section(len: usize) -> impl Strategy<Value = Vec<u8>> {
        (
            prop::collection::vec(any::<bool>(), 14),
            " {0,3}",
            proptest::option::of("[a-zA-Z0-9/;= -]{0,30}"),
            proptest::option::of("[a-zA-Z0-9/;= -]{0,30}"),
        )
            .prop_map(move |(upper, blanks, before, after)| {
                let name: String = "content-length"
                    .chars()
                    .zip(upper)
                    .map(|(c, up)| if up { c.to_ascii_uppercase() } else { c })
                    .collect();
                let mut section = String::new();
                if let Some(value) = before {
                    section += &format!("Content-Type: {}\r\n", value.trim());
                }
                section += &format!("{name}:{blanks}{len}{blanks}\r\n");
                if let Some(value) = after {
                    section += &format!("X-Other: {}\r\n", value.trim());
                }
                section + "\r\n"
            })
            .prop_map(String::into_bytes)
    }

    /// A request with any id and text, its body, and the whole message.
    fn any_framed_request() -> impl Strategy<Value = (i64, Vec<u8>, Vec<u8>)> {
        (any::<i64>(), any::<String>(), "[a-z/]{1,16}").prop_flat_map(|(id, text, method)| {
            let method = if method.len() % 2 == 0 { "send".to_owned() } else { method };
            let body = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": {"session": "s-0123456789abcdef", "text": text}})
                .to_string()
                .into_bytes();
            any_header_section(body.len()).prop_map(move |mut bytes| {
                bytes.extend_from_slice(&body);
                (id, body.clone(), bytes)
            })
        })
    }

    proptest! {
        /// Arbitrary bytes: no panic, and the decoder never asks for or looks at more than
        /// its limits allow.
        #[test]
        fn arbitrary_bytes_stay_within_the_limits(
            bytes in prop::collection::vec(any::<u8>(), 0..200),
            max_header in 1usize..64,
            max_body in 0usize..64,
        ) {
            match find_within(&bytes, max_header, max_body) {
                Ok(Some(body)) => {
                    prop_assert!(body.start <= max_header);
                    prop_assert!(body.len() <= max_body);
                    prop_assert!(body.end <= bytes.len());
                    // What follows the message does not change it.
                    prop_assert_eq!(find_within(&bytes[..body.end], max_header, max_body), Ok(Some(body.clone())));
                }
                // Waiting for more is only allowed while within the limits.
                Ok(None) => prop_assert!(bytes.len() < max_header + max_body),
                Err(HeaderError::HeaderTooLong { .. }) => prop_assert!(bytes.len() >= max_header),
                Err(_) => {}
            }
            // The verdict on a header section never depends on bytes past its limit,
            // unless the limit was not reached.
            if bytes.len() > max_header {
                let more: Vec<u8> = bytes.iter().copied().chain(bytes.iter().copied()).collect();
                match find_within(&bytes, max_header, max_body) {
                    Ok(None) => {}
                    verdict => {
                        let longer = find_within(&more, max_header, max_body);
                        prop_assert_eq!(longer, verdict);
                    }
                }
            }
        }

        /// Arbitrary bytes after a valid header: the body is exactly the announced bytes.
        #[test]
        fn arbitrary_bodies_are_cut_at_their_length(
            body in prop::collection::vec(any::<u8>(), 0..300),
            extra in prop::collection::vec(any::<u8>(), 0..50),
        ) {
            let mut bytes = framed(&body);
            let end = bytes.len();
            bytes.extend_from_slice(&extra);
            let range = find_message(&bytes).unwrap().unwrap();
            prop_assert_eq!(&bytes[range.clone()], &body[..]);
            prop_assert_eq!(range.end, end);
        }

        /// Any valid request, framed with any well-formed header section and cut anywhere,
        /// decodes to the same request once all of it has arrived.
        #[test]
        fn valid_messages_round_trip(
            (id, body, bytes) in any_framed_request(),
            cut in any::<prop::sample::Index>(),
        ) {
            let at = cut.index(bytes.len());
            prop_assert_eq!(find_message(&bytes[..at]), Ok(None));
            let range = find_message(&bytes).unwrap().unwrap();
            prop_assert_eq!(range.end, bytes.len());
            prop_assert_eq!(&bytes[range.clone()], &body[..]);
            // The same answer as the newline-delimited encoding gives its line, errors
            // (an unknown method) included.
            let decoded = jsonrpc::decode_request(&bytes[range]);
            prop_assert_eq!(&decoded, &jsonrpc::decode_request(&body));
            if let Ok(request) = decoded {
                prop_assert_eq!(request.id, Some(Value::from(id)));
            }
        }
    }
}

//! Fuzzes both JSON-RPC framings (the line splitter and the Content-Length header reader)
//! and the request decoder: any bytes give a request or an error with a message, never a
//! panic, and a Content-Length message never reaches past the input.
//! Run with `cargo +nightly fuzz run jsonrpc_decoder` from the repository root.
#![no_main]

use cloud_protocol::content_length::find_message;
use cloud_protocol::jsonrpc::{decode_request, find_line};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some(end)) = find_line(rest) {
        if let Err(e) = decode_request(&rest[..end]) {
            assert!(!e.error.message.is_empty());
        }
        rest = &rest[end + 1..];
    }
    let mut rest = data;
    while let Ok(Some(body)) = find_message(rest) {
        assert!(body.end <= rest.len());
        if let Err(e) = decode_request(&rest[body.clone()]) {
            assert!(!e.error.message.is_empty());
        }
        rest = &rest[body.end..];
    }
});

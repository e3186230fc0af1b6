//! Fuzzes the JSON-RPC line splitter and request decoder: any bytes give a request or an
//! error with a message, never a panic.
//! Run with `cargo +nightly fuzz run jsonrpc_decoder` from the repository root.
#![no_main]

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
});

//! Fuzzes the binary frame decoder the daemon runs on every byte a client sends: it must
//! never panic, never claim more bytes than it was given, and stop at the size limit.
//! Run with `cargo +nightly fuzz run frame_decoder` from the repository root.
#![no_main]

use cloud_protocol::frame::{decode, FrameError};
use cloud_protocol::ipc::ClientMessage;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    loop {
        match decode::<ClientMessage>(rest) {
            Ok(Some((_, used))) => {
                assert!(used >= 4 && used <= rest.len());
                rest = &rest[used..];
            }
            Ok(None) => break,
            Err(FrameError::Malformed { consumed, .. }) => {
                assert!(consumed <= rest.len());
                rest = &rest[consumed..];
            }
            Err(FrameError::TooLarge { len, .. }) => {
                assert!(len > cloud_protocol::MAX_MESSAGE_LEN);
                break;
            }
        }
    }
});

//! Fuzzes the decoder the daemon runs on every bridge message its relay sends: any bytes give
//! an envelope or an error, never a panic, and an envelope that decodes encodes again to
//! bytes that decode to the same envelope (so the daemon never holds a value it could not
//! store or forward).
//! Run with `cargo +nightly fuzz run bridge_from_relay` from the repository root.
#![no_main]

use cloud_protocol::bridge::{decode, encode, FromRelay};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(envelope) = decode::<FromRelay>(data) else {
        return;
    };
    let bytes = encode(&envelope).expect("a decoded envelope encodes");
    // postcard's encoding is canonical and ignores trailing bytes: the re-encoding is never
    // longer than what was decoded.
    assert!(bytes.len() <= data.len());
    assert_eq!(
        decode::<FromRelay>(&bytes).expect("a re-encoded envelope decodes"),
        envelope
    );
});

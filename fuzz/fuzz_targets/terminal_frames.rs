//! Fuzzes the terminal frame decoders the relay and the daemon run on every frame of a
//! shell (`session shell`): any bytes give a frame, "need more bytes" or an error, never a
//! panic, in both directions and both framings, and a frame that decodes encodes again to
//! one that decodes to the same frame.
//! Run with `cargo +nightly fuzz run terminal_frames` from the repository root.
#![no_main]

use cloud_protocol::terminal::{decode, decode_framed, encode, FromShell, ToShell};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = decode::<ToShell>(data) {
        let bytes = encode(&frame).expect("a decoded frame encodes");
        assert_eq!(decode::<ToShell>(&bytes).expect("it decodes again"), frame);
    }
    if let Ok(frame) = decode::<FromShell>(data) {
        let bytes = encode(&frame).expect("a decoded frame encodes");
        assert_eq!(decode::<FromShell>(&bytes).expect("it decodes again"), frame);
    }
    if let Ok(Some((_, used))) = decode_framed::<ToShell>(data) {
        assert!(used <= data.len());
    }
    let _ = decode_framed::<FromShell>(data);
});

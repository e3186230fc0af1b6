//! The terminal into a session (`cloudctl session shell ID`): the frames that carry a
//! shell's keystrokes, window size, output and exit status.
//!
//! The same frames cross two hops. Between the daemon and the relay, each is one binary
//! message of the shell socket ([`shell_path`], a WebSocket with the bridge's bearer
//! token); between a client and its daemon, after the `session/shell` reply, each is one
//! binary frame of the local socket ([`encode_framed`]: a u32 little-endian length, then
//! the body), both ways, until the shell exits. Bodies are postcard: [`ToShell`] from the
//! client, [`FromShell`] from the relay, at most [`MAX_TERMINAL_FRAME`] bytes each; senders
//! split input and output into chunks of at most [`MAX_CHUNK`] bytes.
//!
//! This module does no IO: it only turns frames into bytes and back, and refuses a frame
//! over the limit before parsing it.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The largest frame body, either way. A chunk of [`MAX_CHUNK`] bytes and its tag fit
/// with room to spare; anything larger is refused unread.
pub const MAX_TERMINAL_FRAME: usize = 64 * 1024;

/// The most bytes of input or output one frame carries.
pub const MAX_CHUNK: usize = 32 * 1024;

/// The size of the local-socket frame header (the body's length, u32 little-endian).
pub const HEADER_LEN: usize = 4;

/// The relay's shell socket of `session`, for a terminal of `size` running `TERM=term`
/// (query parameters `cols`, `rows` and `term`).
pub fn shell_path(session: &str, size: WindowSize, term: &str) -> String {
    let term: String = term
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+'))
        .collect();
    format!(
        "/v1/sessions/{session}/shell?cols={}&rows={}&term={term}",
        size.cols, size.rows
    )
}

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSize {
    /// Columns.
    pub cols: u16,
    /// Rows.
    pub rows: u16,
}

impl WindowSize {
    /// The size a terminal that cannot say gets: 80×24.
    pub const DEFAULT: WindowSize = WindowSize { cols: 80, rows: 24 };

    /// This size, or [`WindowSize::DEFAULT`]'s dimension where it is 0 (a terminal that
    /// reports no size).
    pub fn or_default(self) -> WindowSize {
        WindowSize {
            cols: if self.cols == 0 { 80 } else { self.cols },
            rows: if self.rows == 0 { 24 } else { self.rows },
        }
    }
}

/// What the client sends the shell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToShell {
    /// Bytes typed (or piped) into the shell's terminal, at most [`MAX_CHUNK`].
    Input(Vec<u8>),
    /// The client's terminal changed size: the relay sets the shell's terminal to it (the
    /// shell gets SIGWINCH).
    Resize(WindowSize),
}

/// What the relay sends the client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromShell {
    /// Bytes the shell's terminal wrote, at most [`MAX_CHUNK`].
    Output(Vec<u8>),
    /// The shell exited with this status (128 + the signal's number when a signal ended
    /// it); the last frame.
    Exit {
        /// The status.
        code: i32,
    },
    /// The shell was ended without a status of its own (the relay shuts down, the
    /// session was deleted, the credential revoked); the last frame. The reason is shown
    /// to the user.
    Ended {
        /// Why, in words.
        reason: String,
    },
}

/// Why a terminal frame could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TerminalError {
    /// The body is over [`MAX_TERMINAL_FRAME`]: refused unread (on the local socket the
    /// stream cannot be resynchronised after this).
    #[error("terminal frame of {len} bytes exceeds the {MAX_TERMINAL_FRAME}-byte limit")]
    TooLarge {
        /// The body's length.
        len: usize,
    },
    /// The body is not a frame of the expected direction.
    #[error("malformed terminal frame: {0}")]
    Malformed(String),
}

/// Encodes one frame's body (a shell socket message).
pub fn encode<T: Serialize>(frame: &T) -> Result<Vec<u8>, TerminalError> {
    let body = postcard::to_allocvec(frame).map_err(|e| TerminalError::Malformed(e.to_string()))?;
    if body.len() > MAX_TERMINAL_FRAME {
        return Err(TerminalError::TooLarge { len: body.len() });
    }
    Ok(body)
}

/// Decodes one frame's body: over the limit is refused before parsing, and bytes left
/// after the frame make it malformed.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, TerminalError> {
    if body.len() > MAX_TERMINAL_FRAME {
        return Err(TerminalError::TooLarge { len: body.len() });
    }
    match postcard::take_from_bytes::<T>(body) {
        Ok((frame, [])) => Ok(frame),
        Ok((_, rest)) => Err(TerminalError::Malformed(format!(
            "{} bytes after the frame",
            rest.len()
        ))),
        Err(e) => Err(TerminalError::Malformed(e.to_string())),
    }
}

/// Appends one frame to `out` in the local socket's framing (u32 LE length, body).
pub fn encode_framed<T: Serialize>(frame: &T, out: &mut Vec<u8>) -> Result<(), TerminalError> {
    let body = encode(frame)?;
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(())
}

/// The body of the local-socket frame at the start of `buf` and the bytes the frame takes,
/// `Ok(None)` while it is incomplete ("need more bytes"); the length is checked before any
/// body byte is waited for.
pub fn frame_body(buf: &[u8]) -> Result<Option<(&[u8], usize)>, TerminalError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes(header.try_into().expect("a 4-byte slice")) as usize;
    if len > MAX_TERMINAL_FRAME {
        return Err(TerminalError::TooLarge { len });
    }
    Ok(buf
        .get(HEADER_LEN..HEADER_LEN + len)
        .map(|body| (body, HEADER_LEN + len)))
}

/// Decodes the local-socket frame at the start of `buf`: the frame and the bytes it took,
/// or `Ok(None)` while it is incomplete.
pub fn decode_framed<T: DeserializeOwned>(buf: &[u8]) -> Result<Option<(T, usize)>, TerminalError> {
    match frame_body(buf)? {
        None => Ok(None),
        Some((body, used)) => decode(body).map(|frame| Some((frame, used))),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn frames_round_trip_in_both_framings() {
        let to = [
            ToShell::Input(b"echo $PWD\r".to_vec()),
            ToShell::Resize(WindowSize {
                cols: 100,
                rows: 40,
            }),
        ];
        let from = [
            FromShell::Output(vec![0, 255, 27, b'[']),
            FromShell::Exit { code: -1 },
            FromShell::Ended {
                reason: "the relay is shutting down".into(),
            },
        ];
        let mut stream = Vec::new();
        for frame in &to {
            assert_eq!(&decode::<ToShell>(&encode(frame).unwrap()).unwrap(), frame);
            encode_framed(frame, &mut stream).unwrap();
        }
        let mut position = 0;
        for frame in &to {
            let (decoded, used) = decode_framed::<ToShell>(&stream[position..])
                .unwrap()
                .unwrap();
            assert_eq!(&decoded, frame);
            position += used;
        }
        assert_eq!(position, stream.len());
        for frame in &from {
            assert_eq!(
                &decode::<FromShell>(&encode(frame).unwrap()).unwrap(),
                frame
            );
        }
    }

    /// The bytes documented in docs/PROTOCOL.md.
    #[test]
    fn the_documented_bytes() {
        assert_eq!(
            encode(&ToShell::Input(b"ls\r".to_vec())).unwrap(),
            [0, 3, b'l', b's', b'\r']
        );
        assert_eq!(
            encode(&ToShell::Resize(WindowSize {
                cols: 200,
                rows: 50
            }))
            .unwrap(),
            [1, 200, 1, 50]
        );
        assert_eq!(
            encode(&FromShell::Output(b"hi".to_vec())).unwrap(),
            [0, 2, b'h', b'i']
        );
        assert_eq!(encode(&FromShell::Exit { code: 3 }).unwrap(), [1, 6]);
        assert_eq!(
            encode(&FromShell::Ended { reason: "x".into() }).unwrap(),
            [2, 1, b'x']
        );
        let mut framed = Vec::new();
        encode_framed(&FromShell::Exit { code: 3 }, &mut framed).unwrap();
        assert_eq!(framed, [2, 0, 0, 0, 1, 6]);
    }

    #[test]
    fn an_oversized_frame_is_refused_unread() {
        let header = ((MAX_TERMINAL_FRAME + 1) as u32).to_le_bytes();
        assert_eq!(
            decode_framed::<ToShell>(&header),
            Err(TerminalError::TooLarge {
                len: MAX_TERMINAL_FRAME + 1
            })
        );
        let body = vec![0u8; MAX_TERMINAL_FRAME + 1];
        assert!(matches!(
            decode::<FromShell>(&body),
            Err(TerminalError::TooLarge { .. })
        ));
        assert!(matches!(
            encode(&FromShell::Output(vec![0; MAX_TERMINAL_FRAME])),
            Err(TerminalError::TooLarge { .. })
        ));
        // A chunk of the most a sender puts in one frame fits.
        encode(&ToShell::Input(vec![0; MAX_CHUNK])).unwrap();
    }

    #[test]
    fn a_partial_frame_needs_more_bytes() {
        let mut framed = Vec::new();
        encode_framed(&ToShell::Input(b"abc".to_vec()), &mut framed).unwrap();
        for cut in 0..framed.len() {
            assert_eq!(decode_framed::<ToShell>(&framed[..cut]), Ok(None));
        }
        assert!(decode::<ToShell>(&[0, 3, b'a', b'b', b'c', 9]).is_err());
    }

    proptest! {
        /// Any bytes give a frame, "need more bytes" or a clean error, never a panic, in
        /// either direction and either framing; a frame decoded is one that re-encodes.
        #[test]
        fn any_bytes_decode_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            if let Ok(frame) = decode::<ToShell>(&bytes) {
                prop_assert_eq!(decode::<ToShell>(&encode(&frame).unwrap()).unwrap(), frame);
            }
            if let Ok(frame) = decode::<FromShell>(&bytes) {
                prop_assert_eq!(decode::<FromShell>(&encode(&frame).unwrap()).unwrap(), frame);
            }
            if let Ok(Some((_, used))) = decode_framed::<ToShell>(&bytes) {
                prop_assert!(used <= bytes.len());
            }
            let _ = decode_framed::<FromShell>(&bytes);
        }

        /// Input and output of any bytes survive the trip.
        #[test]
        fn any_chunk_round_trips(chunk in proptest::collection::vec(any::<u8>(), 0..MAX_CHUNK)) {
            let mut framed = Vec::new();
            encode_framed(&FromShell::Output(chunk.clone()), &mut framed).unwrap();
            let (frame, used) = decode_framed::<FromShell>(&framed).unwrap().unwrap();
            prop_assert_eq!(frame, FromShell::Output(chunk));
            prop_assert_eq!(used, framed.len());
        }
    }
}

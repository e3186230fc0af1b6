//! The binary framing: a u32 little-endian body length, then a postcard body.
//!
//! [`decode`] is incremental: it looks at whatever bytes have arrived and says whether a
//! whole frame is there. A partial frame is not an error (`Ok(None)`, "need more bytes").
//! The length is checked against [`MAX_MESSAGE_LEN`] before any body byte is buffered.

use serde::{de::DeserializeOwned, Serialize};

use crate::MAX_MESSAGE_LEN;

/// The size of the length prefix.
pub const HEADER_LEN: usize = 4;

/// Why bytes could not be decoded into a frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The length prefix announces more than [`MAX_MESSAGE_LEN`] bytes. The stream cannot
    /// be resynchronised after this: the connection must be closed.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// The announced body length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The frame was complete but its body is not a valid message. The frame boundary is
    /// intact, so the reader can skip `consumed` bytes and carry on.
    #[error("malformed {len}-byte frame body: {reason}")]
    Malformed {
        /// The body length.
        len: usize,
        /// Bytes to skip (header and body) to reach the next frame.
        consumed: usize,
        /// What postcard said.
        reason: String,
    },
}

impl FrameError {
    /// Whether the reader can carry on after this error.
    pub fn is_recoverable(&self) -> bool {
        matches!(self, FrameError::Malformed { .. })
    }
}

/// Why a message could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The encoded body would exceed [`MAX_MESSAGE_LEN`].
    #[error("message of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// The encoded body length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// postcard refused the value.
    #[error("cannot encode message: {0}")]
    Postcard(#[from] postcard::Error),
}

/// Appends `message` as one frame to `out`.
pub fn encode<T: Serialize>(message: &T, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let body = postcard::to_allocvec(message)?;
    if body.len() > MAX_MESSAGE_LEN {
        return Err(EncodeError::TooLarge {
            len: body.len(),
            max: MAX_MESSAGE_LEN,
        });
    }
    out.reserve(HEADER_LEN + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(())
}

/// Encodes `message` as one frame in a new buffer.
pub fn encode_to_vec<T: Serialize>(message: &T) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    encode(message, &mut out)?;
    Ok(out)
}

/// How many bytes the frame at the start of `buf` occupies, once its header has arrived.
///
/// Returns `Ok(None)` while fewer than [`HEADER_LEN`] bytes are buffered, and an error as
/// soon as the header announces an oversized body.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, FrameError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes(header.try_into().expect("4-byte slice")) as usize;
    if len > MAX_MESSAGE_LEN {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_MESSAGE_LEN,
        });
    }
    Ok(Some(HEADER_LEN + len))
}

/// Decodes the frame at the start of `buf`.
///
/// Returns the message and the number of bytes it occupied, `Ok(None)` if the frame is not
/// complete yet, or an error (see [`FrameError::is_recoverable`]).
pub fn decode<T: DeserializeOwned>(buf: &[u8]) -> Result<Option<(T, usize)>, FrameError> {
    let Some(total) = frame_len(buf)? else {
        return Ok(None);
    };
    let Some(body) = buf.get(HEADER_LEN..total) else {
        return Ok(None);
    };
    match postcard::from_bytes::<T>(body) {
        Ok(message) => Ok(Some((message, total))),
        Err(e) => Err(FrameError::Malformed {
            len: body.len(),
            consumed: total,
            reason: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipc::{ClientMessage, Hello, Request, Response, ServerMessage};
    use proptest::prelude::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The wire bytes of protocol version 1 are pinned: a change here breaks every client
    /// and daemon of the other version, and must come with a protocol version bump.
    #[test]
    fn protocol_v1_bytes_are_stable() {
        let hello = ClientMessage {
            id: 1,
            request: Request::Hello(Hello {
                protocol: 1,
                client: "c".into(),
                client_version: "0".into(),
            }),
        };
        assert_eq!(
            hex(&encode_to_vec(&hello).unwrap()),
            "07000000010001016301".to_owned() + "30"
        );
        let ping = ClientMessage {
            id: 300,
            request: Request::Ping,
        };
        assert_eq!(hex(&encode_to_vec(&ping).unwrap()), "03000000ac0201");
        let pong = ServerMessage::Reply {
            id: 300,
            result: Ok(Response::Pong),
        };
        assert_eq!(hex(&encode_to_vec(&pong).unwrap()), "0500000000ac020001");
        let hello_reply = ServerMessage::Reply {
            id: 1,
            result: Ok(Response::Hello(crate::ipc::HelloReply {
                protocol: 1,
                daemon_version: "0".into(),
                pid: 2,
                supervisor: crate::ipc::Supervisor::Systemd,
                binary_replaced: false,
            })),
        };
        assert_eq!(
            hex(&encode_to_vec(&hello_reply).unwrap()),
            "0a00000000010000010130020100"
        );
    }

    #[test]
    fn partial_frames_need_more_bytes() {
        let bytes = encode_to_vec(&ClientMessage {
            id: 7,
            request: Request::Status,
        })
        .unwrap();
        for cut in 0..bytes.len() {
            assert_eq!(
                decode::<ClientMessage>(&bytes[..cut]),
                Ok(None),
                "cut at {cut}"
            );
        }
        let (message, used) = decode::<ClientMessage>(&bytes).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(message.id, 7);
    }

    #[test]
    fn oversized_length_is_refused_before_the_body_arrives() {
        let header = ((MAX_MESSAGE_LEN + 1) as u32).to_le_bytes();
        let err = decode::<ClientMessage>(&header).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }));
        assert!(!err.is_recoverable());
    }

    #[test]
    fn malformed_body_keeps_the_frame_boundary() {
        let mut bytes = vec![3, 0, 0, 0, 0xff, 0xff, 0xff];
        bytes.extend(
            encode_to_vec(&ClientMessage {
                id: 9,
                request: Request::Ping,
            })
            .unwrap(),
        );
        let err = decode::<ClientMessage>(&bytes).unwrap_err();
        let FrameError::Malformed { consumed, .. } = err else {
            panic!("expected malformed, got {err:?}");
        };
        assert_eq!(consumed, 7);
        let (next, _) = decode::<ClientMessage>(&bytes[consumed..])
            .unwrap()
            .unwrap();
        assert_eq!(next.id, 9);
    }

    fn any_request() -> impl Strategy<Value = Request> {
        prop_oneof![
            Just(Request::Ping),
            Just(Request::Status),
            Just(Request::Shutdown),
            (any::<u32>(), ".{0,20}", ".{0,20}").prop_map(|(protocol, client, client_version)| {
                Request::Hello(Hello {
                    protocol,
                    client,
                    client_version,
                })
            }),
        ]
    }

    proptest! {
        /// What is encoded decodes to the same message, whatever the split.
        #[test]
        fn requests_round_trip(id in any::<u64>(), request in any_request()) {
            let message = ClientMessage { id, request };
            let bytes = encode_to_vec(&message).unwrap();
            let (back, used) = decode::<ClientMessage>(&bytes).unwrap().unwrap();
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(back, message);
        }
    }
}

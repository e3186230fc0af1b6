//! The blob socket: a WebSocket of its own (at [`BLOBS_PATH`], with the bridge's bearer
//! token) that carries teleport's file contents beside the bridge, never inside its
//! ordered task stream, so a large push never delays a message or a permission answer.
//!
//! Every binary message is one postcard-encoded [`BlobMessage`] (requests from the daemon,
//! [`BlobReply`] from the relay), at most [`MAX_BLOB_MESSAGE`] bytes. Requests carry ids
//! and may be pipelined; replies echo the id, in request order. The relay checks every
//! blob against its id (blake3) before it stores it ([`BlobAnswer::Mismatched`] when one
//! fails), and stores blobs per org.

use serde::{Deserialize, Serialize};

use crate::teleport::ContentId;

/// Where the relay serves the blob socket.
pub const BLOBS_PATH: &str = "/v1/blobs";

/// The largest blob socket message, either way.
pub const MAX_BLOB_MESSAGE: usize = 16 * 1024 * 1024;

/// A batch is sent once it holds this many bytes of blobs (or the last blob is in).
pub const BATCH_BYTES: usize = 4 * 1024 * 1024;

/// The largest blob: a whole file up to [`crate::teleport::WHOLE_FILE_MAX`], or a chunk.
pub const MAX_BLOB: usize = crate::teleport::WHOLE_FILE_MAX as usize;

/// One blob and its id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blob {
    pub id: ContentId,
    /// As one run of bytes (`serde_bytes`), as postcard lays out any `Vec<u8>`, but copied
    /// at once rather than read and written a byte at a time through serde's sequence
    /// visitor (9% of the relay's CPU in a 200 MB push).
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
}

/// A request on the blob socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobMessage {
    pub id: u64,
    pub request: BlobRequest,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlobRequest {
    /// Store these blobs for `session`'s org.
    Put { session: String, blobs: Vec<Blob> },
    /// Send these blobs of `session`'s org (as many as fit one reply; ask again for the
    /// rest).
    Get {
        session: String,
        ids: Vec<ContentId>,
    },
    /// As `Put`, for blobs that are each a whole file of a push about to be committed to
    /// `session`: the relay may also write them beside the session's workspace, so that
    /// its commit moves them in rather than writing them then (the files arrive while the
    /// rest of the push is still being read and sent).
    PutFiles { session: String, blobs: Vec<Blob> },
}

/// The relay's answer to a [`BlobMessage`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobReply {
    pub id: u64,
    pub result: Result<BlobAnswer, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlobAnswer {
    /// How many of the blobs were new.
    Stored { new: u32 },
    /// The blobs asked for, in order, as many as fit; `missing` lists any the relay does
    /// not have.
    Blobs {
        blobs: Vec<Blob>,
        missing: Vec<ContentId>,
    },
    /// A blob of a put does not match its id (the daemon read a file that changed after
    /// it was hashed): nothing of the batch was stored. The daemon scans again; it does not
    /// hash what it reads for an upload itself, since this check is the relay's.
    Mismatched { id: ContentId },
}

/// Why a blob socket message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlobError {
    #[error("blob message of {len} bytes exceeds the {MAX_BLOB_MESSAGE}-byte limit")]
    TooLarge { len: usize },
    #[error("malformed blob message: {0}")]
    Malformed(String),
}

/// Decodes one blob socket message, refusing oversized ones before reading them.
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, BlobError> {
    if bytes.len() > MAX_BLOB_MESSAGE {
        return Err(BlobError::TooLarge { len: bytes.len() });
    }
    postcard::from_bytes(bytes).map_err(|e| BlobError::Malformed(e.to_string()))
}

/// A [`BlobMessage`] decoded in place: every blob's bytes borrowed from the message, so a
/// receiver that keeps them keeps slices of the buffer the message arrived in rather than
/// a copy of each (200 MB of copies in a 200 MB push). The same bytes on the wire.
#[derive(Debug, PartialEq, Eq, Deserialize)]
pub struct BlobMessageRef<'a> {
    pub id: u64,
    #[serde(borrow)]
    pub request: BlobRequestRef<'a>,
}

/// [`BlobRequest`], variant for variant, with borrowed blobs.
#[derive(Debug, PartialEq, Eq, Deserialize)]
pub enum BlobRequestRef<'a> {
    Put {
        session: String,
        #[serde(borrow)]
        blobs: Vec<BlobRef<'a>>,
    },
    Get {
        session: String,
        ids: Vec<ContentId>,
    },
    PutFiles {
        session: String,
        #[serde(borrow)]
        blobs: Vec<BlobRef<'a>>,
    },
}

/// A [`Blob`] whose bytes are borrowed.
#[derive(Debug, PartialEq, Eq, Deserialize)]
pub struct BlobRef<'a> {
    pub id: ContentId,
    pub bytes: &'a [u8],
}

impl BlobMessageRef<'_> {
    /// The message with its blobs copied out.
    pub fn to_owned(&self) -> BlobMessage {
        let blobs = |blobs: &[BlobRef<'_>]| {
            blobs
                .iter()
                .map(|b| Blob {
                    id: b.id,
                    bytes: b.bytes.to_vec(),
                })
                .collect()
        };
        let request = match &self.request {
            BlobRequestRef::Put { session, blobs: b } => BlobRequest::Put {
                session: session.clone(),
                blobs: blobs(b),
            },
            BlobRequestRef::Get { session, ids } => BlobRequest::Get {
                session: session.clone(),
                ids: ids.clone(),
            },
            BlobRequestRef::PutFiles { session, blobs: b } => BlobRequest::PutFiles {
                session: session.clone(),
                blobs: blobs(b),
            },
        };
        BlobMessage {
            id: self.id,
            request,
        }
    }
}

/// Decodes one blob socket request in place ([`BlobMessageRef`]), refusing oversized ones
/// before reading them.
pub fn decode_ref(bytes: &[u8]) -> Result<BlobMessageRef<'_>, BlobError> {
    if bytes.len() > MAX_BLOB_MESSAGE {
        return Err(BlobError::TooLarge { len: bytes.len() });
    }
    postcard::from_bytes(bytes).map_err(|e| BlobError::Malformed(e.to_string()))
}

/// Encodes one blob socket message.
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, BlobError> {
    let bytes = postcard::to_allocvec(message).map_err(|e| BlobError::Malformed(e.to_string()))?;
    if bytes.len() > MAX_BLOB_MESSAGE {
        return Err(BlobError::TooLarge { len: bytes.len() });
    }
    Ok(bytes)
}

/// Room left at the front of a [`PutWriter`]'s message for its id (a u64 varint).
const ID_ROOM: usize = 10;

/// A `Put` or `PutFiles` [`BlobMessage`] encoded as it is filled, so each blob's bytes are
/// read straight into the message: one copy of a push's bytes before the socket, where
/// building [`Blob`]s and then encoding them made two, and a fresh allocation per blob.
/// The bytes are exactly postcard's encoding of the message (tested), so the relay decodes
/// them as any other.
#[derive(Debug)]
pub struct PutWriter {
    buf: Vec<u8>,
    /// Blobs still to add (wrapped below zero by one too many).
    left: usize,
    /// Whether a blob's bytes were not as many as it announced.
    wrong_length: bool,
}

impl PutWriter {
    /// A put of `count` blobs (`bytes` in all) for `session`; `files`: a `PutFiles`.
    pub fn new(files: bool, session: &str, count: usize, bytes: usize) -> PutWriter {
        let mut buf = Vec::with_capacity(ID_ROOM + 30 + session.len() + count * 42 + bytes);
        buf.resize(ID_ROOM, 0);
        // The request's variant (its index in `BlobRequest`), then its fields in order.
        varint(&mut buf, if files { 2 } else { 0 });
        varint(&mut buf, session.len() as u64);
        buf.extend_from_slice(session.as_bytes());
        varint(&mut buf, count as u64);
        PutWriter {
            buf,
            left: count,
            wrong_length: false,
        }
    }

    /// Adds blob `id` of `len` bytes, which `fill` appends to the vector it is given
    /// (whose spare capacity has room for them: a reader that fills spare capacity, as
    /// `Read::read_to_end` does, never zeroes it first). A blob beyond the count given to
    /// [`PutWriter::new`], or a `fill` that appends other than `len` bytes, makes
    /// [`PutWriter::finish`] fail.
    pub fn push<E>(
        &mut self,
        id: ContentId,
        len: usize,
        fill: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
    ) -> Result<(), E> {
        self.left = self.left.wrapping_sub(1);
        self.buf.extend_from_slice(&id.0);
        varint(&mut self.buf, len as u64);
        let at = self.buf.len();
        self.buf.reserve(len);
        let filled = fill(&mut self.buf);
        if self.buf.len() != at + len {
            self.wrong_length = true;
            self.buf.resize(at + len, 0);
        }
        filled
    }

    /// The message, as request `id`: its bytes are `.0[.1..]`.
    pub fn finish(mut self, id: u64) -> Result<(Vec<u8>, usize), BlobError> {
        if self.left != 0 {
            return Err(BlobError::Malformed(
                "not as many blobs as the put announced".into(),
            ));
        }
        if self.wrong_length {
            return Err(BlobError::Malformed(
                "a blob not as long as the put announced".into(),
            ));
        }
        let mut head = Vec::with_capacity(ID_ROOM);
        varint(&mut head, id);
        let start = ID_ROOM - head.len();
        self.buf[start..ID_ROOM].copy_from_slice(&head);
        let len = self.buf.len() - start;
        if len > MAX_BLOB_MESSAGE {
            return Err(BlobError::TooLarge { len });
        }
        Ok((self.buf, start))
    }
}

/// Appends `n` as postcard writes an unsigned integer (LEB128).
fn varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

impl Blob {
    /// Whether the bytes are what the id says.
    pub fn verify(&self) -> bool {
        self.bytes.len() <= MAX_BLOB && ContentId::of(&self.bytes) == self.id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blob_is_laid_out_as_a_plain_byte_vector_is() {
        // Peers built before `serde_bytes` read and write the same bytes.
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct Plain {
            id: ContentId,
            bytes: Vec<u8>,
        }
        let bytes: Vec<u8> = (0..=255).cycle().take(70_000).collect();
        let blob = Blob {
            id: ContentId::of(&bytes),
            bytes: bytes.clone(),
        };
        let plain = Plain { id: blob.id, bytes };
        let encoded = postcard::to_allocvec(&blob).unwrap();
        assert_eq!(encoded, postcard::to_allocvec(&plain).unwrap());
        assert_eq!(postcard::from_bytes::<Plain>(&encoded).unwrap(), plain);
        let back: Blob = postcard::from_bytes(&postcard::to_allocvec(&plain).unwrap()).unwrap();
        assert_eq!(back, blob);
    }

    #[test]
    fn a_put_writers_message_is_postcards_encoding_of_the_same_put() {
        let sizes = [0usize, 1, 127, 128, 300, 16_384, 70_000];
        for files in [false, true] {
            for (count, id) in [(0usize, 0u64), (1, 1), (3, 127), (7, 128), (7, u64::MAX)] {
                let blobs: Vec<Blob> = (0..count)
                    .map(|n| {
                        let bytes: Vec<u8> = (0..sizes[n % sizes.len()])
                            .map(|b| (b * 7 + n) as u8)
                            .collect();
                        Blob {
                            id: ContentId::of(&bytes),
                            bytes,
                        }
                    })
                    .collect();
                let session = "s-0123456789abcdef";
                let total = blobs.iter().map(|b| b.bytes.len()).sum();
                let mut writer = PutWriter::new(files, session, count, total);
                for blob in &blobs {
                    writer
                        .push::<BlobError>(blob.id, blob.bytes.len(), |into| {
                            into.extend_from_slice(&blob.bytes);
                            Ok(())
                        })
                        .unwrap();
                }
                let (bytes, start) = writer.finish(id).unwrap();
                let session = session.to_owned();
                let request = if files {
                    BlobRequest::PutFiles { session, blobs }
                } else {
                    BlobRequest::Put { session, blobs }
                };
                let message = BlobMessage { id, request };
                assert_eq!(bytes[start..], encode(&message).unwrap()[..]);
                assert_eq!(decode::<BlobMessage>(&bytes[start..]).unwrap(), message);
            }
        }
        // The count is kept to.
        assert!(PutWriter::new(true, "s", 1, 0).finish(1).is_err());
        let mut writer = PutWriter::new(true, "s", 0, 0);
        writer
            .push::<BlobError>(ContentId::of(b""), 0, |_| Ok(()))
            .unwrap();
        assert!(writer.finish(1).is_err());
        // And so is each blob's length.
        for appended in [&b"ab"[..], b"abcd"] {
            let mut writer = PutWriter::new(true, "s", 1, 3);
            writer
                .push::<BlobError>(ContentId::of(b"abc"), 3, |into| {
                    into.extend_from_slice(appended);
                    Ok(())
                })
                .unwrap();
            assert!(writer.finish(1).is_err(), "{appended:?}");
        }
    }

    #[test]
    fn messages_round_trip_and_blobs_verify() {
        let blob = Blob {
            id: ContentId::of(b"hello"),
            bytes: b"hello".to_vec(),
        };
        assert!(blob.verify());
        let message = BlobMessage {
            id: 3,
            request: BlobRequest::Put {
                session: "s-1".into(),
                blobs: vec![blob.clone()],
            },
        };
        assert_eq!(
            decode::<BlobMessage>(&encode(&message).unwrap()).unwrap(),
            message
        );
        let forged = Blob {
            id: ContentId::of(b"other"),
            bytes: b"hello".to_vec(),
        };
        assert!(!forged.verify());
        assert_eq!(
            decode::<BlobMessage>(&vec![0; MAX_BLOB_MESSAGE + 1]),
            Err(BlobError::TooLarge {
                len: MAX_BLOB_MESSAGE + 1
            })
        );
    }
}

//! Content addressing: a file's bytes become a [`ContentId`] (blake3) and, past
//! [`WHOLE_FILE_MAX`], a list of FastCDC chunks (v2020, [`CHUNK_MIN`]/[`CHUNK_AVG`]/
//! [`CHUNK_MAX`]) each named by the blake3 of its bytes, so an edit moves only the chunks
//! it touches. Also the way back: where each blob of a manifest lies on disk
//! ([`blob_locations`]) and reading one, verified ([`read_blob`]), or unverified for an
//! upload whose receiver verifies it ([`read_span_into`]).
//!
//! Architecture invariant: a file is read once, front to back, with bounded memory (one
//! whole-file blob or one chunk at a time); a blob is only ever returned after its hash
//! was checked against the id asked for, except by [`read_span_into`], whose bytes go only to a
//! peer that checks them. This module never writes.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use cloud_protocol::blobs::MAX_BLOB;
use cloud_protocol::teleport::{
    Chunk, ContentId, EntryKind, Manifest, RelPath, CHUNK_AVG, CHUNK_MAX, CHUNK_MIN, MAX_CHUNKS,
    WHOLE_FILE_MAX,
};
use fastcdc::v2020::StreamCDC;

use crate::root::{Root, RootError};

/// A file's content: its size, its id, and its chunks when it is larger than
/// [`WHOLE_FILE_MAX`] (empty otherwise: the file is then the one blob `content`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileContent {
    pub size: u64,
    pub content: ContentId,
    pub chunks: Vec<Chunk>,
}

impl FileContent {
    /// The manifest entry of a file with this content.
    pub fn into_kind(self, executable: bool) -> EntryKind {
        EntryKind::File {
            executable,
            size: self.size,
            content: self.content,
            chunks: self.chunks,
        }
    }
}

/// Where one blob's bytes are: a byte range of a file of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobLocation {
    pub path: RelPath,
    pub offset: u64,
    pub len: u32,
}

/// Why content could not be hashed or a blob read.
#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error(transparent)]
    Root(#[from] RootError),
    /// The bytes at the blob's place no longer hash to its id: the file changed since it
    /// was scanned (scan again).
    #[error(
        "{path} changed since it was scanned (bytes {offset}..+{len} are not the blob asked for)"
    )]
    Changed {
        path: RelPath,
        offset: u64,
        len: u32,
    },
    #[error("a blob of {len} bytes is larger than the largest blob ({MAX_BLOB} bytes)")]
    TooLarge { len: u32 },
}

/// Opens `path` for reading without following a symlink in its last component, and
/// without blocking should a fifo have taken a file's place.
pub fn open_nofollow(path: &Path) -> io::Result<File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC);
    }
    options.open(path)
}

/// Hashes the regular file at `path` (opened with `O_NOFOLLOW`), reading it once.
pub fn hash_file(path: &Path) -> Result<FileContent, ContentError> {
    let read_error = |source| ContentError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = open_nofollow(path).map_err(read_error)?;
    let metadata = file.metadata().map_err(read_error)?;
    if !metadata.is_file() {
        return Err(ContentError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    hash_reader(file, metadata.len()).map_err(read_error)
}

/// Hashes everything `reader` yields, reading it once. `size_hint` (the file's size as
/// stat saw it) only sizes the first buffer: what counts is what is read.
pub fn hash_reader(mut reader: impl Read, size_hint: u64) -> io::Result<FileContent> {
    // Up to one byte past the whole-file limit tells a small file from a large one
    // without reading anything twice.
    let limit = WHOLE_FILE_MAX + 1;
    let mut head = Vec::with_capacity(size_hint.min(limit) as usize);
    (&mut reader).take(limit).read_to_end(&mut head)?;
    if head.len() as u64 <= WHOLE_FILE_MAX {
        return Ok(FileContent {
            size: head.len() as u64,
            content: ContentId::of(&head),
            chunks: Vec::new(),
        });
    }
    let mut whole = blake3::Hasher::new();
    let mut chunks = Vec::new();
    let mut size = 0u64;
    let source = io::Cursor::new(head).chain(reader);
    for chunk in StreamCDC::new(source, CHUNK_MIN, CHUNK_AVG, CHUNK_MAX) {
        let chunk = chunk.map_err(|e| match e {
            fastcdc::v2020::Error::IoError(e) => e,
            other => io::Error::other(format!("chunking failed: {other:?}")),
        })?;
        if chunks.len() == MAX_CHUNKS {
            return Err(io::Error::other(format!(
                "the file is too large to teleport (more than {MAX_CHUNKS} chunks)"
            )));
        }
        whole.update(&chunk.data);
        size += chunk.length as u64;
        chunks.push(Chunk {
            id: ContentId::of(&chunk.data),
            len: chunk.length as u32,
        });
    }
    Ok(FileContent {
        size,
        content: ContentId(*whole.finalize().as_bytes()),
        chunks,
    })
}

/// Where each blob `manifest` needs can be read: the first file (in path order) that
/// holds it, and the byte range.
pub fn blob_locations(manifest: &Manifest) -> HashMap<ContentId, BlobLocation> {
    let mut locations = HashMap::new();
    for (path, kind) in manifest.iter() {
        let EntryKind::File {
            size,
            content,
            chunks,
            ..
        } = kind
        else {
            continue;
        };
        if chunks.is_empty() {
            locations.entry(*content).or_insert_with(|| BlobLocation {
                path: path.clone(),
                offset: 0,
                len: *size as u32,
            });
            continue;
        }
        let mut offset = 0u64;
        for chunk in chunks {
            locations.entry(chunk.id).or_insert_with(|| BlobLocation {
                path: path.clone(),
                offset,
                len: chunk.len,
            });
            offset += u64::from(chunk.len);
        }
    }
    locations
}

/// Reads `len` bytes at `offset` of the file at `path` under `root` (never through a
/// symlink) and returns them if they hash to `expected`; [`ContentError::Changed`] if
/// they do not (or the file is now shorter): the file changed since it was scanned.
pub fn read_blob(
    root: &Root,
    path: &RelPath,
    offset: u64,
    len: u32,
    expected: ContentId,
) -> Result<Vec<u8>, ContentError> {
    if len as usize > MAX_BLOB {
        return Err(ContentError::TooLarge { len });
    }
    let mut bytes = Vec::with_capacity(len as usize);
    read_span_into(root, path, offset, len as usize, &mut bytes)?;
    if ContentId::of(&bytes) != expected {
        return Err(ContentError::Changed {
            path: path.clone(),
            offset,
            len,
        });
    }
    Ok(bytes)
}

/// Appends the `len` bytes at `offset` of the file at `path` under `root` (never through a
/// symlink) to `out`, unchecked: for an upload, whose receiver checks every blob against
/// its id (the relay does; hashing here too cost a tenth of a 200 MB push's reading
/// thread), read straight into the message that carries it, into its spare capacity
/// (never zeroed first: that cost as much as a copy). [`ContentError::Changed`] if the
/// file is now shorter (`out` is then as it was).
pub fn read_span_into(
    root: &Root,
    path: &RelPath,
    offset: u64,
    len: usize,
    out: &mut Vec<u8>,
) -> Result<(), ContentError> {
    let len32 = u32::try_from(len).unwrap_or(u32::MAX);
    if len > MAX_BLOB {
        return Err(ContentError::TooLarge { len: len32 });
    }
    let mut file = root.open_file(path)?;
    match append_span(&mut file, offset, len, out) {
        Ok(true) => Ok(()),
        Ok(false) => Err(ContentError::Changed {
            path: path.clone(),
            offset,
            len: len32,
        }),
        Err(source) => Err(ContentError::Root(RootError::io("read", path, source))),
    }
}

/// Appends the `len` bytes at `offset` of `file` to `out`, into its spare capacity (never
/// zeroed first). False if the file ends before them; on that or an error `out` is as it
/// was.
pub fn append_span(
    file: &mut File,
    offset: u64,
    len: usize,
    out: &mut Vec<u8>,
) -> io::Result<bool> {
    use std::io::{Read as _, Seek as _};
    let start = out.len();
    let read = (|| {
        file.seek(io::SeekFrom::Start(offset))?;
        file.take(len as u64).read_to_end(out)
    })();
    match read {
        Ok(n) if n == len => Ok(true),
        Ok(_) => {
            out.truncate(start);
            Ok(false)
        }
        Err(e) => {
            out.truncate(start);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_span_is_appended_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data = noise(5, 10_000);
        std::fs::write(&path, &data).unwrap();
        let mut file = File::open(&path).unwrap();
        let mut out = b"head".to_vec();
        assert!(append_span(&mut file, 100, 4_000, &mut out).unwrap());
        assert!(append_span(&mut file, 0, 10, &mut out).unwrap());
        let mut want = b"head".to_vec();
        want.extend_from_slice(&data[100..4_100]);
        want.extend_from_slice(&data[..10]);
        assert_eq!(out, want);
        // Past the end: nothing appended.
        assert!(!append_span(&mut file, 9_000, 2_000, &mut out).unwrap());
        assert!(!append_span(&mut file, 20_000, 1, &mut out).unwrap());
        assert_eq!(out, want);
        assert!(append_span(&mut file, 10_000, 0, &mut out).unwrap());
        assert_eq!(out, want);
    }

    /// Deterministic bytes that do not compress or repeat (xorshift).
    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut state = seed | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    #[test]
    fn small_files_are_one_blob() {
        for len in [0, 1, 4096, WHOLE_FILE_MAX as usize] {
            let bytes = noise(1, len);
            let content = hash_reader(&bytes[..], len as u64).unwrap();
            assert_eq!(content.size, len as u64);
            assert_eq!(content.content, ContentId::of(&bytes));
            assert!(content.chunks.is_empty());
            content.into_kind(false).validate().unwrap();
        }
    }

    #[test]
    fn large_files_are_chunked_and_valid() {
        let bytes = noise(2, WHOLE_FILE_MAX as usize + 1);
        // A wrong size hint changes nothing.
        let content = hash_reader(&bytes[..], 3).unwrap();
        assert_eq!(content.size, bytes.len() as u64);
        assert_eq!(content.content, ContentId::of(&bytes));
        assert!(content.chunks.len() >= 4, "{}", content.chunks.len());
        let mut offset = 0usize;
        for chunk in &content.chunks {
            let end = offset + chunk.len as usize;
            assert_eq!(chunk.id, ContentId::of(&bytes[offset..end]));
            offset = end;
        }
        assert_eq!(offset, bytes.len());
        // The same cut points as FastCDC over the whole buffer.
        let expected: Vec<u32> =
            fastcdc::v2020::FastCDC::new(&bytes, CHUNK_MIN, CHUNK_AVG, CHUNK_MAX)
                .map(|c| c.length as u32)
                .collect();
        let lens: Vec<u32> = content.chunks.iter().map(|c| c.len).collect();
        assert_eq!(lens, expected);
        content.into_kind(true).validate().unwrap();
    }
}

//! The scanner's memory of a tree: per path, the [`Stat`] it had and what it was
//! ([`EntryKind`], with the content id of a file), plus when the scan that made it
//! started. A file whose `Stat` is unchanged is not read again, unless it is racy: its
//! mtime is not clearly older than that scan's start, so an edit within the same
//! timestamp tick could have left every stat field as it was (git's racy-git rule).
//!
//! The daemon persists an index in sled: [`Index::encode`]/[`Index::decode`] for the
//! whole, [`Indexed::encode`]/[`Indexed::decode`] for one entry; both are postcard with a
//! format byte and a size limit, and decoding checks every path and entry.
//!
//! Architecture invariant: this module is data only; it never touches the file system.

use std::collections::BTreeMap;

use cloud_protocol::teleport::{EntryKind, Manifest, RelPath, MAX_CHUNKS, MAX_PATH};
use serde::{Deserialize, Serialize};

use crate::stat::{FileKind, Stat};

/// The first byte of an encoded index or entry; a new layout gets a new number.
pub const INDEX_FORMAT: u8 = 1;
/// The largest encoded index (about two million files).
pub const MAX_INDEX_BYTES: usize = 256 * 1024 * 1024;
/// The largest encoded entry (a file with the most chunks).
pub const MAX_INDEXED_BYTES: usize = MAX_PATH + 64 + MAX_CHUNKS * 40;
/// How much older than a scan's start an mtime must be for an unchanged stat to be
/// trusted. File systems keep timestamps at granularities from a nanosecond to two
/// seconds (FAT; one second on HFS+ and ext4 with small inodes), and the kernel stamps
/// them from a clock that lags the one we read: two edits within one tick look the same.
/// Two seconds covers them all; the cost is that a file edited within two seconds before
/// a scan is hashed once more at the next one.
pub const RACY_SLACK_NS: i64 = 2_000_000_000;

/// One path of the index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Indexed {
    pub stat: Stat,
    pub kind: EntryKind,
}

/// Why bytes are not an index or an entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    #[error("the index is {0} bytes, more than {MAX_INDEX_BYTES}")]
    TooLarge(usize),
    #[error("the index is empty")]
    Empty,
    #[error("the index has format {0}, this build reads format {INDEX_FORMAT} (it is rebuilt by a full scan)")]
    Format(u8),
    #[error("the index does not decode: {0}")]
    Decode(String),
    #[error("the index entry of {path} is invalid: {reason}")]
    Invalid { path: RelPath, reason: String },
}

/// A change to an index, as a rescan reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexChange {
    /// The path is now this.
    Put(RelPath, Indexed),
    /// The path, and everything under it, is gone.
    Remove(RelPath),
}

impl IndexChange {
    /// The path it changes.
    pub fn path(&self) -> &RelPath {
        match self {
            IndexChange::Put(path, _) | IndexChange::Remove(path) => path,
        }
    }
}

/// Path → [`Indexed`], plus when the full scan that made it started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    /// When the full scan that made this index started, nanoseconds since the Unix epoch
    /// (0: never scanned, so every file is racy).
    scanned_at_ns: i64,
    entries: BTreeMap<RelPath, Indexed>,
}

impl Index {
    /// An empty index stamped with a scan's start.
    pub fn new(scanned_at_ns: i64) -> Index {
        Index {
            scanned_at_ns,
            entries: BTreeMap::new(),
        }
    }

    /// When the full scan that made this index started.
    /// An index of `entries`, made by the scan that started at `scanned_at_ns`.
    pub fn from_entries(scanned_at_ns: i64, entries: BTreeMap<RelPath, Indexed>) -> Index {
        Index {
            scanned_at_ns,
            entries,
        }
    }

    pub fn scanned_at_ns(&self) -> i64 {
        self.scanned_at_ns
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, path: &RelPath) -> Option<&Indexed> {
        self.entries.get(path)
    }

    pub fn insert(&mut self, path: RelPath, indexed: Indexed) {
        self.entries.insert(path, indexed);
    }

    pub fn iter(&self) -> impl Iterator<Item = (&RelPath, &Indexed)> {
        self.entries.iter()
    }

    /// `path` and everything under it.
    pub fn under<'a>(
        &'a self,
        path: &'a RelPath,
    ) -> impl Iterator<Item = (&'a RelPath, &'a Indexed)> {
        self.entries
            .range(path.clone()..)
            .take_while(move |(p, _)| p.as_str().starts_with(path.as_str()))
            .filter(move |(p, _)| p.starts_with(path))
    }

    /// Applies a rescan's changes (a removal takes everything under its path).
    pub fn apply(&mut self, changes: &[IndexChange]) {
        for change in changes {
            match change {
                IndexChange::Put(path, indexed) => {
                    self.entries.insert(path.clone(), indexed.clone());
                }
                IndexChange::Remove(path) => {
                    let under: Vec<RelPath> = self.under(path).map(|(p, _)| p.clone()).collect();
                    for p in under {
                        self.entries.remove(&p);
                    }
                }
            }
        }
    }

    /// Whether a file with this stat may have changed without its stat showing it: its
    /// mtime is not older than this index's scan start (less [`RACY_SLACK_NS`]).
    pub fn is_racy(&self, stat: &Stat) -> bool {
        stat.mtime_ns >= self.scanned_at_ns.saturating_sub(RACY_SLACK_NS)
    }

    /// What the file at `path` is, without reading it, when the index may be trusted: an
    /// indexed file whose stat is exactly `stat` and not racy.
    pub fn reusable(&self, path: &RelPath, stat: &Stat) -> Option<&EntryKind> {
        let indexed = self.entries.get(path)?;
        let trusted = stat.kind == FileKind::File
            && indexed.stat == *stat
            && matches!(indexed.kind, EntryKind::File { .. })
            && !self.is_racy(stat);
        trusted.then_some(&indexed.kind)
    }

    /// The tree this index describes.
    pub fn manifest(&self) -> Manifest {
        let mut manifest = Manifest::new();
        for (path, indexed) in &self.entries {
            manifest.insert(path.clone(), indexed.kind.clone());
        }
        manifest
    }

    /// The postcard bytes, after [`INDEX_FORMAT`].
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    /// Decodes and checks what [`Index::encode`] made.
    pub fn decode(bytes: &[u8]) -> Result<Index, IndexError> {
        let index: Index = decode(bytes, MAX_INDEX_BYTES)?;
        for (path, indexed) in &index.entries {
            indexed.check(path)?;
        }
        Ok(index)
    }
}

impl Indexed {
    /// The postcard bytes, after [`INDEX_FORMAT`] (for a store keyed by path).
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    /// Decodes and checks what [`Indexed::encode`] made; `path` is its key, for the
    /// error message.
    pub fn decode(path: &RelPath, bytes: &[u8]) -> Result<Indexed, IndexError> {
        let indexed: Indexed = decode(bytes, MAX_INDEXED_BYTES)?;
        indexed.check(path)?;
        Ok(indexed)
    }

    /// The entry is valid and agrees with its stat's kind.
    fn check(&self, path: &RelPath) -> Result<(), IndexError> {
        let invalid = |reason: String| IndexError::Invalid {
            path: path.clone(),
            reason,
        };
        self.kind.validate().map_err(invalid)?;
        let agrees = matches!(
            (&self.kind, self.stat.kind),
            (EntryKind::Dir, FileKind::Dir)
                | (EntryKind::File { .. }, FileKind::File)
                | (EntryKind::Symlink { .. }, FileKind::Symlink)
        );
        if !agrees {
            return Err(invalid(format!(
                "a {:?} stat for a {:?} entry",
                self.stat.kind, self.kind
            )));
        }
        Ok(())
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut bytes = vec![INDEX_FORMAT];
    // Serializing into a Vec cannot fail: every field is a plain value or a map.
    bytes.extend(postcard::to_allocvec(value).expect("an index always serializes"));
    bytes
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8], limit: usize) -> Result<T, IndexError> {
    if bytes.len() > limit {
        return Err(IndexError::TooLarge(bytes.len()));
    }
    let (&format, body) = bytes.split_first().ok_or(IndexError::Empty)?;
    if format != INDEX_FORMAT {
        return Err(IndexError::Format(format));
    }
    let (value, rest) =
        postcard::take_from_bytes(body).map_err(|e| IndexError::Decode(e.to_string()))?;
    if !rest.is_empty() {
        return Err(IndexError::Decode(format!(
            "{} bytes left over",
            rest.len()
        )));
    }
    Ok(value)
}

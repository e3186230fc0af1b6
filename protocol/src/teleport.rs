//! Teleport's wire types and the pure logic over them: checked relative paths
//! ([`RelPath`]), content ids, manifests (a tree's entries), deltas between manifests,
//! the three-way merge a pull and a stale push use, and the bridge requests that carry
//! them. It does no IO: scanning, hashing files and writing them live in the `cloud-tree`
//! crate, transport in the daemon's and relay's bridge modules.
//!
//! Architecture invariant: every path that crosses the bridge is a [`RelPath`], which can
//! only be built by [`RelPath::new`] (deserializing calls it too), so no `..`, absolute
//! path, NUL, backslash or `.git` component ever reaches a writer, on either side.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Files up to this size travel as one blob; larger ones as FastCDC chunks.
pub const WHOLE_FILE_MAX: u64 = 1024 * 1024;
/// FastCDC's minimum, average and maximum chunk sizes.
pub const CHUNK_MIN: u32 = 16 * 1024;
pub const CHUNK_AVG: u32 = 64 * 1024;
pub const CHUNK_MAX: u32 = 256 * 1024;
/// The longest path, in bytes.
pub const MAX_PATH: usize = 4096;
/// The longest path component, in bytes.
pub const MAX_COMPONENT: usize = 255;
/// The longest symlink target, in bytes.
pub const MAX_LINK_TARGET: usize = 4096;
/// The most ids in one "which of these do you lack?" request.
pub const MAX_LACKS_IDS: usize = 65_536;
/// The most changes in one delta (a commit, or an answer to `Changes`).
pub const MAX_DELTA_CHANGES: usize = 100_000;
/// The most chunks one file may have (a 16 GiB file at the average chunk size).
pub const MAX_CHUNKS: usize = 262_144;

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path is empty")]
    Empty,
    #[error("the path is longer than {MAX_PATH} bytes")]
    TooLong,
    #[error("the path is absolute")]
    Absolute,
    #[error("the path has an empty component (a doubled or trailing '/')")]
    EmptyComponent,
    #[error("the path has a '.' or '..' component")]
    DotComponent,
    #[error("the path has a component longer than {MAX_COMPONENT} bytes")]
    ComponentTooLong,
    #[error("the path holds a NUL byte")]
    Nul,
    #[error("the path holds a backslash")]
    Backslash,
    #[error("the path goes through a .git directory")]
    Git,
}

/// A checked path inside a worktree or a session workspace: relative, `/`-separated,
/// normalised (no empty, `.` or `..` component), UTF-8, without NUL or backslash, no
/// component named `.git` (in any case), at most [`MAX_PATH`] bytes. Ordered bytewise,
/// which puts a directory before everything under it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct RelPath(String);

impl RelPath {
    /// Checks `path`.
    pub fn new(path: impl Into<String>) -> Result<RelPath, PathError> {
        let path = path.into();
        if path.is_empty() {
            return Err(PathError::Empty);
        }
        if path.len() > MAX_PATH {
            return Err(PathError::TooLong);
        }
        if path.starts_with('/') {
            return Err(PathError::Absolute);
        }
        if path.contains('\0') {
            return Err(PathError::Nul);
        }
        if path.contains('\\') {
            return Err(PathError::Backslash);
        }
        for component in path.split('/') {
            match component {
                "" => return Err(PathError::EmptyComponent),
                "." | ".." => return Err(PathError::DotComponent),
                c if c.len() > MAX_COMPONENT => return Err(PathError::ComponentTooLong),
                c if c.eq_ignore_ascii_case(".git") => return Err(PathError::Git),
                // A drive prefix ("C:") would make the path absolute on Windows.
                c if c.len() == 2 && c.ends_with(':') => return Err(PathError::Absolute),
                _ => {}
            }
        }
        Ok(RelPath(path))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Its components, in order.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// The path of its parent directory, `None` at the top.
    pub fn parent(&self) -> Option<RelPath> {
        self.0
            .rsplit_once('/')
            .map(|(parent, _)| RelPath(parent.to_owned()))
    }

    /// Its last component.
    pub fn file_name(&self) -> &str {
        self.0.rsplit_once('/').map_or(&self.0, |(_, name)| name)
    }

    /// `self/name`, checked.
    pub fn join(&self, name: &str) -> Result<RelPath, PathError> {
        RelPath::new(format!("{}/{name}", self.0))
    }

    /// Whether `self` is `other` or lies under it.
    pub fn starts_with(&self, other: &RelPath) -> bool {
        self.0 == other.0
            || (self.0.starts_with(&other.0) && self.0.as_bytes().get(other.0.len()) == Some(&b'/'))
    }

    /// The name a conflicting remote version of this file is written under, beside it:
    /// `NAME.cloud-conflict-v<version>[.EXT]`.
    pub fn conflict_name(&self, version: u64) -> Result<RelPath, PathError> {
        let name = self.file_name();
        let renamed = match name.rsplit_once('.') {
            Some((stem, ext)) if !stem.is_empty() => {
                format!("{stem}.cloud-conflict-v{version}.{ext}")
            }
            _ => format!("{name}.cloud-conflict-v{version}"),
        };
        match self.parent() {
            Some(parent) => parent.join(&renamed),
            None => RelPath::new(renamed),
        }
    }

    /// Whether this names a conflict copy (which never teleports).
    pub fn is_conflict_copy(&self) -> bool {
        let name = self.file_name();
        name.match_indices(".cloud-conflict-v").any(|(at, marker)| {
            let digits = &name[at + marker.len()..];
            let digits = digits.split('.').next().unwrap_or("");
            !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
        })
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for RelPath {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let path = String::deserialize(deserializer)?;
        RelPath::new(path).map_err(serde::de::Error::custom)
    }
}

/// A blob's id: the blake3 hash of its bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ContentId(pub [u8; 32]);

impl ContentId {
    /// The id of `bytes`.
    pub fn of(bytes: &[u8]) -> ContentId {
        ContentId(*blake3::hash(bytes).as_bytes())
    }

    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    /// Parses 64 hex characters.
    pub fn from_hex(hex: &str) -> Option<ContentId> {
        blake3::Hash::from_hex(hex)
            .ok()
            .map(|h| ContentId(*h.as_bytes()))
    }
}

impl fmt::Debug for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContentId({})", &self.to_hex()[..16])
    }
}

impl fmt::Display for ContentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// One chunk of a large file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    pub id: ContentId,
    pub len: u32,
}

/// What a path is, with everything needed to recreate it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    Dir,
    File {
        /// Whether the owner's exec bit is set.
        executable: bool,
        size: u64,
        /// The blake3 hash of the whole file.
        content: ContentId,
        /// Its FastCDC chunks, in order, when `size` > [`WHOLE_FILE_MAX`]; empty otherwise
        /// (the file is then the one blob `content`).
        chunks: Vec<Chunk>,
    },
    /// A symbolic link, stored and recreated as a link, never followed.
    Symlink {
        target: String,
    },
}

impl EntryKind {
    /// The blobs it needs.
    pub fn blobs(&self) -> Vec<ContentId> {
        match self {
            EntryKind::File {
                content, chunks, ..
            } if chunks.is_empty() => vec![*content],
            EntryKind::File { chunks, .. } => chunks.iter().map(|c| c.id).collect(),
            _ => Vec::new(),
        }
    }

    /// Whether two entries have the same content (for a file: bytes and exec bit).
    pub fn same_content(&self, other: &EntryKind) -> bool {
        match (self, other) {
            (
                EntryKind::File {
                    executable: a,
                    content: ca,
                    ..
                },
                EntryKind::File {
                    executable: b,
                    content: cb,
                    ..
                },
            ) => a == b && ca == cb,
            (a, b) => a == b,
        }
    }

    /// Checks what a peer sent: sizes and chunk lists that agree, a bounded link target.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            EntryKind::Dir => Ok(()),
            EntryKind::Symlink { target } => {
                if target.is_empty() || target.len() > MAX_LINK_TARGET || target.contains('\0') {
                    return Err("a symlink target that is empty, too long or holds NUL".into());
                }
                Ok(())
            }
            EntryKind::File { size, chunks, .. } => {
                if chunks.is_empty() {
                    return if *size <= WHOLE_FILE_MAX {
                        Ok(())
                    } else {
                        Err(format!("a file of {size} bytes without chunks"))
                    };
                }
                if chunks.len() > MAX_CHUNKS {
                    return Err(format!("a file of {} chunks", chunks.len()));
                }
                let total: u64 = chunks.iter().map(|c| u64::from(c.len)).sum();
                if total != *size || chunks.iter().any(|c| c.len == 0 || c.len > CHUNK_MAX) {
                    return Err("chunk lengths that do not add up to the file's size".into());
                }
                Ok(())
            }
        }
    }
}

/// One path of a tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub path: RelPath,
    pub kind: EntryKind,
}

/// A change from one tree to another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// The path is now this (created or replaced).
    Put(Entry),
    /// The path, and everything under it, is gone.
    Remove(RelPath),
}

impl Change {
    pub fn path(&self) -> &RelPath {
        match self {
            Change::Put(entry) => &entry.path,
            Change::Remove(path) => path,
        }
    }
}

/// What a delta may not do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    #[error("the delta has {0} changes, more than {MAX_DELTA_CHANGES}")]
    TooLarge(usize),
    #[error("{path}: {reason}")]
    Invalid { path: RelPath, reason: String },
}

/// The changes from one tree to another, in an order a writer can follow: removals (each
/// takes what is under its path), then puts, parents first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    pub changes: Vec<Change>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// Checks what a peer sent (see [`EntryKind::validate`]).
    pub fn validate(&self) -> Result<(), DeltaError> {
        if self.changes.len() > MAX_DELTA_CHANGES {
            return Err(DeltaError::TooLarge(self.changes.len()));
        }
        for change in &self.changes {
            if let Change::Put(entry) = change {
                entry
                    .kind
                    .validate()
                    .map_err(|reason| DeltaError::Invalid {
                        path: entry.path.clone(),
                        reason,
                    })?;
            }
        }
        Ok(())
    }

    /// Every blob its puts need, without repeats.
    pub fn blobs(&self) -> Vec<ContentId> {
        let mut ids: Vec<ContentId> = self
            .changes
            .iter()
            .filter_map(|c| match c {
                Change::Put(entry) => Some(entry.kind.blobs()),
                Change::Remove(_) => None,
            })
            .flatten()
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// A whole tree: path → entry, sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manifest {
    entries: BTreeMap<RelPath, EntryKind>,
}

impl Serialize for Manifest {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.entries.iter())
    }
}

impl<'de> Deserialize<'de> for Manifest {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let entries: Vec<(RelPath, EntryKind)> = Vec::deserialize(deserializer)?;
        Ok(Manifest {
            entries: entries.into_iter().collect(),
        })
    }
}

impl FromIterator<Entry> for Manifest {
    fn from_iter<I: IntoIterator<Item = Entry>>(iter: I) -> Self {
        Manifest {
            entries: iter.into_iter().map(|e| (e.path, e.kind)).collect(),
        }
    }
}

impl Manifest {
    pub fn new() -> Manifest {
        Manifest::default()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, path: &RelPath) -> Option<&EntryKind> {
        self.entries.get(path)
    }

    pub fn insert(&mut self, path: RelPath, kind: EntryKind) {
        self.entries.insert(path, kind);
    }

    pub fn iter(&self) -> impl Iterator<Item = (&RelPath, &EntryKind)> {
        self.entries.iter()
    }

    /// Checks that every entry's parent is in the tree as a directory (what a scanner
    /// makes; a commit that breaks it is refused).
    pub fn check_well_formed(&self) -> Result<(), DeltaError> {
        for path in self.entries.keys() {
            if let Some(parent) = path.parent() {
                if !matches!(self.entries.get(&parent), Some(EntryKind::Dir)) {
                    return Err(DeltaError::Invalid {
                        path: path.clone(),
                        reason: format!("its parent {parent} is not a directory of the tree"),
                    });
                }
            }
        }
        Ok(())
    }

    /// `path` and everything under it.
    pub fn under<'a>(
        &'a self,
        path: &'a RelPath,
    ) -> impl Iterator<Item = (&'a RelPath, &'a EntryKind)> + 'a {
        // Everything under `path` shares its bytes as a prefix, and bytewise order keeps
        // all strings with that prefix together, starting at `path` itself.
        self.entries
            .range(path.clone()..)
            .take_while(move |(p, _)| p.as_str().starts_with(path.as_str()))
            .filter(move |(p, _)| p.starts_with(path))
    }

    /// Files and their total size.
    pub fn totals(&self) -> (u64, u64) {
        self.entries
            .values()
            .filter_map(|k| match k {
                EntryKind::File { size, .. } => Some(*size),
                _ => None,
            })
            .fold((0, 0), |(n, bytes), size| (n + 1, bytes + size))
    }

    /// The delta that turns `self` into `newer`.
    pub fn diff(&self, newer: &Manifest) -> Delta {
        let mut removes = Vec::new();
        let mut puts = Vec::new();
        let mut old = self.entries.iter().peekable();
        let mut new = newer.entries.iter().peekable();
        loop {
            match (old.peek(), new.peek()) {
                (None, None) => break,
                (Some((path, _)), None) => {
                    removes.push((*path).clone());
                    old.next();
                }
                (None, Some((path, kind))) => {
                    puts.push(Entry {
                        path: (*path).clone(),
                        kind: (*kind).clone(),
                    });
                    new.next();
                }
                (Some((a, ka)), Some((b, kb))) => match a.cmp(b) {
                    std::cmp::Ordering::Less => {
                        removes.push((*a).clone());
                        old.next();
                    }
                    std::cmp::Ordering::Greater => {
                        puts.push(Entry {
                            path: (*b).clone(),
                            kind: (*kb).clone(),
                        });
                        new.next();
                    }
                    std::cmp::Ordering::Equal => {
                        if ka != kb {
                            // A kind that changes (a file becoming a directory) replaces
                            // what is there: removed first, so the put finds room.
                            if std::mem::discriminant(*ka) != std::mem::discriminant(*kb) {
                                removes.push((*a).clone());
                            }
                            puts.push(Entry {
                                path: (*b).clone(),
                                kind: (*kb).clone(),
                            });
                        }
                        old.next();
                        new.next();
                    }
                },
            }
        }
        // A removal takes what is under it: only the topmost of each removed subtree. In a
        // tree without its parent directories something under it may survive: put again.
        let mut kept: Vec<RelPath> = Vec::new();
        for path in removes {
            if kept.last().is_some_and(|top| path.starts_with(top)) {
                continue;
            }
            kept.push(path);
        }
        let mut again = Vec::new();
        for top in &kept {
            for (path, kind) in newer.under(top) {
                if path != top && !puts.iter().any(|p| &p.path == path) {
                    again.push(Entry {
                        path: path.clone(),
                        kind: kind.clone(),
                    });
                }
            }
        }
        if !again.is_empty() {
            puts.extend(again);
            puts.sort_by(|a, b| a.path.cmp(&b.path));
        }
        let mut changes: Vec<Change> = kept.into_iter().map(Change::Remove).collect();
        changes.extend(puts.into_iter().map(Change::Put));
        Delta { changes }
    }

    /// Applies `delta` (a removal takes everything under its path).
    pub fn apply(&mut self, delta: &Delta) {
        for change in &delta.changes {
            match change {
                Change::Remove(path) => {
                    let under: Vec<RelPath> = self.under(path).map(|(p, _)| p.clone()).collect();
                    for p in under {
                        self.entries.remove(&p);
                    }
                }
                Change::Put(entry) => {
                    self.entries.insert(entry.path.clone(), entry.kind.clone());
                }
            }
        }
    }
}

/// What to do to bring a remote side's changes into a local tree without losing local
/// work (see [`merge`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Merge {
    /// Changes to apply locally: paths the remote side changed and the local side did not.
    pub apply: Delta,
    /// Paths both sides changed, differently: the local version stays; the remote one is
    /// written beside it under [`RelPath::conflict_name`] (`None`: the remote side removed
    /// it, and the local change stays with nothing beside it).
    pub conflicts: Vec<(RelPath, Option<EntryKind>)>,
}

/// The three-way merge of a pull: `base` is the last tree both sides agreed on, `local`
/// the local tree now, `remote` the remote side's newest. A path changed only remotely is
/// taken; a path changed on both sides to the same thing is settled; a path changed on
/// both sides differently is a conflict; everything else stays as it is locally.
pub fn merge(base: &Manifest, local: &Manifest, remote: &Manifest) -> Merge {
    let unchanged = |p: &RelPath| base.get(p) == local.get(p);
    let mut apply = Vec::new();
    let mut conflicts: Vec<(RelPath, Option<EntryKind>)> = Vec::new();
    // Paths whose remote removal was held back (something under them changed locally).
    let mut held: Vec<RelPath> = Vec::new();
    for change in base.diff(remote).changes {
        match change {
            Change::Remove(path) => {
                let untouched = base.under(&path).all(|(p, _)| unchanged(p))
                    && local.under(&path).all(|(p, _)| unchanged(p));
                if untouched {
                    apply.push(Change::Remove(path));
                } else if local.under(&path).next().is_none() {
                    // Removed on both sides.
                } else {
                    held.push(path.clone());
                    conflicts.push((path, None));
                }
            }
            Change::Put(entry) => {
                let path = entry.path.clone();
                if held.contains(&path) {
                    // The remote side replaced what it removed (a kind that changed): the
                    // new entry is what goes beside the local one.
                    if let Some(conflict) = conflicts.iter_mut().find(|(p, _)| *p == path) {
                        conflict.1 = Some(entry.kind);
                    }
                    continue;
                }
                if unchanged(&path) {
                    apply.push(Change::Put(entry));
                    continue;
                }
                let settled = match (local.get(&path), &entry.kind) {
                    (Some(EntryKind::Dir), EntryKind::Dir) => true,
                    (Some(mine), theirs) => mine.same_content(theirs),
                    (None, _) => false,
                };
                if !settled {
                    conflicts.push((path, Some(entry.kind)));
                }
            }
        }
    }
    Merge {
        apply: Delta { changes: apply },
        conflicts,
    }
}

/// The git state a snapshot records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GitState {
    /// The commit HEAD points at (hex).
    pub head: String,
    /// The branch HEAD is on, `None` when detached.
    pub branch: Option<String>,
    /// The history the other side lacks, as a `git bundle` stored as blobs (its one ref is
    /// `HEAD`): on a push, the commits since the last head the relay took; `None` when
    /// the other side has `head` already.
    pub bundle: Option<BundleRef>,
}

/// A `git bundle` file, stored as blobs like a file's contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleRef {
    pub size: u64,
    /// The blake3 hash of the whole bundle.
    pub content: ContentId,
    /// Its chunks when over [`WHOLE_FILE_MAX`]; empty otherwise (one blob, `content`).
    pub chunks: Vec<Chunk>,
}

impl BundleRef {
    /// The blobs it is made of.
    pub fn blobs(&self) -> Vec<ContentId> {
        if self.chunks.is_empty() {
            vec![self.content]
        } else {
            self.chunks.iter().map(|c| c.id).collect()
        }
    }
}

/// Who made a snapshot version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VersionAuthor {
    /// A daemon instance's push (its instance id).
    Instance(String),
    /// The session's agent (its edits, recorded by the relay).
    Agent,
}

/// One snapshot version of a session's tree, without its entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// From 1; 0 is the empty tree every session starts with.
    pub version: u64,
    /// The version it was committed on.
    pub base: u64,
    pub author: VersionAuthor,
    pub git: Option<GitState>,
    /// When the relay recorded it, milliseconds since the Unix epoch.
    pub at: u64,
    /// Files in the tree, and their total size.
    pub files: u64,
    pub bytes: u64,
}

/// A teleport request from a daemon to its relay, on the task channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TeleportRequest {
    /// Which of these blobs does the relay lack (for this session's org)?
    Lacks {
        session: String,
        ids: Vec<ContentId>,
    },
    /// Commit `delta` on top of version `base`: refused as stale unless `base` is the
    /// session's newest version. Every blob the delta needs must be stored first.
    Commit {
        session: String,
        base: u64,
        delta: Delta,
        git: Option<GitState>,
    },
    /// The changes from version `since` to the newest.
    Changes { session: String, since: u64 },
    /// The history of the workspace's repository up to `head` that the daemon lacks (it
    /// has the commits in `have`), as a bundle stored as blobs (its one ref is `HEAD`).
    GitBundle {
        session: String,
        head: String,
        have: Vec<String>,
    },
}

impl TeleportRequest {
    pub fn session(&self) -> &str {
        match self {
            TeleportRequest::Lacks { session, .. }
            | TeleportRequest::Commit { session, .. }
            | TeleportRequest::Changes { session, .. }
            | TeleportRequest::GitBundle { session, .. } => session,
        }
    }
}

/// The relay's answer to a [`TeleportRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TeleportReply {
    Lacks(Vec<ContentId>),
    Committed(VersionInfo),
    /// The base was not the newest version: merge `current` in and commit again.
    Stale {
        current: u64,
    },
    Changes {
        newest: VersionInfo,
        delta: Delta,
    },
    /// The bundle asked for (its blobs are stored for the session's org).
    GitBundle(BundleRef),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    fn file(byte: u8) -> EntryKind {
        EntryKind::File {
            executable: false,
            size: 1,
            content: ContentId::of(&[byte]),
            chunks: Vec::new(),
        }
    }

    #[test]
    fn paths_are_checked() {
        for good in [
            "a",
            "a/b",
            "a.git",
            ".gitignore",
            "dir/.github/x",
            "ü/ß",
            "a..b",
        ] {
            assert!(RelPath::new(good).is_ok(), "{good}");
        }
        let bad = [
            ("", PathError::Empty),
            ("/etc/passwd", PathError::Absolute),
            ("a//b", PathError::EmptyComponent),
            ("a/", PathError::EmptyComponent),
            ("./a", PathError::DotComponent),
            ("a/../../b", PathError::DotComponent),
            ("..", PathError::DotComponent),
            ("a\0b", PathError::Nul),
            ("a\\..\\b", PathError::Backslash),
            (".git/config", PathError::Git),
            ("sub/.GIT/hooks/x", PathError::Git),
            ("C:/x", PathError::Absolute),
        ];
        for (path, error) in bad {
            assert_eq!(RelPath::new(path), Err(error), "{path:?}");
        }
        assert_eq!(
            RelPath::new("a".repeat(256)),
            Err(PathError::ComponentTooLong)
        );
        assert_eq!(
            RelPath::new(vec!["a"; 3000].join("/")),
            Err(PathError::TooLong)
        );
    }

    #[test]
    fn deserializing_checks_paths() {
        let bytes = postcard::to_allocvec(&"../x".to_owned()).unwrap();
        assert!(postcard::from_bytes::<RelPath>(&bytes).is_err());
        let json = serde_json::from_str::<RelPath>("\"/abs\"");
        assert!(json.is_err());
        assert_eq!(
            serde_json::from_str::<RelPath>("\"a/b\"").unwrap(),
            p("a/b")
        );
    }

    #[test]
    fn conflict_names() {
        assert_eq!(
            p("src/main.rs").conflict_name(7).unwrap(),
            p("src/main.cloud-conflict-v7.rs")
        );
        assert_eq!(
            p("Makefile").conflict_name(3).unwrap(),
            p("Makefile.cloud-conflict-v3")
        );
        assert_eq!(
            p(".env").conflict_name(2).unwrap(),
            p(".env.cloud-conflict-v2")
        );
        assert!(p("src/main.cloud-conflict-v7.rs").is_conflict_copy());
        assert!(p("Makefile.cloud-conflict-v3").is_conflict_copy());
        assert!(!p("notes.cloud-conflict-vx").is_conflict_copy());
    }

    #[test]
    fn starts_with_is_by_component() {
        assert!(p("a/b").starts_with(&p("a")));
        assert!(p("a").starts_with(&p("a")));
        assert!(!p("ab").starts_with(&p("a")));
    }

    #[test]
    fn diff_then_apply_gives_the_newer_tree() {
        let old: Manifest = [
            Entry {
                path: p("a"),
                kind: EntryKind::Dir,
            },
            Entry {
                path: p("a/x"),
                kind: file(1),
            },
            Entry {
                path: p("a/y"),
                kind: file(2),
            },
            Entry {
                path: p("b"),
                kind: file(3),
            },
        ]
        .into_iter()
        .collect();
        let new: Manifest = [
            Entry {
                path: p("a"),
                kind: file(9),
            },
            Entry {
                path: p("b"),
                kind: EntryKind::Dir,
            },
            Entry {
                path: p("b/z"),
                kind: file(4),
            },
        ]
        .into_iter()
        .collect();
        let delta = old.diff(&new);
        let mut applied = old.clone();
        applied.apply(&delta);
        assert_eq!(applied, new);
        // Removals come first, deepest first; puts parents first.
        assert!(matches!(delta.changes[0], Change::Remove(_)));
    }

    #[test]
    fn merge_takes_remote_changes_and_keeps_local_ones() {
        let base: Manifest = [
            Entry {
                path: p("same"),
                kind: file(1),
            },
            Entry {
                path: p("theirs"),
                kind: file(2),
            },
            Entry {
                path: p("mine"),
                kind: file(3),
            },
            Entry {
                path: p("both"),
                kind: file(4),
            },
        ]
        .into_iter()
        .collect();
        let mut local = base.clone();
        local.insert(p("mine"), file(30));
        local.insert(p("both"), file(40));
        let mut remote = base.clone();
        remote.insert(p("theirs"), file(20));
        remote.insert(p("both"), file(41));
        remote.insert(p("new"), file(5));
        let merged = merge(&base, &local, &remote);
        let applied: Vec<&str> = merged
            .apply
            .changes
            .iter()
            .map(|c| c.path().as_str())
            .collect();
        assert_eq!(applied, ["new", "theirs"]);
        assert_eq!(merged.conflicts, vec![(p("both"), Some(file(41)))]);
    }
}

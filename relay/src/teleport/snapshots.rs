//! Snapshot versions of each session's tree, with optimistic concurrency: a commit is a
//! delta on top of a named base version, refused unless that base is the newest.
//!
//! The versions live in their own sled database (`DATA/snapshots/`), apart from the core's
//! store, because a commit can be megabytes (a first push of a large tree) and must not
//! hold up the core's rounds. Keys (session ids hold no NUL byte):
//! - `n\0{session}` → the newest [`VersionInfo`] (postcard); absent: version 0, the empty
//!   tree every session starts with.
//! - `t\0{session}\0{dir}` → the newest tree's entries in directory `dir` (the empty
//!   string at the top): a [`Listing`], name → [`EntryKind`] (postcard). A directory with
//!   nothing in it has no key. One key per directory, not per path: a first push of 20,000
//!   files in 3,200 directories wrote 23,000 keys in about 0.2–0.3 s of its commit, and
//!   writes 3,200 now.
//! - `v\0{session}\0{version: u64 BE}` → that version's [`VersionInfo`] and the delta that
//!   made it from the version before.
//!
//! A commit reads only the listings of the directories its delta touches (and, for a
//! removed directory, those under it), so an edit costs its directories' sizes, not the
//! tree's. Stores written before listings (one `e\0{session}\0{path}` key per entry) are
//! rewritten as listings when opened. A commit is one sled batch, flushed before it is answered. Commits to one
//! session are serialised (a per-session lock); sessions do not wait on each other. Every
//! call does blocking IO: callers run it on the blocking pool.
//!
//! This module must never write a workspace (that is `materialise`), never check who may
//! commit (the caller does), and never store a delta whose blobs are not all in the blob
//! store.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use cloud_protocol::teleport::{
    Change, Delta, DeltaError, EntryKind, GitState, Manifest, RelPath, VersionAuthor, VersionInfo,
    MAX_DELTA_CHANGES,
};

use super::blobs::{BlobStore, BlobStoreError};

/// Why a snapshot operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("the snapshot store: {0}")]
    Sled(#[from] sled::Error),
    #[error("a corrupt snapshot record: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Delta(#[from] DeltaError),
    #[error("{0}")]
    Blobs(#[from] BlobStoreError),
    #[error("the commit needs {missing} blob(s) the relay does not have (first: {first})")]
    MissingBlobs { missing: usize, first: String },
    #[error("version {since} is newer than the session's newest, {newest}")]
    Future { since: u64, newest: u64 },
}

/// What became of a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Commit {
    /// A new version (or the newest unchanged, for an empty delta on the newest base).
    Committed(VersionInfo),
    /// The base was not the newest version.
    Stale { current: u64 },
}

/// The snapshot store.
#[derive(Debug)]
pub struct Snapshots {
    db: sled::Db,
    tree: sled::Tree,
    locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

fn key(prefix: u8, session: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(session.len() + 3);
    key.push(prefix);
    key.push(0);
    key.extend_from_slice(session.as_bytes());
    key
}

/// A directory's entries: name → kind.
pub type Listing = BTreeMap<String, EntryKind>;

/// What every key of the session's listings starts with.
fn listings_prefix(session: &str) -> Vec<u8> {
    let mut prefix = key(b't', session);
    prefix.push(0);
    prefix
}

/// The key of the listing of `dir` (`""`: the top).
fn listing_key(session: &str, dir: &str) -> Vec<u8> {
    let mut key = listings_prefix(session);
    key.extend_from_slice(dir.as_bytes());
    key
}

/// The directory `path` is in (`""`: the top).
fn dir_of(path: &RelPath) -> &str {
    path.as_str().rsplit_once('/').map_or("", |(dir, _)| dir)
}

/// `dir/name` (`name` at the top), checked: a stored name is one plain component.
fn path_in(dir: &str, name: &str) -> Result<RelPath, SnapshotError> {
    if name.contains('/') {
        return Err(SnapshotError::Corrupt(format!(
            "a listed name with a slash: {name:?}"
        )));
    }
    let path = if dir.is_empty() {
        RelPath::new(name)
    } else {
        RelPath::new(format!("{dir}/{name}"))
    };
    path.map_err(|e| SnapshotError::Corrupt(e.to_string()))
}

/// The directory a listing key names, after `prefix`.
fn dir_of_key<'k>(key: &'k [u8], prefix: &[u8]) -> Result<&'k str, SnapshotError> {
    std::str::from_utf8(&key[prefix.len()..]).map_err(|e| SnapshotError::Corrupt(e.to_string()))
}

fn version_key(session: &str, version: u64) -> Vec<u8> {
    let mut key = key(b'v', session);
    key.push(0);
    key.extend_from_slice(&version.to_be_bytes());
    key
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, SnapshotError> {
    postcard::from_bytes(bytes).map_err(|e| SnapshotError::Corrupt(e.to_string()))
}

fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, SnapshotError> {
    postcard::to_allocvec(value).map_err(|e| SnapshotError::Corrupt(e.to_string()))
}

/// The empty tree's version.
fn version_zero() -> VersionInfo {
    VersionInfo {
        version: 0,
        base: 0,
        author: VersionAuthor::Agent,
        git: None,
        at: 0,
        files: 0,
        bytes: 0,
    }
}

/// The newest tree as a commit changes it: the stored listings, with every path the delta
/// touches read once and changed in memory. The stored tree is well formed (every entry's
/// parent a directory), so checking the touched paths checks the whole tree.
struct View<'a> {
    tree: &'a sled::Tree,
    session: &'a str,
    /// Every path the delta touched: as stored, and as it is now.
    changed: BTreeMap<RelPath, (Option<EntryKind>, Option<EntryKind>)>,
    /// Whether the session's stored tree has no entry (a first push): nothing is read.
    empty: bool,
    /// The stored listings read so far, by directory.
    listings: RefCell<HashMap<String, Arc<Listing>>>,
}

impl View<'_> {
    /// The stored listing of `dir` (empty if it has none).
    fn listing(&self, dir: &str) -> Result<Arc<Listing>, SnapshotError> {
        if let Some(listing) = self.listings.borrow().get(dir) {
            return Ok(Arc::clone(listing));
        }
        let listing = match self.empty {
            true => None,
            false => self.tree.get(listing_key(self.session, dir))?,
        };
        let listing = Arc::new(match listing {
            Some(bytes) => decode(&bytes)?,
            None => Listing::new(),
        });
        self.listings
            .borrow_mut()
            .insert(dir.to_owned(), Arc::clone(&listing));
        Ok(listing)
    }

    fn stored(&self, path: &RelPath) -> Result<Option<EntryKind>, SnapshotError> {
        if self.empty {
            return Ok(None);
        }
        Ok(self.listing(dir_of(path))?.get(path.file_name()).cloned())
    }

    fn get(&self, path: &RelPath) -> Result<Option<EntryKind>, SnapshotError> {
        match self.changed.get(path) {
            Some((_, now)) => Ok(now.clone()),
            None => self.stored(path),
        }
    }

    fn set(&mut self, path: RelPath, kind: Option<EntryKind>) -> Result<(), SnapshotError> {
        if let Some((_, now)) = self.changed.get_mut(&path) {
            *now = kind;
        } else {
            let before = self.stored(&path)?;
            self.changed.insert(path, (before, kind));
        }
        Ok(())
    }

    /// The touched paths under `path` (itself included), as they are now.
    fn changed_under<'a>(
        &'a self,
        path: &'a RelPath,
    ) -> impl Iterator<Item = (&'a RelPath, &'a Option<EntryKind>)> + 'a {
        self.changed
            .range(path.clone()..)
            .take_while(move |(p, _)| p.as_str().starts_with(path.as_str()))
            .filter(move |(p, _)| p.starts_with(path))
            .map(|(p, (_, now))| (p, now))
    }

    /// `path` and every entry under it, as the tree is now.
    fn under(&self, path: &RelPath) -> Result<Vec<RelPath>, SnapshotError> {
        let mut found = std::collections::BTreeSet::new();
        if !self.empty {
            if self.stored(path)?.is_some() {
                found.insert(path.clone());
            }
            // The listings of `path` and of the directories under it.
            let prefix = listings_prefix(self.session);
            for item in self
                .tree
                .scan_prefix(listing_key(self.session, path.as_str()))
            {
                let (key, value) = item?;
                let dir = dir_of_key(&key, &prefix)?;
                let at = RelPath::new(dir).map_err(|e| SnapshotError::Corrupt(e.to_string()))?;
                if !at.starts_with(path) {
                    continue;
                }
                let listing: Listing = decode(&value)?;
                for name in listing.keys() {
                    found.insert(path_in(dir, name)?);
                }
            }
        }
        for (p, now) in self.changed_under(path) {
            if now.is_some() {
                found.insert(p.clone());
            } else {
                found.remove(p);
            }
        }
        Ok(found.into_iter().collect())
    }

    /// The listings the touched paths change, as they are now (an empty one: the key is
    /// removed).
    fn changed_listings(&self) -> Result<BTreeMap<String, Listing>, SnapshotError> {
        let mut listings: BTreeMap<String, Listing> = BTreeMap::new();
        for (path, (before, now)) in &self.changed {
            if before == now {
                continue;
            }
            let dir = dir_of(path);
            if !listings.contains_key(dir) {
                let stored = (*self.listing(dir)?).clone();
                listings.insert(dir.to_owned(), stored);
            }
            let listing = listings.get_mut(dir).expect("inserted above");
            match now {
                Some(kind) => listing.insert(path.file_name().to_owned(), kind.clone()),
                None => listing.remove(path.file_name()),
            };
        }
        Ok(listings)
    }

    /// What [`Manifest::check_well_formed`] checks, for the touched paths: each present one
    /// has a directory for its parent, and nothing is under one that is not a directory.
    fn check_well_formed(&self) -> Result<(), SnapshotError> {
        for (path, (before, now)) in &self.changed {
            let Some(kind) = now else { continue };
            if let Some(parent) = path.parent() {
                if !matches!(self.get(&parent)?, Some(EntryKind::Dir)) {
                    return Err(DeltaError::Invalid {
                        path: path.clone(),
                        reason: format!("its parent {parent} is not a directory of the tree"),
                    }
                    .into());
                }
            }
            if matches!(kind, EntryKind::Dir) {
                continue;
            }
            // Stored entries are under a stored directory only; touched ones are in memory.
            let child = if matches!(before, Some(EntryKind::Dir)) {
                self.under(path)?.into_iter().find(|p| p != path)
            } else {
                self.changed_under(path)
                    .find(|(p, now)| *p != path && now.is_some())
                    .map(|(p, _)| p.clone())
            };
            if let Some(child) = child {
                return Err(DeltaError::Invalid {
                    path: child,
                    reason: format!("its parent {path} is not a directory of the tree"),
                }
                .into());
            }
        }
        Ok(())
    }

    /// The files and bytes of the tree now, from those of the stored one.
    fn totals(&self, files: u64, bytes: u64) -> (u64, u64) {
        let size = |kind: &Option<EntryKind>| match kind {
            Some(EntryKind::File { size, .. }) => Some(*size),
            _ => None,
        };
        let (mut files, mut bytes) = (files, bytes);
        for (before, now) in self.changed.values() {
            if let Some(size) = size(before) {
                files = files.saturating_sub(1);
                bytes = bytes.saturating_sub(size);
            }
            if let Some(size) = size(now) {
                files += 1;
                bytes += size;
            }
        }
        (files, bytes)
    }
}

/// Rewrites the entries of a store written before listings (`e\0{session}\0{path}` →
/// [`EntryKind`], one key per path) as listings, in one batch; whether there were any.
fn rewrite_entries_as_listings(tree: &sled::Tree) -> Result<bool, SnapshotError> {
    let corrupt = |what: &str| SnapshotError::Corrupt(format!("an entry key {what}"));
    let mut listings: BTreeMap<Vec<u8>, Listing> = BTreeMap::new();
    let mut batch = sled::Batch::default();
    for item in tree.scan_prefix([b'e', 0]) {
        let (key, value) = item?;
        let rest = &key[2..];
        let split = rest
            .iter()
            .position(|b| *b == 0)
            .ok_or_else(|| corrupt("without a path"))?;
        let session = std::str::from_utf8(&rest[..split]).map_err(|_| corrupt("not UTF-8"))?;
        let path = std::str::from_utf8(&rest[split + 1..]).map_err(|_| corrupt("not UTF-8"))?;
        let path = RelPath::new(path).map_err(|e| SnapshotError::Corrupt(e.to_string()))?;
        listings
            .entry(listing_key(session, dir_of(&path)))
            .or_default()
            .insert(path.file_name().to_owned(), decode(&value)?);
        batch.remove(key);
    }
    if listings.is_empty() {
        return Ok(false);
    }
    for (key, listing) in &listings {
        batch.insert(key.as_slice(), encode(listing)?);
    }
    tree.apply_batch(batch)?;
    tracing::info!(
        directories = listings.len(),
        "snapshot entries rewritten as listings"
    );
    Ok(true)
}

impl Snapshots {
    /// Opens (creating) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Snapshots, SnapshotError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(8 * 1024 * 1024)
            .open()?;
        let tree = db.open_tree("snapshots")?;
        if rewrite_entries_as_listings(&tree)? {
            db.flush()?;
        }
        Ok(Snapshots {
            db,
            tree,
            locks: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self, session: &str) -> Arc<Mutex<()>> {
        let mut locks = self.locks.lock().expect("snapshot locks poisoned");
        Arc::clone(locks.entry(session.to_owned()).or_default())
    }

    /// The session's newest version (0 before any commit).
    pub fn newest(&self, session: &str) -> Result<VersionInfo, SnapshotError> {
        match self.tree.get(key(b'n', session))? {
            Some(bytes) => decode(&bytes),
            None => Ok(version_zero()),
        }
    }

    /// The session's newest tree.
    pub fn manifest(&self, session: &str) -> Result<Manifest, SnapshotError> {
        let prefix = listings_prefix(session);
        let mut manifest = Manifest::new();
        for item in self.tree.scan_prefix(&prefix) {
            let (k, v) = item?;
            let dir = dir_of_key(&k, &prefix)?;
            let listing: Listing = decode(&v)?;
            for (name, kind) in listing {
                manifest.insert(path_in(dir, &name)?, kind);
            }
        }
        Ok(manifest)
    }

    /// Commits `delta` on `base` for `session` (see the module docs). Every blob the delta
    /// needs must be in `blobs` for `org`.
    #[allow(clippy::too_many_arguments)]
    pub fn commit(
        &self,
        session: &str,
        org: &str,
        blobs: &BlobStore,
        base: u64,
        delta: &Delta,
        git: Option<GitState>,
        author: VersionAuthor,
        now: u64,
    ) -> Result<Commit, SnapshotError> {
        self.commit_alongside(session, org, blobs, base, delta, git, author, now, |_| ())
            .map(|(commit, _)| commit)
    }

    /// [`Snapshots::commit`], running `alongside` with the new version while it is
    /// written and flushed (after the org's new blob packs are synced: [`BlobStore::sync`]),
    /// once every check has passed (the relay writes the version's
    /// files into the workspace meanwhile). It does not run for a stale base, or for a
    /// delta that changes nothing. If the write then fails, what `alongside` did stays
    /// done: the error is returned, and its outcome dropped.
    #[allow(clippy::too_many_arguments)]
    pub fn commit_alongside<R>(
        &self,
        session: &str,
        org: &str,
        blobs: &BlobStore,
        base: u64,
        delta: &Delta,
        git: Option<GitState>,
        author: VersionAuthor,
        now: u64,
        alongside: impl FnOnce(&VersionInfo) -> R,
    ) -> Result<(Commit, Option<R>), SnapshotError> {
        let began = std::time::Instant::now();
        delta.validate()?;
        let lock = self.lock(session);
        let _serialised = lock.lock().expect("a session's snapshot lock poisoned");
        let newest = self.newest(session)?;
        if base != newest.version {
            return Ok((
                Commit::Stale {
                    current: newest.version,
                },
                None,
            ));
        }
        if delta.is_empty() && git == newest.git {
            return Ok((Commit::Committed(newest), None));
        }
        let needed = delta.blobs();
        let missing = blobs.lacks(org, &needed)?;
        if let Some(first) = missing.first() {
            return Err(SnapshotError::MissingBlobs {
                missing: missing.len(),
                first: first.to_hex(),
            });
        }
        // Only the paths the delta touches are read and checked: a commit costs what it
        // changes, not the size of the tree (and a first push's, into a tree with no
        // entry, reads none: 23,000 lookups of absent keys took about 0.1 s).
        let mut view = View {
            tree: &self.tree,
            session,
            changed: BTreeMap::new(),
            empty: self
                .tree
                .scan_prefix(listings_prefix(session))
                .next()
                .is_none(),
            listings: RefCell::default(),
        };
        for change in &delta.changes {
            match change {
                Change::Remove(path) => {
                    for gone in view.under(path)? {
                        view.set(gone, None)?;
                    }
                }
                Change::Put(entry) => view.set(entry.path.clone(), Some(entry.kind.clone()))?,
            }
        }
        view.check_well_formed()?;
        let (files, bytes) = view.totals(newest.files, newest.bytes);
        let info = VersionInfo {
            version: newest.version + 1,
            base,
            author,
            git,
            at: now,
            files,
            bytes,
        };
        tracing::debug!(%session, "the commit's checks took {:?}", began.elapsed());
        let info_ref = &info;
        let (written, done) = std::thread::scope(|scope| {
            let writer = scope.spawn(move || -> Result<(), SnapshotError> {
                // The listings that changed, written whole (an empty one removed): built
                // here, beside the workspace's writes, every check having passed.
                let mut batch = sled::Batch::default();
                for (dir, listing) in view.changed_listings()? {
                    match listing.is_empty() {
                        true => batch.remove(listing_key(session, &dir)),
                        false => batch.insert(listing_key(session, &dir), encode(&listing)?),
                    }
                }
                batch.insert(
                    version_key(session, info_ref.version),
                    encode(&(info_ref, delta))?,
                );
                batch.insert(key(b'n', session), encode(info_ref)?);
                // The blobs on disk before a version that needs them is.
                if !needed.is_empty() {
                    blobs.sync(org)?;
                }
                tracing::debug!(%session, "the version's blobs durable after {:?}", began.elapsed());
                self.tree.apply_batch(batch)?;
                self.db.flush()?;
                tracing::debug!(%session, "the version written after {:?}", began.elapsed());
                Ok(())
            });
            let done = alongside(&info);
            let written = writer.join().unwrap_or_else(|_| {
                Err(SnapshotError::Corrupt("a version's writer panicked".into()))
            });
            (written, done)
        });
        written?;
        Ok((Commit::Committed(info), Some(done)))
    }

    /// The newest version and the changes from version `since` to it. From version 0 that
    /// is the whole tree.
    pub fn changes(
        &self,
        session: &str,
        since: u64,
    ) -> Result<(VersionInfo, Delta), SnapshotError> {
        let newest = self.newest(session)?;
        if since > newest.version {
            return Err(SnapshotError::Future {
                since,
                newest: newest.version,
            });
        }
        if since == 0 {
            return Ok((newest, Manifest::new().diff(&self.manifest(session)?)));
        }
        if since == newest.version {
            return Ok((newest, Delta::default()));
        }
        // The deltas since then, composed: per path, whether it was removed (with all
        // under it) and what was put there last; a removal drops earlier changes under it.
        let mut composed: BTreeMap<RelPath, (bool, Option<EntryKind>)> = BTreeMap::new();
        let from = version_key(session, since + 1);
        let to = version_key(session, newest.version);
        for item in self.tree.range(from..=to) {
            let (_, value) = item?;
            let (_, delta): (VersionInfo, Delta) = decode(&value)?;
            for change in delta.changes {
                match change {
                    Change::Remove(path) => {
                        let under: Vec<RelPath> = composed
                            .range(path.clone()..)
                            .take_while(|(p, _)| p.as_str().starts_with(path.as_str()))
                            .filter(|(p, _)| p.starts_with(&path))
                            .map(|(p, _)| p.clone())
                            .collect();
                        for p in under {
                            composed.remove(&p);
                        }
                        composed.insert(path, (true, None));
                    }
                    Change::Put(entry) => {
                        composed.entry(entry.path).or_insert((false, None)).1 = Some(entry.kind);
                    }
                }
            }
            if composed.len() > MAX_DELTA_CHANGES {
                break;
            }
        }
        if composed.len() > MAX_DELTA_CHANGES {
            // More than one answer may carry: the caller starts again from version 0.
            return Err(SnapshotError::Delta(DeltaError::TooLarge(composed.len())));
        }
        let mut changes: Vec<Change> = composed
            .iter()
            .filter(|(_, (removed, _))| *removed)
            .map(|(path, _)| Change::Remove(path.clone()))
            .collect();
        changes.extend(composed.into_iter().filter_map(|(path, (_, kind))| {
            kind.map(|kind| Change::Put(cloud_protocol::teleport::Entry { path, kind }))
        }));
        Ok((newest, Delta { changes }))
    }

    /// Forgets a deleted session's versions.
    pub fn delete_session(&self, session: &str) -> Result<(), SnapshotError> {
        let lock = self.lock(session);
        let _serialised = lock.lock().expect("a session's snapshot lock poisoned");
        let mut batch = sled::Batch::default();
        for prefix in [b't', b'v', b'e'] {
            let mut prefix = key(prefix, session);
            prefix.push(0);
            for item in self.tree.scan_prefix(&prefix) {
                batch.remove(item?.0);
            }
        }
        batch.remove(key(b'n', session));
        self.tree.apply_batch(batch)?;
        self.db.flush()?;
        self.locks
            .lock()
            .expect("snapshot locks poisoned")
            .remove(session);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloud_protocol::blobs::Blob;
    use cloud_protocol::teleport::{ContentId, Entry};

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    fn file(blobs: &BlobStore, text: &str) -> EntryKind {
        let blob = Blob {
            id: ContentId::of(text.as_bytes()),
            bytes: text.as_bytes().to_vec(),
        };
        blobs.put("acme", std::slice::from_ref(&blob)).unwrap();
        EntryKind::File {
            executable: false,
            size: text.len() as u64,
            content: blob.id,
            chunks: Vec::new(),
        }
    }

    fn tree(entries: &[(&str, EntryKind)]) -> Manifest {
        entries
            .iter()
            .map(|(path, kind)| Entry {
                path: p(path),
                kind: kind.clone(),
            })
            .collect()
    }

    #[test]
    fn what_runs_alongside_a_commit_runs_only_for_a_new_version() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::new(dir.path().join("blobs"));
        let snapshots = Snapshots::open(&dir.path().join("snapshots")).unwrap();
        let me = || VersionAuthor::Instance("i-1".into());
        let v1 = tree(&[("a", file(&blobs, "a1"))]);
        let delta = Manifest::new().diff(&v1);
        assert_eq!(blobs.unsynced("acme"), 1);
        let commit = |base, delta: &Delta| {
            snapshots
                .commit_alongside("s-1", "acme", &blobs, base, delta, None, me(), 1, |info| {
                    info.version
                })
                .unwrap()
        };
        let (outcome, ran) = commit(0, &delta);
        assert!(matches!(outcome, Commit::Committed(ref info) if info.version == 1));
        assert_eq!(ran, Some(1), "it runs with the version being written");
        assert_eq!(blobs.unsynced("acme"), 0, "its blobs were synced first");
        // Stale: not run, nothing written.
        let (outcome, ran) = commit(0, &delta);
        assert_eq!(outcome, Commit::Stale { current: 1 });
        assert_eq!(ran, None);
        // Nothing to change: not run either.
        let (_, ran) = commit(1, &Delta::default());
        assert_eq!(ran, None);
        assert_eq!(snapshots.newest("s-1").unwrap().version, 1);
    }

    #[test]
    fn commits_need_the_newest_base_and_their_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::new(dir.path().join("blobs"));
        let snapshots = Snapshots::open(&dir.path().join("snapshots")).unwrap();
        let me = || VersionAuthor::Instance("i-1".into());
        let v1 = tree(&[("src", EntryKind::Dir), ("src/a", file(&blobs, "a1"))]);
        let delta = Manifest::new().diff(&v1);
        let Commit::Committed(info) = snapshots
            .commit("s-1", "acme", &blobs, 0, &delta, None, me(), 1)
            .unwrap()
        else {
            panic!("not committed")
        };
        assert_eq!((info.version, info.files, info.bytes), (1, 1, 2));
        // A stale base is refused.
        let v2 = tree(&[("src", EntryKind::Dir), ("src/a", file(&blobs, "a2"))]);
        assert_eq!(
            snapshots
                .commit("s-1", "acme", &blobs, 0, &v1.diff(&v2), None, me(), 2)
                .unwrap(),
            Commit::Stale { current: 1 }
        );
        // A blob the relay lacks is refused.
        let unknown = EntryKind::File {
            executable: false,
            size: 1,
            content: ContentId::of(b"never uploaded"),
            chunks: Vec::new(),
        };
        let v2_bad = tree(&[("src", EntryKind::Dir), ("src/a", unknown)]);
        assert!(matches!(
            snapshots.commit("s-1", "acme", &blobs, 1, &v1.diff(&v2_bad), None, me(), 2),
            Err(SnapshotError::MissingBlobs { missing: 1, .. })
        ));
        // A tree without a file's parent is refused.
        let orphan = Delta {
            changes: vec![Change::Put(Entry {
                path: p("nowhere/x"),
                kind: file(&blobs, "x"),
            })],
        };
        assert!(snapshots
            .commit("s-1", "acme", &blobs, 1, &orphan, None, me(), 2)
            .is_err());
        assert_eq!(snapshots.newest("s-1").unwrap().version, 1);
        snapshots
            .commit(
                "s-1",
                "acme",
                &blobs,
                1,
                &v1.diff(&v2),
                None,
                VersionAuthor::Agent,
                3,
            )
            .unwrap();
        assert_eq!(snapshots.manifest("s-1").unwrap(), v2);
    }

    #[test]
    fn changes_since_any_version_bring_the_newest_tree() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::new(dir.path().join("blobs"));
        let snapshots = Snapshots::open(&dir.path().join("snapshots")).unwrap();
        let trees = [
            tree(&[
                ("a", EntryKind::Dir),
                ("a/x", file(&blobs, "1")),
                ("b", file(&blobs, "2")),
            ]),
            tree(&[
                ("a", EntryKind::Dir),
                ("a/x", file(&blobs, "3")),
                ("a/y", file(&blobs, "4")),
            ]),
            tree(&[("a", file(&blobs, "5")), ("c", EntryKind::Dir)]),
            tree(&[
                ("a", EntryKind::Dir),
                ("a/z", file(&blobs, "6")),
                ("c", EntryKind::Dir),
            ]),
        ];
        let mut previous = Manifest::new();
        for (n, tree) in trees.iter().enumerate() {
            snapshots
                .commit(
                    "s",
                    "acme",
                    &blobs,
                    n as u64,
                    &previous.diff(tree),
                    None,
                    VersionAuthor::Agent,
                    0,
                )
                .unwrap();
            previous = tree.clone();
        }
        let mut olds = vec![Manifest::new()];
        olds.extend(trees.iter().cloned());
        for (since, old) in olds.iter().enumerate() {
            let (newest, delta) = snapshots.changes("s", since as u64).unwrap();
            assert_eq!(newest.version, 4);
            let mut applied = old.clone();
            applied.apply(&delta);
            assert_eq!(applied, trees[3], "since {since}");
        }
        assert!(snapshots.changes("s", 5).is_err());
        // Reopened, it is all still there.
        drop(snapshots);
        let snapshots = Snapshots::open(&dir.path().join("snapshots")).unwrap();
        assert_eq!(snapshots.manifest("s").unwrap(), trees[3]);
        snapshots.delete_session("s").unwrap();
        assert_eq!(snapshots.newest("s").unwrap().version, 0);
        assert!(snapshots.manifest("s").unwrap().is_empty());
    }

    #[test]
    fn a_store_of_entries_per_path_opens_as_the_same_trees() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::new(dir.path().join("blobs"));
        let path = dir.path().join("snapshots");
        let trees = [
            tree(&[
                ("a", EntryKind::Dir),
                ("a/b", EntryKind::Dir),
                ("a/b/c", file(&blobs, "1")),
                ("a/d", file(&blobs, "2")),
                ("ab", file(&blobs, "3")),
                ("e", EntryKind::Dir),
            ]),
            tree(&[("x", file(&blobs, "4"))]),
        ];
        {
            // As the relay stored a tree before listings: one key per path.
            let db = sled::Config::new().path(&path).open().unwrap();
            let old = db.open_tree("snapshots").unwrap();
            for (session, tree) in ["s-1", "s-2"].iter().zip(&trees) {
                for (p, kind) in tree.iter() {
                    let mut key = key(b'e', session);
                    key.push(0);
                    key.extend_from_slice(p.as_str().as_bytes());
                    old.insert(key, encode(kind).unwrap()).unwrap();
                }
                let (files, bytes) = tree.totals();
                let info = VersionInfo {
                    version: 1,
                    files,
                    bytes,
                    ..version_zero()
                };
                old.insert(super::key(b'n', session), encode(&info).unwrap())
                    .unwrap();
            }
            db.flush().unwrap();
        }
        let snapshots = Snapshots::open(&path).unwrap();
        assert_eq!(snapshots.manifest("s-1").unwrap(), trees[0]);
        assert_eq!(snapshots.manifest("s-2").unwrap(), trees[1]);
        assert!(snapshots.tree.scan_prefix([b'e', 0]).next().is_none());
        // And commits go on from them.
        let next = tree(&[("a", EntryKind::Dir), ("a/d", file(&blobs, "5"))]);
        snapshots
            .commit(
                "s-1",
                "acme",
                &blobs,
                1,
                &trees[0].diff(&next),
                None,
                VersionAuthor::Agent,
                2,
            )
            .unwrap();
        assert_eq!(snapshots.manifest("s-1").unwrap(), next);
        assert_eq!(snapshots.manifest("s-2").unwrap(), trees[1]);
    }

    /// Commits read only the paths their delta touches; this checks them against the
    /// whole-tree definition (`Manifest::apply`, `check_well_formed`, `totals`) over
    /// seeded random deltas, well formed or not: the same verdict, tree and totals.
    #[test]
    fn a_commit_agrees_with_applying_its_delta_to_the_whole_tree() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::new(dir.path().join("blobs"));
        let snapshots = Snapshots::open(&dir.path().join("snapshots")).unwrap();
        let contents: Vec<EntryKind> = (0..4).map(|n| file(&blobs, &"x".repeat(n + 1))).collect();
        let names = ["a", "a/b", "a/b/c", "a/d", "ab", "b", "b/c", "c"];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let mut reference = Manifest::new();
        let mut version = 0;
        let (mut accepted, mut refused) = (0, 0);
        for round in 0..3000 {
            let mut changes = Vec::new();
            for _ in 0..1 + next(4) {
                let path = p(names[next(names.len())]);
                changes.push(match next(5) {
                    0 => Change::Remove(path),
                    1 | 2 => Change::Put(Entry {
                        path,
                        kind: EntryKind::Dir,
                    }),
                    3 => Change::Put(Entry {
                        path,
                        kind: EntryKind::Symlink {
                            target: "elsewhere".into(),
                        },
                    }),
                    _ => Change::Put(Entry {
                        path,
                        kind: contents[next(contents.len())].clone(),
                    }),
                });
            }
            let delta = Delta { changes };
            let mut applied = reference.clone();
            applied.apply(&delta);
            let well_formed = applied.check_well_formed().is_ok();
            let outcome = snapshots.commit(
                "s",
                "acme",
                &blobs,
                version,
                &delta,
                None,
                VersionAuthor::Agent,
                round,
            );
            match outcome {
                Ok(Commit::Committed(info)) => {
                    assert!(well_formed, "round {round}: {delta:?} on {reference:?}");
                    assert_eq!((info.files, info.bytes), applied.totals(), "round {round}");
                    version = info.version;
                    reference = applied;
                    accepted += 1;
                }
                Ok(Commit::Stale { .. }) => panic!("round {round}: stale"),
                Err(e) => {
                    assert!(
                        !well_formed,
                        "round {round}: {e} for {delta:?} on {reference:?}"
                    );
                    refused += 1;
                }
            }
            assert_eq!(snapshots.manifest("s").unwrap(), reference, "round {round}");
        }
        assert!(
            accepted > 300 && refused > 300,
            "{accepted} accepted, {refused} refused"
        );
    }
}

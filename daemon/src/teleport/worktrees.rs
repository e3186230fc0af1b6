//! The linked worktrees, in the `teleport` tree of teleport's database ([`super::db`]):
//! each link (a worktree root and its session), the tree both sides last agreed on (the
//! base of the next push and pull), and the scanner's index, so an unchanged file is never
//! read again, also after a restart.
//!
//! Keys (a root is an absolute path, which holds no NUL byte):
//! - `w\0{root}` → the [`Worktree`] (postcard).
//! - `m\0{root}\0{path}` → the base tree's entry at `path` ([`EntryKind`], postcard).
//! - `i\0{root}\0{path}` → the index's entry at `path` ([`Indexed::encode`]).
//! - `s\0{root}` → when the scan that made the index started (ns, i64 BE).
//! - `h\0{root}` → the base tree's digest (32 bytes): the XOR of a hash of each entry
//!   (path and encoded kind), so a delta changes it entry by entry. A full scan whose tree
//!   has the same digest has nothing to push, and the base (20,000 keys for 20,000 files)
//!   is not read. A base and its digest never disagree: a change removes the digest
//!   first and writes it last (one key at a time: the daemon uses no sled batch). Without
//!   a digest (a write cut short, an older daemon's store) the base is read and the
//!   digest written.
//!
//! Updates write only what changed (one key per path), so an edit costs a few keys, not
//! the whole tree. Only a link's changes are flushed (its database has no periodic
//! flusher, see [`super::db`]): a base or an index lost to a crash is found again
//! by the next scan (a file whose index entry is gone is hashed again; a base that is
//! behind makes the next push send more than needed, never less, and the relay refuses a
//! stale base). Every call does blocking IO: callers run it off the socket's thread. A call
//! that reads or writes a whole tree's keys marks the database so (`WHOLE_KEYS`), and the
//! operation's end closes it ([`Worktrees::settle`]), which frees what sled cached.
//!
//! This module must never touch a worktree's files or talk to the relay.

use std::collections::HashMap;

use cloud_protocol::teleport::{Change, Delta, EntryKind, Manifest, RelPath};
use cloud_tree::{Index, IndexChange, Indexed};
use serde::{Deserialize, Serialize};

use super::db::{Held, TeleportDb};
use crate::store::StoreError;

/// A worktree linked to a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Worktree {
    /// Its root, absolute and canonical.
    pub root: String,
    /// The session it is linked to.
    pub session: String,
    /// The version both sides agreed on last (0: none yet): the base tree's version.
    pub version: u64,
    /// The session's newest version the daemon has heard of.
    pub remote_version: u64,
    /// Whether the daemon keeps it in step (a watch).
    pub watching: bool,
    /// The latest failure, if the latest attempt failed.
    pub last_error: Option<String>,
    /// Conflict copies the latest scan found in the worktree.
    pub conflicts: Vec<String>,
    /// The git HEAD the relay took last (its history up to there need not be sent again).
    pub git_sent: Option<String>,
    /// Whether the last pull could not write some of the session's changes: the agreed
    /// tree keeps what was agreed before there, and the next pull asks for the whole tree.
    pub unapplied: bool,
}

impl Worktree {
    /// Both sides agree on version `version` now.
    pub fn agree_on(&mut self, version: u64) {
        self.version = version;
        self.remote_version = self.remote_version.max(version);
        self.last_error = None;
    }

    /// A new link of `root` to `session`, with nothing agreed yet.
    pub fn new(root: &str, session: &str) -> Worktree {
        Worktree {
            root: root.to_owned(),
            session: session.to_owned(),
            version: 0,
            remote_version: 0,
            watching: false,
            last_error: None,
            conflicts: Vec::new(),
            git_sent: None,
            unapplied: false,
        }
    }
}

/// The links, agreed trees and indexes, in teleport's database.
#[derive(Debug, Clone)]
pub struct Worktrees {
    db: TeleportDb,
}

fn key(prefix: u8, root: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(root.len() + 2);
    key.push(prefix);
    key.push(0);
    key.extend_from_slice(root.as_bytes());
    key
}

fn path_prefix(prefix: u8, root: &str) -> Vec<u8> {
    let mut key = key(prefix, root);
    key.push(0);
    key
}

fn path_key(prefix: u8, root: &str, path: &RelPath) -> Vec<u8> {
    let mut key = path_prefix(prefix, root);
    key.extend_from_slice(path.as_str().as_bytes());
    key
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        what: "teleport",
        message: format!("{what}: {e}"),
    }
}

/// Reading or writing more of a root's keys than this at once counts as a whole tree's
/// (the database is closed at the end of the operation, see [`super::db`]); an edit's
/// are a few.
const WHOLE_KEYS: usize = 1_000;

/// A tree's digest (see the module's keys).
type Digest = [u8; 32];

/// Adds or takes away (the same thing: XOR) the entry `path` → `encoded_kind` to `digest`.
fn toggle(digest: &mut Digest, path: &str, encoded_kind: &[u8]) {
    let mut hasher = blake3::Hasher::new();
    hasher.update(path.as_bytes());
    hasher.update(&[0]);
    hasher.update(encoded_kind);
    for (d, h) in digest.iter_mut().zip(hasher.finalize().as_bytes()) {
        *d ^= h;
    }
}

fn encode_kind(kind: &EntryKind) -> Result<Vec<u8>, StoreError> {
    postcard::to_allocvec(kind).map_err(|e| corrupt("a base entry", e))
}

/// The digest of `tree`.
pub fn digest(tree: &Manifest) -> Result<Digest, StoreError> {
    let mut digest = [0; 32];
    for (path, kind) in tree.iter() {
        toggle(&mut digest, path.as_str(), &encode_kind(kind)?);
    }
    Ok(digest)
}

/// The paths under `prefix`, decoded.
fn paths<'a>(
    tree: &'a sled::Tree,
    prefix: Vec<u8>,
) -> impl Iterator<Item = Result<(RelPath, sled::IVec), StoreError>> + 'a {
    let skip = prefix.len();
    tree.scan_prefix(prefix).map(move |item| {
        let (key, value) = item.map_err(StoreError::sled("teleport"))?;
        let path = std::str::from_utf8(&key[skip..]).map_err(|e| corrupt("a path", e))?;
        let path = RelPath::new(path).map_err(|e| corrupt("a path", e))?;
        Ok((path, value))
    })
}

impl Worktrees {
    /// The worktrees kept in `db`.
    pub fn new(db: TeleportDb) -> Worktrees {
        Worktrees { db }
    }

    /// Closes the database if a whole tree went through it since it was opened and
    /// nothing else uses it ([`TeleportDb::settle`]): what every push, pull and watch
    /// step calls when it ends. Blocking.
    pub fn settle(&self) {
        self.db.settle();
    }

    /// The database's tree; `whole`: the caller reads or writes a whole tree's keys.
    fn tree(&self, whole: bool) -> Result<Held, StoreError> {
        let tree = self.db.tree()?;
        if whole {
            self.db.mark_whole();
        }
        Ok(tree)
    }

    /// Moves what an older daemon kept in `store`'s `teleport` tree (before teleport had a
    /// database of its own) into this one, once.
    pub fn take_over(&self, store: &sled::Db) -> Result<(), StoreError> {
        if !store
            .tree_names()
            .iter()
            .any(|name| name.as_ref() == b"teleport")
        {
            return Ok(());
        }
        let old = store
            .open_tree("teleport")
            .map_err(StoreError::sled("teleport"))?;
        let tree = self.tree(true)?;
        for item in old.iter() {
            let (k, v) = item.map_err(StoreError::sled("teleport"))?;
            tree.insert(k, v).map_err(StoreError::sled("teleport"))?;
        }
        tree.flush().map_err(StoreError::sled("teleport"))?;
        store
            .drop_tree("teleport")
            .map_err(StoreError::sled("teleport"))?;
        Ok(())
    }

    /// Every linked worktree, by root.
    pub fn list(&self) -> Result<Vec<Worktree>, StoreError> {
        let tree = self.tree(false)?;
        let mut out = Vec::new();
        for item in tree.scan_prefix([b'w', 0]) {
            let (_, value) = item.map_err(StoreError::sled("teleport"))?;
            out.push(postcard::from_bytes(&value).map_err(|e| corrupt("a worktree", e))?);
        }
        Ok(out)
    }

    /// The worktree at `root`, if linked.
    pub fn get(&self, root: &str) -> Result<Option<Worktree>, StoreError> {
        let tree = self.tree(false)?;
        tree.get(key(b'w', root))
            .map_err(StoreError::sled("teleport"))?
            .map(|v| postcard::from_bytes(&v).map_err(|e| corrupt("a worktree", e)))
            .transpose()
    }

    /// Records `worktree`, durably when the link itself changed (made, moved to another
    /// session, watched or not): its version and errors may be lost to a crash without
    /// harm, the link may not.
    pub fn put(&self, worktree: &Worktree) -> Result<(), StoreError> {
        let tree = self.tree(false)?;
        let value = postcard::to_allocvec(worktree).map_err(|e| corrupt("a worktree", e))?;
        let before = tree
            .insert(key(b'w', &worktree.root), value)
            .map_err(StoreError::sled("teleport"))?;
        let before: Option<Worktree> = before.and_then(|v| postcard::from_bytes(&v).ok());
        let relinked = before.is_none_or(|b| {
            (b.session.as_str(), b.watching) != (worktree.session.as_str(), worktree.watching)
        });
        if relinked {
            tree.flush().map_err(StoreError::sled("teleport"))?;
        }
        Ok(())
    }

    /// The base tree of `root`.
    pub fn base(&self, root: &str) -> Result<Manifest, StoreError> {
        let tree = self.tree(true)?;
        let mut base = Manifest::new();
        for item in paths(&tree, path_prefix(b'm', root)) {
            let (path, value) = item?;
            let kind: EntryKind =
                postcard::from_bytes(&value).map_err(|e| corrupt("a base entry", e))?;
            base.insert(path, kind);
        }
        Ok(base)
    }

    /// The base tree's entries at and under `paths` (what a watch diffs an edit against).
    pub fn base_under<'a>(
        &self,
        root: &str,
        paths: impl IntoIterator<Item = &'a RelPath>,
    ) -> Result<Manifest, StoreError> {
        let tree = self.tree(false)?;
        let skip = path_prefix(b'm', root).len();
        let mut base = Manifest::new();
        let mut add = |key: &[u8], value: &[u8]| -> Result<(), StoreError> {
            let path = std::str::from_utf8(&key[skip..]).map_err(|e| corrupt("a path", e))?;
            let path = RelPath::new(path).map_err(|e| corrupt("a path", e))?;
            let kind: EntryKind =
                postcard::from_bytes(value).map_err(|e| corrupt("a base entry", e))?;
            base.insert(path, kind);
            Ok(())
        };
        for path in paths {
            let at = path_key(b'm', root, path);
            if let Some(value) = tree.get(&at).map_err(StoreError::sled("teleport"))? {
                add(&at, &value)?;
            }
            let mut under = at;
            under.push(b'/');
            for item in tree.scan_prefix(&under) {
                let (key, value) = item.map_err(StoreError::sled("teleport"))?;
                add(&key, &value)?;
            }
        }
        if base.len() > WHOLE_KEYS {
            self.db.mark_whole();
        }
        Ok(base)
    }

    /// The stored digest of `root`'s base tree, if there is one.
    fn base_digest(&self, root: &str) -> Result<Option<Digest>, StoreError> {
        Ok(self
            .tree(false)?
            .get(key(b'h', root))
            .map_err(StoreError::sled("teleport"))?
            .and_then(|v| Digest::try_from(v.as_ref()).ok()))
    }

    /// The base tree of `root`, unless it is `tree` (their digests agree): then `None`,
    /// and the base was not read. A base without a digest is read and its digest stored.
    pub fn base_unless(&self, root: &str, tree: &Manifest) -> Result<Option<Manifest>, StoreError> {
        let stored = self.base_digest(root)?;
        if stored.is_some() && stored == Some(digest(tree)?) {
            return Ok(None);
        }
        let base = self.base(root)?;
        if stored.is_none() {
            self.tree(false)?
                .insert(key(b'h', root), &digest(&base)?)
                .map_err(StoreError::sled("teleport"))?;
        }
        Ok(Some(base))
    }

    /// Makes `new` the base tree of `root`, where `old` was (writing what differs, then the
    /// digest).
    pub fn set_base(&self, root: &str, old: &Manifest, new: &Manifest) -> Result<(), StoreError> {
        let mut writes = Vec::new();
        for (path, _) in old.iter() {
            if new.get(path).is_none() {
                writes.push((path_key(b'm', root, path), None));
            }
        }
        for (path, kind) in new.iter() {
            if old.get(path) != Some(kind) {
                writes.push((path_key(b'm', root, path), Some(encode_kind(kind)?)));
            }
        }
        self.write_base(root, writes, Some(digest(new)?))
    }

    /// Writes base entries (`None`: removed) and the digest they lead to (`None`: none).
    /// One key at a time, as everywhere in the daemon (no sled batch: see `crate::store`),
    /// with the digest removed first and written last: a crash in between leaves none,
    /// and the next push reads the whole base and stores its digest again.
    fn write_base(
        &self,
        root: &str,
        writes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
        digest: Option<Digest>,
    ) -> Result<(), StoreError> {
        let tree = self.tree(writes.len() > WHOLE_KEYS)?;
        let sled_error = || StoreError::sled("teleport");
        tree.remove(key(b'h', root)).map_err(sled_error())?;
        for (k, v) in writes {
            match v {
                Some(v) => tree.insert(k, v).map(drop),
                None => tree.remove(k).map(drop),
            }
            .map_err(sled_error())?;
        }
        if let Some(digest) = digest {
            tree.insert(key(b'h', root), &digest)
                .map_err(sled_error())?;
        }
        Ok(())
    }

    /// Applies `delta` to the stored base tree of `root` (a removal takes what is under
    /// its path): only the paths it names are written, with the digest changed entry by
    /// entry, so an edit costs a few keys.
    pub fn apply_base(&self, root: &str, delta: &Delta) -> Result<(), StoreError> {
        let tree = self.tree(false)?;
        let mut digest = self.base_digest(root)?;
        // What this batch writes, so a path the delta touches twice (a removed directory,
        // then a file put under it) is seen as the batch leaves it.
        let mut written: HashMap<Vec<u8>, Option<Vec<u8>>> = HashMap::new();
        let skip = path_prefix(b'm', root).len();
        let remove = |key: Vec<u8>,
                      old: Option<Vec<u8>>,
                      written: &mut HashMap<Vec<u8>, Option<Vec<u8>>>,
                      digest: &mut Option<Digest>| {
            if let (Some(digest), Some(old)) = (digest.as_mut(), old) {
                toggle(digest, &String::from_utf8_lossy(&key[skip..]), &old);
            }
            written.insert(key, None);
        };
        // A first push's base starts with no entry: nothing is read (23,000 lookups of
        // absent keys at the end of an initial push).
        let empty = tree.scan_prefix(path_prefix(b'm', root)).next().is_none();
        let current =
            |key: &[u8], written: &HashMap<Vec<u8>, Option<Vec<u8>>>| match written.get(key) {
                Some(value) => Ok(value.clone()),
                None if empty => Ok(None),
                None => tree
                    .get(key)
                    .map(|v| v.map(|v| v.to_vec()))
                    .map_err(StoreError::sled("teleport")),
            };
        for change in &delta.changes {
            match change {
                Change::Remove(path) => {
                    let at = path_key(b'm', root, path);
                    let old = current(&at, &written)?;
                    remove(at.clone(), old, &mut written, &mut digest);
                    let mut under = at;
                    under.push(b'/');
                    let mut below = Vec::new();
                    let stored = (!empty).then(|| tree.scan_prefix(&under));
                    for item in stored.into_iter().flatten() {
                        let (k, _) = item.map_err(StoreError::sled("teleport"))?;
                        below.push(k.to_vec());
                    }
                    below.extend(
                        written
                            .iter()
                            .filter(|(k, v)| k.starts_with(&under) && v.is_some())
                            .map(|(k, _)| k.clone()),
                    );
                    below.sort();
                    below.dedup();
                    for k in below {
                        let old = current(&k, &written)?;
                        remove(k, old, &mut written, &mut digest);
                    }
                }
                Change::Put(entry) => {
                    let at = path_key(b'm', root, &entry.path);
                    let new = encode_kind(&entry.kind)?;
                    if let Some(digest) = digest.as_mut() {
                        if let Some(old) = current(&at, &written)? {
                            toggle(digest, entry.path.as_str(), &old);
                        }
                        toggle(digest, entry.path.as_str(), &new);
                    }
                    written.insert(at, Some(new));
                }
            }
        }
        // In key order: sled takes them faster than scattered (a 23,000-entry base in about
        // 0.36 s against 0.45).
        let mut writes: Vec<_> = written.into_iter().collect();
        writes.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        self.write_base(root, writes, digest)
    }

    /// The scanner's index of `root` (empty before the first scan).
    pub fn index(&self, root: &str) -> Result<Index, StoreError> {
        let tree = self.tree(true)?;
        let scanned_at = self.index_stamp(root)?;
        // In key order, so the map is built in one pass rather than entry by entry.
        let mut entries = Vec::new();
        for item in paths(&tree, path_prefix(b'i', root)) {
            let (path, value) = item?;
            // An entry that does not decode is dropped: the file is hashed again.
            if let Ok(indexed) = Indexed::decode(&path, &value) {
                entries.push((path, indexed));
            }
        }
        Ok(Index::from_entries(
            scanned_at,
            entries.into_iter().collect(),
        ))
    }

    /// Part of the stored index of `root`, with the whole index's scan stamp: the entries
    /// at and under each of `paths`, and (`ancestors`) at each of their parent
    /// directories. What a rescan of `paths` reads, so a watch need not hold the index of
    /// a whole tree for an edit's sake (20,000 files are about 5 MiB in memory, a few
    /// keys per edit here).
    pub fn index_of<'a>(
        &self,
        root: &str,
        paths: impl IntoIterator<Item = &'a RelPath>,
        ancestors: bool,
    ) -> Result<Index, StoreError> {
        let tree = self.tree(false)?;
        let mut entries = std::collections::BTreeMap::new();
        let mut get = |path: &RelPath| -> Result<(), StoreError> {
            if !entries.contains_key(path) {
                let at = path_key(b'i', root, path);
                if let Some(value) = tree.get(&at).map_err(StoreError::sled("teleport"))? {
                    // An entry that does not decode is left out: the file is hashed again.
                    if let Ok(indexed) = Indexed::decode(path, &value) {
                        entries.insert(path.clone(), indexed);
                    }
                }
            }
            Ok(())
        };
        let mut unders = Vec::new();
        for path in paths {
            get(path)?;
            if ancestors {
                let mut parent = path.parent();
                while let Some(at) = parent {
                    get(&at)?;
                    parent = at.parent();
                }
            }
            unders.push(path);
        }
        for path in unders {
            let mut under = path_prefix(b'i', root);
            under.extend_from_slice(path.as_str().as_bytes());
            under.push(b'/');
            let skip = path_prefix(b'i', root).len();
            for item in tree.scan_prefix(&under) {
                let (key, value) = item.map_err(StoreError::sled("teleport"))?;
                let at = std::str::from_utf8(&key[skip..]).map_err(|e| corrupt("a path", e))?;
                let at = RelPath::new(at).map_err(|e| corrupt("a path", e))?;
                if let Ok(indexed) = Indexed::decode(&at, &value) {
                    entries.insert(at, indexed);
                }
            }
        }
        if entries.len() > WHOLE_KEYS {
            self.db.mark_whole();
        }
        Ok(Index::from_entries(self.index_stamp(root)?, entries))
    }

    /// Makes `new` the index of `root`, where `old` was (writing what differs).
    pub fn set_index(&self, root: &str, old: &Index, new: &Index) -> Result<(), StoreError> {
        let tree = self.tree(old.len().max(new.len()) > WHOLE_KEYS)?;
        for (path, _) in old.iter() {
            if new.get(path).is_none() {
                tree.remove(path_key(b'i', root, path))
                    .map_err(StoreError::sled("teleport"))?;
            }
        }
        for (path, indexed) in new.iter() {
            if old.get(path) != Some(indexed) {
                tree.insert(path_key(b'i', root, path), indexed.encode())
                    .map_err(StoreError::sled("teleport"))?;
            }
        }
        if old.scanned_at_ns() != new.scanned_at_ns() {
            tree.insert(key(b's', root), &new.scanned_at_ns().to_be_bytes())
                .map_err(StoreError::sled("teleport"))?;
        }
        Ok(())
    }

    /// Writes a rescan's `changes` to the stored index of `root`, whose entries are
    /// `index` before them (a removal takes what `index` holds under its path).
    pub fn apply_index(
        &self,
        root: &str,
        index: &Index,
        changes: &[IndexChange],
    ) -> Result<(), StoreError> {
        let tree = self.tree(changes.len() > WHOLE_KEYS)?;
        for change in changes {
            match change {
                IndexChange::Put(path, indexed) => {
                    tree.insert(path_key(b'i', root, path), indexed.encode())
                        .map_err(StoreError::sled("teleport"))?;
                }
                IndexChange::Remove(path) => {
                    for (under, _) in index.under(path) {
                        tree.remove(path_key(b'i', root, under))
                            .map_err(StoreError::sled("teleport"))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// When the full scan that made the stored index of `root` started (0: none yet).
    /// A watcher that holds the index in memory compares it to notice that another
    /// operation scanned meanwhile.
    pub fn index_stamp(&self, root: &str) -> Result<i64, StoreError> {
        Ok(self
            .tree(false)?
            .get(key(b's', root))
            .map_err(StoreError::sled("teleport"))?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map_or(0, i64::from_be_bytes))
    }

    /// Forgets `root` entirely.
    pub fn remove(&self, root: &str) -> Result<(), StoreError> {
        let tree = self.tree(true)?;
        for prefix in [path_prefix(b'm', root), path_prefix(b'i', root)] {
            for item in tree.scan_prefix(prefix) {
                let (k, _) = item.map_err(StoreError::sled("teleport"))?;
                tree.remove(k).map_err(StoreError::sled("teleport"))?;
            }
        }
        for k in [key(b'w', root), key(b's', root), key(b'h', root)] {
            tree.remove(k).map_err(StoreError::sled("teleport"))?;
        }
        tree.flush().map_err(StoreError::sled("teleport"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloud_protocol::teleport::{ContentId, Entry};

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    #[test]
    fn links_bases_and_indexes_persist_per_root() {
        let dir = tempfile::tempdir().unwrap();
        let worktrees = Worktrees::new(TeleportDb::open(dir.path()).unwrap());
        let link = Worktree {
            root: "/home/me/repo".into(),
            session: "s-1".into(),
            version: 3,
            remote_version: 4,
            watching: true,
            last_error: None,
            conflicts: Vec::new(),
            git_sent: None,
            unapplied: false,
        };
        worktrees.put(&link).unwrap();
        // A root that is a prefix of another does not see its keys.
        let other = Worktree {
            root: "/home/me/repo2".into(),
            ..link.clone()
        };
        worktrees.put(&other).unwrap();
        assert_eq!(worktrees.get("/home/me/repo").unwrap(), Some(link.clone()));
        assert_eq!(worktrees.list().unwrap().len(), 2);

        let file = |b: u8| EntryKind::File {
            executable: false,
            size: 1,
            content: ContentId::of(&[b]),
            chunks: Vec::new(),
        };
        let mut one = Manifest::new();
        one.insert(p("a"), EntryKind::Dir);
        one.insert(p("a/x"), file(1));
        worktrees
            .set_base(&link.root, &Manifest::new(), &one)
            .unwrap();
        let mut two = one.clone();
        two.insert(p("a/x"), file(2));
        two.insert(p("b"), file(3));
        worktrees.set_base(&link.root, &one, &two).unwrap();
        assert_eq!(worktrees.base(&link.root).unwrap(), two);
        assert!(worktrees.base(&other.root).unwrap().is_empty());

        worktrees.remove(&link.root).unwrap();
        assert_eq!(worktrees.get(&link.root).unwrap(), None);
        assert!(worktrees.base(&link.root).unwrap().is_empty());
        assert!(worktrees.get(&other.root).unwrap().is_some());
    }

    #[test]
    fn a_base_changed_by_a_delta_agrees_with_applying_it_to_the_whole_tree() {
        let dir = tempfile::tempdir().unwrap();
        let worktrees = Worktrees::new(TeleportDb::open(dir.path()).unwrap());
        let file = |b: u8| EntryKind::File {
            executable: false,
            size: 1,
            content: ContentId::of(&[b]),
            chunks: Vec::new(),
        };
        let mut old = Manifest::new();
        for (path, kind) in [
            ("a", EntryKind::Dir),
            ("a/b", EntryKind::Dir),
            ("a/b/x", file(1)),
            ("a/bc", file(2)),
            ("a/y", file(3)),
            ("z", file(4)),
        ] {
            old.insert(p(path), kind);
        }
        worktrees.set_base("/r", &Manifest::new(), &old).unwrap();
        let mut new = old.clone();
        // A directory removed (not its sibling that shares a prefix), a file edited, a
        // file that becomes a directory.
        new.apply(&Delta {
            changes: vec![Change::Remove(p("a/b")), Change::Remove(p("z"))],
        });
        new.insert(p("a/y"), file(5));
        new.insert(p("z"), EntryKind::Dir);
        new.insert(p("z/n"), file(6));
        let delta = old.diff(&new);
        worktrees.apply_base("/r", &delta).unwrap();
        assert_eq!(worktrees.base("/r").unwrap(), new);
        let mut applied = old.clone();
        applied.apply(&delta);
        assert_eq!(applied, new);
        // The digest followed the delta: the new tree needs no base read, the old one does.
        assert_eq!(
            worktrees.base_digest("/r").unwrap(),
            Some(digest(&new).unwrap())
        );
        assert_eq!(worktrees.base_unless("/r", &new).unwrap(), None);
        assert_eq!(
            worktrees.base_unless("/r", &old).unwrap(),
            Some(new.clone())
        );

        // A delta that removes a directory and puts a path under it again.
        let mut third = new.clone();
        third.apply(&Delta {
            changes: vec![Change::Remove(p("z"))],
        });
        third.insert(p("z"), EntryKind::Dir);
        third.insert(p("z/n"), file(7));
        let twice = Delta {
            changes: vec![
                Change::Remove(p("z")),
                Change::Put(Entry {
                    path: p("z"),
                    kind: EntryKind::Dir,
                }),
                Change::Put(Entry {
                    path: p("z/n"),
                    kind: file(7),
                }),
            ],
        };
        worktrees.apply_base("/r", &twice).unwrap();
        assert_eq!(worktrees.base("/r").unwrap(), third);
        assert_eq!(
            worktrees.base_digest("/r").unwrap(),
            Some(digest(&third).unwrap())
        );

        // A store without a digest (an older daemon's) reads the base, then keeps one.
        worktrees
            .tree(false)
            .unwrap()
            .remove(key(b'h', "/r"))
            .unwrap();
        worktrees.apply_base("/r", &third.diff(&new)).unwrap();
        assert_eq!(worktrees.base_digest("/r").unwrap(), None);
        assert_eq!(
            worktrees.base_unless("/r", &new).unwrap(),
            Some(new.clone())
        );
        assert_eq!(worktrees.base_unless("/r", &new).unwrap(), None);

        // A large change.
        let mut large = new.clone();
        for i in 0..1031 {
            large.insert(p(&format!("many-{i}")), file((i % 251) as u8));
        }
        worktrees.apply_base("/r", &new.diff(&large)).unwrap();
        assert_eq!(worktrees.base("/r").unwrap(), large);
        assert_eq!(worktrees.base_unless("/r", &large).unwrap(), None);
        worktrees.set_base("/r", &large, &new).unwrap();
        assert_eq!(worktrees.base("/r").unwrap(), new);
        assert_eq!(worktrees.base_unless("/r", &new).unwrap(), None);
    }

    #[test]
    fn links_an_older_daemon_kept_in_the_store_are_taken_over_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = sled::open(dir.path().join("store")).unwrap();
        let link = Worktree::new("/home/me/repo", "s-1");
        store
            .open_tree("teleport")
            .unwrap()
            .insert(key(b'w', &link.root), postcard::to_allocvec(&link).unwrap())
            .unwrap();
        let worktrees = Worktrees::new(TeleportDb::open(&dir.path().join("teleport")).unwrap());
        worktrees.take_over(&store).unwrap();
        assert_eq!(
            worktrees.get("/home/me/repo").unwrap(),
            Some(Worktree::new("/home/me/repo", "s-1"))
        );
        assert!(!store.tree_names().iter().any(|n| n.as_ref() == b"teleport"));
        // Nothing to take over any more.
        worktrees.take_over(&store).unwrap();
        assert_eq!(worktrees.list().unwrap().len(), 1);
    }
}

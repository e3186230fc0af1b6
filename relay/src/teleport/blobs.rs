//! The content-addressed blob store: teleport's file contents, one file per blob under
//! `DATA/blobs/<org>/<first two hex digits>/<id in hex>`, shared by the org's sessions.
//!
//! A blob is checked against its id (blake3) before it is stored, written to a temp file
//! in the same directory and renamed into place, so a reader never sees part of one and a
//! blob's file always holds what its name says. Every call does blocking file IO: callers
//! run it off the core task and off the socket tasks' threads (`spawn_blocking`).
//!
//! This module must never decide who may read or write an org's blobs (the callers check
//! the session's access first), and never trusts a name it did not compute.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use cloud_protocol::blobs::{Blob, MAX_BLOB};
use cloud_protocol::teleport::ContentId;

/// Why a blob operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BlobStoreError {
    #[error("blob {0} does not match its id")]
    Mismatch(ContentId),
    #[error("blob {id} is {len} bytes, more than {MAX_BLOB}")]
    TooLarge { id: ContentId, len: usize },
    #[error("an org name that cannot be a directory: {0:?}")]
    BadOrg(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The blob store of a relay.
#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
}

impl BlobStore {
    /// The store under `root` (`DATA/blobs`), created on first write.
    pub fn new(root: PathBuf) -> BlobStore {
        BlobStore { root }
    }

    /// The directory of `org`'s blobs. Org names are the relay's own (from tokens), but
    /// they are checked anyway: one plain path component.
    fn org_dir(&self, org: &str) -> Result<PathBuf, BlobStoreError> {
        let plain = !org.is_empty()
            && org.len() <= 128
            && org != "."
            && org != ".."
            && !org.contains(['/', '\\', '\0']);
        if !plain {
            return Err(BlobStoreError::BadOrg(org.to_owned()));
        }
        Ok(self.root.join(org))
    }

    fn path(&self, org: &str, id: &ContentId) -> Result<PathBuf, BlobStoreError> {
        let hex = id.to_hex();
        Ok(self.org_dir(org)?.join(&hex[..2]).join(hex))
    }

    /// Where temp files that become blobs or bundles are made (on the store's disk),
    /// created if missing.
    pub fn temp_dir(&self) -> Result<&Path, BlobStoreError> {
        std::fs::create_dir_all(&self.root).map_err(io("creating", &self.root))?;
        Ok(&self.root)
    }

    /// Whether `org` has blob `id`.
    pub fn has(&self, org: &str, id: &ContentId) -> Result<bool, BlobStoreError> {
        Ok(self.path(org, id)?.is_file())
    }

    /// The ids in `ids` that `org` lacks, in their order, without repeats.
    pub fn lacks(&self, org: &str, ids: &[ContentId]) -> Result<Vec<ContentId>, BlobStoreError> {
        let mut seen = std::collections::HashSet::new();
        let mut lacking = Vec::new();
        for id in ids {
            if seen.insert(*id) && !self.has(org, id)? {
                lacking.push(*id);
            }
        }
        Ok(lacking)
    }

    /// Stores `blob` for `org` after checking it; returns whether it was new.
    pub fn put(&self, org: &str, blob: &Blob) -> Result<bool, BlobStoreError> {
        if blob.bytes.len() > MAX_BLOB {
            return Err(BlobStoreError::TooLarge {
                id: blob.id,
                len: blob.bytes.len(),
            });
        }
        if !blob.verify() {
            return Err(BlobStoreError::Mismatch(blob.id));
        }
        let path = self.path(org, &blob.id)?;
        if path.is_file() {
            return Ok(false);
        }
        let dir = path.parent().expect("a blob path has a directory");
        std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
        let mut temp =
            tempfile::NamedTempFile::new_in(dir).map_err(io("creating a temp file in", dir))?;
        temp.write_all(&blob.bytes)
            .map_err(io("writing", temp.path()))?;
        temp.persist(&path)
            .map_err(|e| io("renaming a blob to", &path)(e.error))?;
        Ok(true)
    }

    /// Reads blob `id` of `org`, checking it again (a disk can rot); `None` when absent.
    pub fn get(&self, org: &str, id: &ContentId) -> Result<Option<Vec<u8>>, BlobStoreError> {
        let path = self.path(org, id)?;
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("reading", &path)(e)),
        };
        if ContentId::of(&bytes) != *id {
            tracing::error!(path = %path.display(), "a stored blob does not match its id; removing it");
            let _ = std::fs::remove_file(&path);
            return Ok(None);
        }
        Ok(Some(bytes))
    }
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BlobStoreError {
    let path = path.to_owned();
    move |source| BlobStoreError::Io { what, path, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(bytes: &[u8]) -> Blob {
        Blob {
            id: ContentId::of(bytes),
            bytes: bytes.to_vec(),
        }
    }

    #[test]
    fn blobs_are_checked_stored_once_and_kept_per_org() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::new(dir.path().join("blobs"));
        let hello = blob(b"hello");
        assert_eq!(
            store.lacks("acme", &[hello.id, hello.id]).unwrap(),
            vec![hello.id]
        );
        assert!(store.put("acme", &hello).unwrap());
        assert!(!store.put("acme", &hello).unwrap());
        assert!(store.lacks("acme", &[hello.id]).unwrap().is_empty());
        assert_eq!(store.get("acme", &hello.id).unwrap().unwrap(), b"hello");
        // Another org does not see it.
        assert_eq!(store.lacks("other", &[hello.id]).unwrap(), vec![hello.id]);
        assert_eq!(store.get("other", &hello.id).unwrap(), None);

        let forged = Blob {
            id: ContentId::of(b"something else"),
            bytes: b"hello".to_vec(),
        };
        assert!(matches!(
            store.put("acme", &forged),
            Err(BlobStoreError::Mismatch(_))
        ));
        assert!(!store.has("acme", &forged.id).unwrap());
        for bad in ["", "..", "a/b", "a\0b"] {
            assert!(matches!(
                store.has(bad, &hello.id),
                Err(BlobStoreError::BadOrg(_))
            ));
        }
    }

    #[test]
    fn a_blob_that_rotted_on_disk_is_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::new(dir.path().join("blobs"));
        let hello = blob(b"hello");
        store.put("acme", &hello).unwrap();
        std::fs::write(store.path("acme", &hello.id).unwrap(), b"jello").unwrap();
        assert_eq!(store.get("acme", &hello.id).unwrap(), None);
        assert_eq!(store.lacks("acme", &[hello.id]).unwrap(), vec![hello.id]);
    }
}

//! The content-addressed blob store: teleport's file contents, shared by an org's
//! sessions, in pack files under `DATA/blobs/<org>/packs/<n>.pack` ([`pack`]), one pack per
//! stored batch, with every org's index (blob → pack and place) in memory, read from the
//! packs' trailers the first time the org is used.
//!
//! Why packs: a push of 20,000 small files stored as one file per blob cost 20,000 inode
//! allocations on top of the 20,000 the workspace needs, and on ext4 the allocation is what
//! a small write costs. A batch is now one file.
//!
//! Every blob is checked against its id (blake3) before it is stored and again when it is
//! read; a pack is written under a temp name and renamed into place, so a pack with a name
//! is whole, and a commit makes the org's new packs durable ([`BlobStore::sync`]) before
//! it stores a version that needs them (each pack's writeback starts when it is written,
//! so the commit mostly waits for writes already under way). A blob that fails its check on reading is dropped from the index (it reads as
//! absent, so the daemon uploads it again). Stores of the first format (one file per blob
//! under `<org>/<two hex digits>/<id>`) are packed once, when the org is first used.
//!
//! Every call does blocking file IO: callers run it off the core task and off the socket
//! tasks' threads (`spawn_blocking`). This module must never decide who may read or write
//! an org's blobs (the callers check the session's access first), and never trusts a name
//! it did not compute.

pub mod pack;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use cloud_protocol::blobs::{Blob, BATCH_BYTES, MAX_BLOB};
use cloud_protocol::teleport::ContentId;
use pack::Span;

/// Open pack files kept for reading, at most (the cache is emptied when full).
const OPEN_PACKS: usize = 256;

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

/// A blob as the store and the staging take it: an id and bytes, wherever they are.
pub trait BlobBytes {
    fn id(&self) -> ContentId;
    fn bytes(&self) -> &[u8];
}

impl BlobBytes for Blob {
    fn id(&self) -> ContentId {
        self.id
    }

    fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// A blob whose bytes are a slice of the message it arrived in (shared, not copied:
/// `cloud_protocol::blobs::decode_ref`).
#[derive(Debug, Clone)]
pub struct SharedBlob {
    pub id: ContentId,
    pub bytes: axum::body::Bytes,
}

impl BlobBytes for SharedBlob {
    fn id(&self) -> ContentId {
        self.id
    }

    fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// The blob store of a relay.
#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
    orgs: Arc<Mutex<HashMap<String, Arc<OrgPacks>>>>,
}

/// One org's packs.
#[derive(Debug)]
struct OrgPacks {
    /// `DATA/blobs/<org>/packs`.
    dir: PathBuf,
    /// Every stored blob: its pack's number and place.
    index: RwLock<HashMap<ContentId, (u32, Span)>>,
    /// The number the next pack gets.
    next: Mutex<u32>,
    /// Packs open for reading.
    open: Mutex<HashMap<u32, Arc<File>>>,
    /// Packs written since the last [`BlobStore::sync`], not yet known to be on disk.
    unsynced: Mutex<Vec<u32>>,
    /// Held for a whole sync, so a sync that finds nothing left to do knows that the
    /// packs another one took are on disk.
    syncing: Mutex<()>,
}

impl BlobStore {
    /// The store under `root` (`DATA/blobs`), created on first write.
    pub fn new(root: PathBuf) -> BlobStore {
        BlobStore {
            root,
            orgs: Arc::default(),
        }
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

    /// `org`'s packs, their index read on first use.
    fn org(&self, org: &str) -> Result<Arc<OrgPacks>, BlobStoreError> {
        let dir = self.org_dir(org)?;
        let mut orgs = self.orgs.lock().expect("blob store poisoned");
        if let Some(packs) = orgs.get(org) {
            return Ok(Arc::clone(packs));
        }
        let packs = Arc::new(OrgPacks::load(&dir)?);
        orgs.insert(org.to_owned(), Arc::clone(&packs));
        Ok(packs)
    }

    /// Where temp files that become blobs or bundles are made (on the store's disk),
    /// created if missing.
    pub fn temp_dir(&self) -> Result<&Path, BlobStoreError> {
        std::fs::create_dir_all(&self.root).map_err(io("creating", &self.root))?;
        Ok(&self.root)
    }

    /// The ids in `ids` that `org` lacks, in their order, without repeats.
    pub fn lacks(&self, org: &str, ids: &[ContentId]) -> Result<Vec<ContentId>, BlobStoreError> {
        let packs = self.org(org)?;
        let index = packs.index.read().expect("blob index poisoned");
        let mut seen = HashSet::new();
        Ok(ids
            .iter()
            .filter(|id| !index.contains_key(id) && seen.insert(**id))
            .copied()
            .collect())
    }

    /// Makes every pack of `org` written so far durable (`fdatasync` each, then the packs'
    /// directory, so their names are too). A version that needs blobs is committed only
    /// after this: a machine that crashes must not leave a stored version whose blobs
    /// were still in the page cache. Packs are written without waiting for the disk, so a
    /// push pays once, at its commit.
    pub fn sync(&self, org: &str) -> Result<(), BlobStoreError> {
        self.org(org)?.sync()
    }

    /// How many packs of `org` wait for [`BlobStore::sync`] (tests).
    #[cfg(test)]
    pub fn unsynced(&self, org: &str) -> usize {
        self.org(org).unwrap().unsynced.lock().unwrap().len()
    }

    /// Stores `blobs` for `org` after checking every one (none is stored if one fails),
    /// the new ones as one pack; returns how many were new.
    pub fn put<B: BlobBytes>(&self, org: &str, blobs: &[B]) -> Result<usize, BlobStoreError> {
        for blob in blobs {
            let bytes = blob.bytes();
            if bytes.len() > MAX_BLOB {
                return Err(BlobStoreError::TooLarge {
                    id: blob.id(),
                    len: bytes.len(),
                });
            }
            if ContentId::of(bytes) != blob.id() {
                return Err(BlobStoreError::Mismatch(blob.id()));
            }
        }
        let packs = self.org(org)?;
        let new: Vec<&B> = {
            let index = packs.index.read().expect("blob index poisoned");
            let mut seen = HashSet::new();
            blobs
                .iter()
                .filter(|b| !index.contains_key(&b.id()) && seen.insert(b.id()))
                .collect()
        };
        if new.is_empty() {
            return Ok(0);
        }
        packs.write(&new)?;
        Ok(new.len())
    }

    /// Reads blob `id` of `org`, checking it again (a disk can rot); `None` when absent.
    pub fn get(&self, org: &str, id: &ContentId) -> Result<Option<Vec<u8>>, BlobStoreError> {
        let packs = self.org(org)?;
        let Some((number, span)) = packs
            .index
            .read()
            .expect("blob index poisoned")
            .get(id)
            .copied()
        else {
            return Ok(None);
        };
        let file = packs.file(number)?;
        let mut bytes = vec![0u8; span.len as usize];
        if let Err(e) = file.read_exact_at(&mut bytes, span.offset) {
            return Err(io("reading", &packs.path(number))(e));
        }
        if ContentId::of(&bytes) != *id {
            tracing::error!(pack = %packs.path(number).display(), blob = %id, "a stored blob does not match its id; dropping it from the index");
            packs.index.write().expect("blob index poisoned").remove(id);
            return Ok(None);
        }
        Ok(Some(bytes))
    }
}

impl OrgPacks {
    /// Reads the index of the packs under `org_dir/packs` (packing a store of the first
    /// format first). Temp files a crash left are removed; a pack whose trailer cannot be
    /// read is left out (its blobs read as absent) and logged.
    fn load(org_dir: &Path) -> Result<OrgPacks, BlobStoreError> {
        let dir = org_dir.join("packs");
        let packs = OrgPacks {
            dir,
            index: RwLock::default(),
            next: Mutex::new(1),
            open: Mutex::default(),
            unsynced: Mutex::default(),
            syncing: Mutex::default(),
        };
        let entries = match std::fs::read_dir(&packs.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                packs.pack_first_format(org_dir)?;
                return Ok(packs);
            }
            Err(e) => return Err(io("listing", &packs.dir)(e)),
        };
        let mut index = HashMap::new();
        let mut next = 1;
        for entry in entries {
            let entry = entry.map_err(io("listing", &packs.dir))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let Some(number) = name
                .strip_suffix(".pack")
                .and_then(|n| n.parse::<u32>().ok())
            else {
                if name.starts_with(".tmp") {
                    let _ = std::fs::remove_file(entry.path());
                }
                continue;
            };
            next = next.max(number.saturating_add(1));
            let read = File::open(entry.path())
                .map_err(pack::PackError::from)
                .and_then(|mut file| pack::read_trailer(&mut file));
            match read {
                Ok(spans) => {
                    for (id, span) in spans {
                        index.entry(id).or_insert((number, span));
                    }
                }
                Err(e) => {
                    tracing::error!(pack = %entry.path().display(), "a blob pack cannot be read ({e}); its blobs will be uploaded again");
                }
            }
        }
        *packs.index.write().expect("blob index poisoned") = index;
        *packs.next.lock().expect("blob store poisoned") = next;
        packs.pack_first_format(org_dir)?;
        Ok(packs)
    }

    /// Moves the blobs of a store of the first format (`<org>/<xx>/<id>`, one file each)
    /// into packs, and removes their files.
    fn pack_first_format(&self, org_dir: &Path) -> Result<(), BlobStoreError> {
        let Ok(entries) = std::fs::read_dir(org_dir) else {
            return Ok(());
        };
        let mut batch: Vec<Blob> = Vec::new();
        let mut bytes = 0;
        let mut done = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.len() != 2 || !entry.path().is_dir() {
                continue;
            }
            for file in std::fs::read_dir(entry.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let path = file.path();
                let id = file.file_name().to_str().and_then(ContentId::from_hex);
                let data = id.and_then(|_| std::fs::read(&path).ok());
                if let (Some(id), Some(data)) = (id, data) {
                    let blob = Blob { id, bytes: data };
                    if blob.verify() {
                        bytes += blob.bytes.len();
                        batch.push(blob);
                    }
                }
                done.push(path);
                if bytes >= BATCH_BYTES {
                    self.write(&batch.iter().collect::<Vec<_>>())?;
                    batch.clear();
                    bytes = 0;
                }
            }
            done.push(entry.path());
        }
        if !batch.is_empty() {
            self.write(&batch.iter().collect::<Vec<_>>())?;
        }
        for path in done {
            let _ = std::fs::remove_file(&path).or_else(|_| std::fs::remove_dir(&path));
        }
        Ok(())
    }

    fn path(&self, number: u32) -> PathBuf {
        self.dir.join(format!("{number:08}.pack"))
    }

    /// Writes `blobs` (checked, new) as the next pack and adds them to the index.
    fn write<B: BlobBytes>(&self, blobs: &[&B]) -> Result<(), BlobStoreError> {
        std::fs::create_dir_all(&self.dir).map_err(io("creating", &self.dir))?;
        let number = {
            let mut next = self.next.lock().expect("blob store poisoned");
            let number = *next;
            *next = next.saturating_add(1);
            number
        };
        let path = self.path(number);
        let mut temp = tempfile::NamedTempFile::new_in(&self.dir)
            .map_err(io("creating a temp file in", &self.dir))?;
        let spans = pack::write(
            temp.as_file_mut(),
            blobs.iter().map(|b| (b.id(), b.bytes())),
        )
        .map_err(io("writing", &path))?;
        start_writeback(temp.as_file());
        temp.persist(&path)
            .map_err(|e| io("renaming a pack to", &path)(e.error))?;
        self.unsynced
            .lock()
            .expect("blob store poisoned")
            .push(number);
        let mut index = self.index.write().expect("blob index poisoned");
        for (id, span) in spans {
            index.entry(id).or_insert((number, span));
        }
        Ok(())
    }

    /// See [`BlobStore::sync`]. A pack that fails stays listed for the next sync.
    fn sync(&self) -> Result<(), BlobStoreError> {
        let _syncing = self.syncing.lock().expect("blob store poisoned");
        let numbers = std::mem::take(&mut *self.unsynced.lock().expect("blob store poisoned"));
        if numbers.is_empty() {
            return Ok(());
        }
        let synced = numbers.iter().try_for_each(|&number| {
            let path = self.path(number);
            File::open(&path)
                .and_then(|file| file.sync_data())
                .map_err(io("syncing", &path))
        });
        let synced = synced.and_then(|()| {
            File::open(&self.dir)
                .and_then(|dir| dir.sync_all())
                .map_err(io("syncing", &self.dir))
        });
        if synced.is_err() {
            self.unsynced
                .lock()
                .expect("blob store poisoned")
                .extend(numbers);
        }
        synced
    }

    /// Pack `number`, open for reading.
    fn file(&self, number: u32) -> Result<Arc<File>, BlobStoreError> {
        let mut open = self.open.lock().expect("blob store poisoned");
        if let Some(file) = open.get(&number) {
            return Ok(Arc::clone(file));
        }
        let path = self.path(number);
        let file = Arc::new(File::open(&path).map_err(io("opening", &path))?);
        if open.len() >= OPEN_PACKS {
            open.clear();
        }
        open.insert(number, Arc::clone(&file));
        Ok(file)
    }
}

/// Starts writing `file`'s dirty pages to disk without waiting (Linux's
/// `sync_file_range(SYNC_FILE_RANGE_WRITE)`; nothing elsewhere), so the commit's
/// `fdatasync` ([`BlobStore::sync`]) finds a push's packs mostly written: syncing 200 MB
/// of packs at the commit took 0.3 to 0.7 s, while the disk had been idle through the
/// upload. Only a head start: durability is still the commit's sync.
fn start_writeback(file: &File) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd as _;
        // SAFETY: a valid descriptor; offset 0 and length 0 mean the whole file, and the
        // flag only starts writeback. A failure is harmless (the commit syncs anyway).
        unsafe {
            libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = file;
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
    fn packs_wait_for_a_sync_and_a_failed_sync_keeps_them_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::new(dir.path().join("blobs"));
        store.put("acme", &[blob(b"one")]).unwrap();
        store.put("acme", &[blob(b"two")]).unwrap();
        assert_eq!(store.unsynced("acme"), 2);
        store.sync("acme").unwrap();
        assert_eq!(store.unsynced("acme"), 0);
        store.sync("acme").unwrap();

        // A pack that cannot be synced (gone) fails the sync, which tries it again later.
        store.put("acme", &[blob(b"three")]).unwrap();
        let packs = dir.path().join("blobs/acme/packs");
        let newest = std::fs::read_dir(&packs)
            .unwrap()
            .map(|e| e.unwrap().path())
            .max()
            .unwrap();
        let aside = dir.path().join("aside");
        std::fs::rename(&newest, &aside).unwrap();
        let error = store.sync("acme").unwrap_err().to_string();
        assert!(error.starts_with("syncing "), "{error}");
        assert_eq!(store.unsynced("acme"), 1);
        std::fs::rename(&aside, &newest).unwrap();
        store.sync("acme").unwrap();
        assert_eq!(store.unsynced("acme"), 0);
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
        assert_eq!(
            store.put("acme", &[hello.clone(), hello.clone()]).unwrap(),
            1
        );
        assert_eq!(store.put("acme", std::slice::from_ref(&hello)).unwrap(), 0);
        assert!(store.lacks("acme", &[hello.id]).unwrap().is_empty());
        assert_eq!(store.get("acme", &hello.id).unwrap().unwrap(), b"hello");
        // Another org does not see it.
        assert_eq!(store.lacks("other", &[hello.id]).unwrap(), vec![hello.id]);
        assert_eq!(store.get("other", &hello.id).unwrap(), None);

        let forged = Blob {
            id: ContentId::of(b"something else"),
            bytes: b"hello".to_vec(),
        };
        let world = blob(b"world");
        // One bad blob and none of the batch is stored.
        assert!(matches!(
            store.put("acme", &[world.clone(), forged.clone()]),
            Err(BlobStoreError::Mismatch(_))
        ));
        assert_eq!(
            store.lacks("acme", &[forged.id, world.id]).unwrap(),
            vec![forged.id, world.id]
        );
        for bad in ["", "..", "a/b", "a\0b"] {
            assert!(matches!(
                store.lacks(bad, &[hello.id]),
                Err(BlobStoreError::BadOrg(_))
            ));
        }
    }

    #[test]
    fn a_batch_is_one_file_and_a_restarted_store_reads_it_back() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("blobs");
        let store = BlobStore::new(root.clone());
        let blobs: Vec<Blob> = (0..1000u32).map(|i| blob(&i.to_le_bytes())).collect();
        assert_eq!(store.put("acme", &blobs).unwrap(), 1000);
        let files = std::fs::read_dir(root.join("acme/packs")).unwrap().count();
        assert_eq!(files, 1);
        // A crash's leftover temp file goes; the packs are read back.
        std::fs::write(root.join("acme/packs/.tmpXYZ"), b"half a pack").unwrap();
        let again = BlobStore::new(root.clone());
        assert!(again
            .lacks("acme", &blobs.iter().map(|b| b.id).collect::<Vec<_>>())
            .unwrap()
            .is_empty());
        assert_eq!(
            again.get("acme", &blobs[999].id).unwrap().unwrap(),
            999u32.to_le_bytes()
        );
        assert!(!root.join("acme/packs/.tmpXYZ").exists());
        // New packs do not reuse a number.
        assert_eq!(again.put("acme", &[blob(b"new")]).unwrap(), 1);
        assert_eq!(
            std::fs::read_dir(root.join("acme/packs")).unwrap().count(),
            2
        );
    }

    #[test]
    fn a_store_of_the_first_format_is_packed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("blobs");
        let hello = blob(b"hello");
        let hex = hello.id.to_hex();
        std::fs::create_dir_all(root.join("acme").join(&hex[..2])).unwrap();
        std::fs::write(root.join("acme").join(&hex[..2]).join(&hex), b"hello").unwrap();
        let store = BlobStore::new(root.clone());
        assert_eq!(store.get("acme", &hello.id).unwrap().unwrap(), b"hello");
        assert!(!root.join("acme").join(&hex[..2]).exists());
        assert!(BlobStore::new(root)
            .lacks("acme", &[hello.id])
            .unwrap()
            .is_empty());
    }

    #[test]
    fn a_blob_that_rotted_on_disk_is_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("blobs");
        let store = BlobStore::new(root.clone());
        let hello = blob(b"hello");
        store.put("acme", std::slice::from_ref(&hello)).unwrap();
        let pack = root.join("acme/packs/00000001.pack");
        let mut bytes = std::fs::read(&pack).unwrap();
        bytes[..5].copy_from_slice(b"jello");
        std::fs::write(&pack, bytes).unwrap();
        let store = BlobStore::new(root);
        assert_eq!(store.get("acme", &hello.id).unwrap(), None);
        assert_eq!(store.lacks("acme", &[hello.id]).unwrap(), vec![hello.id]);
        // Uploaded again, it is served again.
        assert_eq!(store.put("acme", std::slice::from_ref(&hello)).unwrap(), 1);
        assert_eq!(store.get("acme", &hello.id).unwrap().unwrap(), b"hello");
    }
}

//! Teleport's own sled database: opened when something uses it, and closed again after a
//! whole worktree went through it, so what sled cached of that tree goes with it.
//!
//! sled 0.34 does not keep to its cache capacity on a database this size: its LRU batches
//! each of its 256 shards' accesses 64 at a time before it evicts anything, so a database
//! of a few hundred pages never evicts, and every key ever read or written stays in memory
//! as a decoded node. A push of a 20,000-file worktree reads its whole index and agreed
//! tree (about 10 MiB of nodes, against 4.5 MiB of data) and the daemon kept them for
//! good. Closing the database frees all of it (and the jemalloc purge that ends every
//! operation hands it back). Opening it again costs a few milliseconds: sled replays what
//! was written since it was last opened.
//!
//! So [`TeleportDb::tree`] opens the database if it is closed, [`TeleportDb::mark_whole`]
//! notes that a whole tree went through it, and [`TeleportDb::settle`] (at the end of every
//! push, pull and watch step) closes it when that happened and nothing else is using it.
//! An edit's few keys leave it open: the watch's next step finds it warm.
//!
//! Apart from the store, because of its flushing: the store's periodic flusher garbage-
//! collects its segments whenever nothing is dirty, and with a big worktree's keys in them
//! that kept the idle daemon busy (about 1% of a CPU, for good). This database has no
//! flusher; what it holds may be lost to a crash without harm (see
//! [`super::worktrees`]), and closing it flushes it.
//!
//! This module must never interpret what the database holds (that is
//! [`super::worktrees`]'s), and never close it under a caller that still holds its tree.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::store::{self, StoreError};

/// sled's cache setting for this database. Small, though sled does not keep to it here
/// (see the module's documentation): closing is what bounds its memory.
pub const CACHE_BYTES: u64 = 1024 * 1024;

/// How long an open waits for the previous instance of the database to let go of its
/// file lock: sled's own threads may drop their last handle (and close the file) just
/// after the daemon dropped its own.
const LOCK_WAIT: Duration = Duration::from_secs(2);

/// The name of the one tree in the database.
const TREE: &str = "teleport";

/// Teleport's database, opened and closed as it is used. Cloning shares it.
#[derive(Debug, Clone)]
pub struct TeleportDb {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    open: Mutex<Option<Open>>,
}

#[derive(Debug)]
struct Open {
    tree: sled::Tree,
    /// One clone per [`Held`]: more than this one means someone is using the tree.
    users: Arc<()>,
    /// A whole tree went through it since it was opened.
    whole: bool,
}

/// The database's tree, held open for as long as this lives.
#[derive(Debug)]
pub struct Held {
    tree: sled::Tree,
    _user: Arc<()>,
}

impl std::ops::Deref for Held {
    type Target = sled::Tree;

    fn deref(&self) -> &sled::Tree {
        &self.tree
    }
}

impl TeleportDb {
    /// Opens (creating) the database in `dir`, so a database that cannot be used is known
    /// when the daemon starts, not at its first push.
    pub fn open(dir: &Path) -> Result<TeleportDb, StoreError> {
        let db = TeleportDb {
            shared: Arc::new(Shared {
                dir: dir.to_owned(),
                open: Mutex::new(None),
            }),
        };
        drop(db.tree()?);
        Ok(db)
    }

    /// The database's tree, opening the database if it is closed.
    pub fn tree(&self) -> Result<Held, StoreError> {
        let mut open = self.lock();
        let open = match &mut *open {
            Some(open) => open,
            slot => slot.insert(Open {
                tree: {
                    let started = Instant::now();
                    let tree = open_tree(&self.shared.dir)?;
                    tracing::debug!(
                        "teleport's database opened in {:.1} ms",
                        started.elapsed().as_secs_f64() * 1e3
                    );
                    tree
                },
                users: Arc::new(()),
                whole: false,
            }),
        };
        Ok(Held {
            tree: open.tree.clone(),
            _user: Arc::clone(&open.users),
        })
    }

    /// Notes that a whole worktree's keys went through the database (read or written):
    /// the next [`TeleportDb::settle`] closes it.
    pub fn mark_whole(&self) {
        if let Some(open) = &mut *self.lock() {
            open.whole = true;
        }
    }

    /// Closes the database if a whole tree went through it and nothing holds its tree;
    /// returns whether it did. Blocking: sled flushes as it closes.
    pub fn settle(&self) -> bool {
        let mut open = self.lock();
        let idle = open
            .as_ref()
            .is_some_and(|o| o.whole && Arc::strong_count(&o.users) == 1);
        if idle {
            // Under the lock, so no one opens the file while this instance is closing (sled's
            // own threads may still let go of it a moment later: `open_tree` waits).
            let started = Instant::now();
            drop(open.take());
            tracing::debug!(
                "teleport's database closed in {:.1} ms",
                started.elapsed().as_secs_f64() * 1e3
            );
        }
        idle
    }

    /// Whether the database is open now.
    #[cfg(test)]
    fn is_open(&self) -> bool {
        self.lock().is_some()
    }

    fn lock(&self) -> MutexGuard<'_, Option<Open>> {
        // A panic while holding the lock leaves the slot as it was: still usable.
        self.shared
            .open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Opens the database in `dir` and its tree, waiting up to [`LOCK_WAIT`] for an instance
/// that is closing to let go of the file.
fn open_tree(dir: &Path) -> Result<sled::Tree, StoreError> {
    let deadline = Instant::now() + LOCK_WAIT;
    let mut pause = Duration::from_millis(1);
    loop {
        match open_db(dir) {
            Err(StoreError::Sled {
                source: sled::Error::Io(e),
                ..
            }) if e.to_string().starts_with("could not acquire lock")
                && Instant::now() < deadline =>
            {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            Err(e) => return Err(e),
            Ok(db) => {
                return db.open_tree(TREE).map_err(StoreError::sled("teleport"));
            }
        }
    }
}

fn open_db(dir: &Path) -> Result<sled::Db, StoreError> {
    store::create_private_dir(dir, "creating teleport's directory")?;
    let db = sled::Config::new()
        .path(dir)
        .cache_capacity(CACHE_BYTES)
        .flush_every_ms(None)
        .open()
        .map_err(StoreError::sled("opening teleport's database"))?;
    store::restrict(dir)?;
    Ok(db)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_whole_tree_closes_the_database_once_no_one_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = TeleportDb::open(&dir.path().join("teleport")).unwrap();
        assert!(db.is_open());
        db.tree().unwrap().insert("k", "v").unwrap();
        assert!(!db.settle(), "a few keys leave it open");
        assert!(db.is_open());

        let held = db.tree().unwrap();
        db.mark_whole();
        assert!(!db.settle(), "closed under a holder");
        assert_eq!(held.get("k").unwrap().unwrap(), "v");
        drop(held);
        assert!(db.settle());
        assert!(!db.is_open());
        assert!(!db.settle(), "already closed");

        // Opened again on use, with what was written.
        assert_eq!(db.tree().unwrap().get("k").unwrap().unwrap(), "v");
        assert!(db.is_open());
    }

    #[test]
    fn closing_and_opening_in_a_loop_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let db = TeleportDb::open(&dir.path().join("teleport")).unwrap();
        for i in 0u32..50 {
            let tree = db.tree().unwrap();
            tree.insert(i.to_be_bytes(), &i.to_le_bytes()).unwrap();
            drop(tree);
            db.mark_whole();
            assert!(db.settle());
        }
        let tree = db.tree().unwrap();
        assert_eq!(tree.len(), 50);
        for i in 0u32..50 {
            assert_eq!(
                tree.get(i.to_be_bytes()).unwrap().unwrap(),
                &i.to_le_bytes()
            );
        }
    }

    #[test]
    fn a_database_another_process_holds_is_an_error_after_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("teleport");
        let other = open_db(&path).unwrap();
        let started = Instant::now();
        let error = TeleportDb::open(&path).unwrap_err().to_string();
        assert!(error.contains("could not acquire lock"), "{error}");
        assert!(started.elapsed() >= LOCK_WAIT);
        drop(other);
        TeleportDb::open(&path).unwrap();
    }
}

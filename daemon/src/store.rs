//! The daemon's sled database: one per state directory, opened once, with a capped cache,
//! private to the user like the rest of the state directory (see [`restrict`]).
//!
//! The outbound journal is not in it: it has its own databases (see [`crate::journal`]).
//! Each tree belongs to one module: `log` and `follows` to [`crate::sessions::inbound`],
//! `sessions` to [`crate::sessions::replica`], `meta` to this module (the instance id, whose
//! relay and identity the journal's events belong to, how many events were refused and the
//! latest reason) but for its `journal_acked` key, which is the journal's; `account` to
//! [`crate::account`]. No other module opens a tree.
//!
//! Architecture invariant: the daemon never uses sled's batches or transactions, in this
//! store or the journal's. In sled 0.34 they take a lock shared by every database in the
//! process, and a flush that a full disk left waiting forever holds its other side, so one
//! batch would stop every sled call of the daemon, on the runtime thread too.

use std::path::Path;

/// sled's cache, in bytes. Its default is 1 GiB, and its real memory use can run well past
/// the setting; the daemon's working set is small.
pub const CACHE_BYTES: u64 = 8 * 1024 * 1024;
/// The store could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed.
    #[error("store error in {what}: {source}")]
    Sled {
        /// What was being done.
        what: &'static str,
        /// Why.
        source: sled::Error,
    },
    /// A file or directory of the store could not be used.
    #[error("store error {what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// A stored value did not decode (a corrupt or foreign store).
    #[error("corrupt store entry in {what}: {message}")]
    Corrupt {
        /// Which tree.
        what: &'static str,
        /// What postcard said.
        message: String,
    },
}

impl StoreError {
    /// Wraps a sled error.
    pub fn sled(what: &'static str) -> impl FnOnce(sled::Error) -> StoreError {
        move |source| StoreError::Sled { what, source }
    }
}

/// Opens (creating) the store in `dir`.
pub fn open(dir: &Path) -> Result<sled::Db, StoreError> {
    create_private_dir(dir, "creating the store's directory")?;
    let db = sled::Config::new()
        .path(dir)
        .cache_capacity(CACHE_BYTES)
        .mode(sled::Mode::LowSpace)
        .open()
        .map_err(StoreError::sled("opening the store"))?;
    restrict(dir)?;
    Ok(db)
}

/// Creates `dir` and its missing parents, 0700.
pub(crate) fn create_private_dir(dir: &Path, what: &'static str) -> Result<(), StoreError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(dir)
        .map_err(|source| StoreError::Io { what, source })
}

/// Makes every directory under `dir` (itself included) 0700 and every file 0600.
///
/// sled creates its files itself, with the process umask: the daemon sets a private one at
/// start, and this brings files made before (by an older daemon) to the same modes.
/// Symbolic links are left alone.
pub fn restrict(dir: &Path) -> Result<(), StoreError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        // A file that vanishes meanwhile (a journal generation deleted) is no concern.
        let io = |what| {
            move |source: std::io::Error| match source.kind() {
                std::io::ErrorKind::NotFound => Ok(()),
                _ => Err(StoreError::Io { what, source }),
            }
        };
        let mut pending = vec![dir.to_owned()];
        while let Some(path) = pending.pop() {
            let metadata = match std::fs::symlink_metadata(&path) {
                Ok(metadata) => metadata,
                Err(e) => {
                    io("reading a store file's mode")(e)?;
                    continue;
                }
            };
            let mode = if metadata.is_dir() {
                match std::fs::read_dir(&path) {
                    Ok(entries) => pending.extend(entries.filter_map(|e| e.ok()).map(|e| e.path())),
                    Err(e) => io("listing a store directory")(e)?,
                }
                0o700
            } else if metadata.is_file() {
                0o600
            } else {
                continue;
            };
            if metadata.permissions().mode() & 0o7777 != mode {
                if let Err(e) =
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                {
                    io("making a store file private")(e)?;
                }
            }
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// This daemon instance's id: random, created on first use, stable for the state
/// directory. A new one is flushed before it is returned: the relay deduplicates the
/// journal's events per instance, so an id lost to a crash (the journal lives in its own
/// databases, whose flushes do not cover this store) would have the relay apply again
/// everything the journal resends.
pub fn instance_id(db: &sled::Db) -> Result<String, StoreError> {
    let meta = db.open_tree("meta").map_err(StoreError::sled("meta"))?;
    if let Some(id) = meta.get("instance_id").map_err(StoreError::sled("meta"))? {
        return Ok(String::from_utf8_lossy(&id).into_owned());
    }
    let id = format!("i-{}", random_hex(8));
    meta.insert("instance_id", id.as_bytes())
        .map_err(StoreError::sled("meta"))?;
    db.flush().map_err(StoreError::sled("meta"))?;
    Ok(id)
}

/// `n` random bytes as hex.
pub fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    getrandom::fill(&mut bytes).expect("the OS random source works");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How long recording a new journal owner waits for the disk.
pub const OWNER_FLUSH_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// The daemon's small durable facts, in the store's `meta` tree: who the journal's events
/// belong to, and the tally of refused events that `status` shows.
#[derive(Debug, Clone)]
pub struct Meta {
    tree: sled::Tree,
}

/// Events the relay (or the daemon, for events of another identity) refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Refusals {
    /// How many, since the state directory was made.
    pub count: u64,
    /// The latest one's reason.
    pub latest: Option<String>,
}

impl Meta {
    /// The `meta` tree of `db`.
    pub fn open(db: &sled::Db) -> Result<Meta, StoreError> {
        Ok(Meta {
            tree: db.open_tree("meta").map_err(StoreError::sled("meta"))?,
        })
    }

    /// The relay and identity the journal's unacknowledged events were queued for (see
    /// [`crate::bridge`]); `None` before the first registration.
    pub fn journal_owner(&self) -> Result<Option<String>, StoreError> {
        Ok(self
            .tree
            .get("journal_owner")
            .map_err(StoreError::sled("meta"))?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Records who the journal's events belong to from now on, and waits (at most
    /// [`OWNER_FLUSH_DEADLINE`]) until that is on disk: the events journaled next are the
    /// new owner's, and an older owner read back after a crash would have them refused.
    /// The flush runs on sled's threads, never on the caller's (on a full disk it may
    /// never return).
    pub async fn set_journal_owner(&self, owner: &str) -> Result<(), StoreError> {
        self.tree
            .insert("journal_owner", owner.as_bytes())
            .map_err(StoreError::sled("meta"))?;
        match tokio::time::timeout(OWNER_FLUSH_DEADLINE, self.tree.flush_async()).await {
            Ok(flushed) => flushed.map(drop).map_err(StoreError::sled("meta")),
            Err(_) => Err(StoreError::Io {
                what: "flushing the store",
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the disk did not complete a flush within {OWNER_FLUSH_DEADLINE:?}"),
                ),
            }),
        }
    }

    /// The tally of refused events.
    pub fn refusals(&self) -> Result<Refusals, StoreError> {
        let count = self
            .tree
            .get("refused_count")
            .map_err(StoreError::sled("meta"))?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0);
        let latest = self
            .tree
            .get("refused_latest")
            .map_err(StoreError::sled("meta"))?
            .map(|v| String::from_utf8_lossy(&v).into_owned());
        Ok(Refusals { count, latest })
    }

    /// Stores the tally (not flushed: a crash may lose the latest count, never an event).
    pub fn set_refusals(&self, refusals: &Refusals) -> Result<(), StoreError> {
        self.tree
            .insert("refused_count", &refusals.count.to_be_bytes())
            .map_err(StoreError::sled("meta"))?;
        if let Some(latest) = &refusals.latest {
            self.tree
                .insert("refused_latest", latest.as_bytes())
                .map_err(StoreError::sled("meta"))?;
        }
        Ok(())
    }
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path)
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    }

    #[test]
    fn restrict_makes_directories_0700_and_files_0600() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("store");
        std::fs::create_dir_all(dir.join("blobs")).unwrap();
        std::fs::write(dir.join("db"), b"").unwrap();
        std::fs::write(dir.join("blobs/1"), b"").unwrap();
        let outside = root.path().join("outside");
        std::fs::write(&outside, b"").unwrap();
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("link")).unwrap();
        for (path, loose) in [
            ("", 0o755),
            ("blobs", 0o775),
            ("db", 0o644),
            ("blobs/1", 0o666),
        ] {
            std::fs::set_permissions(dir.join(path), std::fs::Permissions::from_mode(loose))
                .unwrap();
        }
        restrict(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("blobs")), 0o700);
        assert_eq!(mode(&dir.join("db")), 0o600);
        assert_eq!(mode(&dir.join("blobs/1")), 0o600);
        assert_eq!(mode(&outside), 0o644, "links are not followed");
    }
}

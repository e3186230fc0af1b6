//! The daemon's sled database: one per state directory, opened once, with a capped cache,
//! private to the user like the rest of the state directory (see [`restrict`]).
//!
//! The outbound journal is not in it: it has its own databases (see [`crate::journal`]).
//! Each tree belongs to one module: `inbound` and
//! `follows` to [`crate::inbound`], `sessions` to [`crate::replica`], `meta` to this module
//! (the instance id) but for its `journal_acked` key, which is the journal's. No other module opens a tree.

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
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|source| StoreError::Io {
        what: "creating the store's directory",
        source,
    })?;
    let db = sled::Config::new()
        .path(dir)
        .cache_capacity(CACHE_BYTES)
        .mode(sled::Mode::LowSpace)
        .open()
        .map_err(StoreError::sled("opening the store"))?;
    restrict(dir)?;
    Ok(db)
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
        let io = |what| move |source| StoreError::Io { what, source };
        let mut pending = vec![dir.to_owned()];
        while let Some(path) = pending.pop() {
            let metadata =
                std::fs::symlink_metadata(&path).map_err(io("reading a store file's mode"))?;
            let mode = if metadata.is_dir() {
                for entry in std::fs::read_dir(&path).map_err(io("listing a store directory"))? {
                    pending.push(entry.map_err(io("listing a store directory"))?.path());
                }
                0o700
            } else if metadata.is_file() {
                0o600
            } else {
                continue;
            };
            if metadata.permissions().mode() & 0o7777 != mode {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                    .map_err(io("making a store file private"))?;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// This daemon instance's id: random, created on first use, stable for the state
/// directory.
pub fn instance_id(db: &sled::Db) -> Result<String, StoreError> {
    let meta = db.open_tree("meta").map_err(StoreError::sled("meta"))?;
    if let Some(id) = meta.get("instance_id").map_err(StoreError::sled("meta"))? {
        return Ok(String::from_utf8_lossy(&id).into_owned());
    }
    let id = format!("i-{}", random_hex(8));
    meta.insert("instance_id", id.as_bytes())
        .map_err(StoreError::sled("meta"))?;
    Ok(id)
}

/// `n` random bytes as hex.
pub fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    getrandom::fill(&mut bytes).expect("the OS random source works");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

//! The daemon's sled database: one per state directory, opened once, with a capped cache.
//!
//! The outbound journal is not in it: it has its own databases (see [`crate::journal`]).
//! Each tree belongs to one module: `inbound` and
//! `follows` to [`crate::inbound`], `sessions` to [`crate::replica`], `meta` to this module
//! (the instance id) but for its `journal_acked` key, which is the journal's. No other module opens a tree.
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
    sled::Config::new()
        .path(dir)
        .cache_capacity(CACHE_BYTES)
        .mode(sled::Mode::LowSpace)
        .open()
        .map_err(StoreError::sled("opening the store"))
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
